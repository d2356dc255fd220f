// Default gelu_aux GEMM: the gelu one that also stores the pre-activation for the backward (the same tiles, so
// that $MEGAVLM_SM90_GELU_TILES names both); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionGeluAux, sm90::Tile<128, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Pingpong>;
MEGAVLM_SM90_GEMM_DEFAULT(gelu_aux, pp128x128x64_c2x1, Gemm)
