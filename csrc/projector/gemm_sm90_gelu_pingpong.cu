// One instantiation of gemm_sm90.cuh (GemmGeluPingpong); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

MEGAVLM_SM90_GEMM_ENTRY(gelu_pingpong, GemmGeluPingpong)
