// Default gelu GEMM: the projector's first GEMM (K = 1024), ping-pong so that one warpgroup's GELU epilogue
// overlaps the other's MMAs; see gemm_sm90.h. Chosen by the tile sweep at [18432 x 1024] x [1024 x 4096]:
// pp128x128x64_c2x1 0.275 ms (562 TFLOP/s); pp128x128x128_c2x1 0.276, pp64x256x64_c2x1 0.277, pp128x128x64_c1x1
// 0.278, co256x128x64_c2x1 0.293 ms (torch.mm without any epilogue: 0.218 ms). H200,
// `MEGAVLM_SM90_GEMM_TUNING=1 OUT=... bash benchmarks/gpu_check.sh` (benchmarks/sm90_tiles.py), 2026-11-27; an
// H100 run before it had ping-pong 128x128 at 0.272 ms against the cooperative 128x256 default of then at 0.287 ms.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionGelu, sm90::Tile<128, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Pingpong>;
MEGAVLM_SM90_GEMM_DEFAULT(gelu, pp128x128x64_c2x1, Gemm)
