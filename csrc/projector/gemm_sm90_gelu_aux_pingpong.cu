// One instantiation of gemm_sm90.cuh (GemmGeluAuxPingpong); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

MEGAVLM_SM90_GEMM_ENTRY(gelu_aux_pingpong, GemmGeluAuxPingpong)
