// Default table GEMM (the patch embedding, ViT-L/14-336: 577 tokens per image, K = 592): bias and position table
// in the epilogue, see projector/gemm_sm90.h. Not swept: MEGAVLM_FUSED_GEMM=auto keeps the patch embedding on cuBLAS,
// since this GEMM took 0.151 ms against cuBLAS + add_pos_bias' 0.140 ms on an H200 (0.159 vs 0.150 ms on an H100;
// benchmarks/kernel_bench.py in `OUT=... bash benchmarks/gpu_check.sh`, 2026-11-27), so it serves
// MEGAVLM_FUSED_GEMM=cutlass only.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionBiasTable, sm90::Tile<128, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Cooperative, float, sm90::StrideTable>;
MEGAVLM_SM90_GEMM_DEFAULT(table, co128x128x64_c2x1, Gemm)
