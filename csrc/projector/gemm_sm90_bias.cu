// Default bias GEMM: the projector's second GEMM (K = 4096; 576 tokens per image = 3 x 192, no ragged tile); see
// gemm_sm90.h. Chosen by the tile sweep at LLaVA-1.5-7B's shape (32 images x 576 tokens, 4096 -> 4096, rows stored
// into a [32*2048, 4096] buffer): co256x192x64_c1x1 0.804 ms (769 TFLOP/s) against torch.addmm's 0.818 ms; the other
// candidates 0.855-0.912 ms (co128x192x64 with 1x1, 2x1 and 4x1 clusters, sk128x192x64_c2x1). H200,
// `MEGAVLM_SM90_GEMM_TUNING=1 OUT=... bash benchmarks/gpu_check.sh` (benchmarks/sm90_tiles.py), 2026-11-27;
// docs/kernels.md.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionBias, sm90::Tile<256, 192, 64>,
                         sm90::Cluster<1, 1>, sm90::Cooperative>;
MEGAVLM_SM90_GEMM_DEFAULT(bias, co256x192x64_c1x1, Gemm)
