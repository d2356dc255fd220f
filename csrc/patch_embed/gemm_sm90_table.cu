// Default table GEMM (the patch embedding, ViT-L/14-336: 577 tokens per image, K = 592); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionBiasTable, sm90::Tile<128, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Cooperative, float, sm90::StrideTable>;
MEGAVLM_SM90_GEMM_DEFAULT(table, co128x128x64_c2x1, Gemm)
