// Hopper (sm_90a) GEMMs for the projector with the bias, the exact GELU and the output placement in the epilogue,
// built from CUTLASS 3 collectives (TMA + WGMMA, warp-specialized cooperative kernels). Only compiled when the
// build finds CUTLASS and targets sm_90 (MEGAVLM_HAS_SM90_GEMM); op.cpp holds the checks and the Python entry.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace megavlm {
namespace projector {

// For every batch b < batch and token t < tokens:
//   out[b*out_batch_stride + t*out_token_stride + j] =
//       act(sum_k x[(b*tokens + t)*k_dim + k] * w[j*k_dim + k] + bias[j])
//   aux[(b*tokens + t)*n + j]                        = the same value before the activation (when aux != null)
// for j < n. x, w, out, aux are bf16; bias is fp32 (may be null). The output rows may sit anywhere in a larger
// buffer (strides in elements), which is how the projector writes straight into the decoder's input embeddings.
// In GEMM terms (CUTLASS's M, N, K, L): M = n (out features, contiguous in out), N = tokens, K = k_dim, L = batch;
// w is the K-major A operand shared by every batch, x the K-major B operand.
struct LinearSm90Params {
  const void* x;
  const void* w;
  const float* bias;
  void* out;
  void* aux;
  const float* table;  // optional fp32 [tokens, n] added to every batch (linear_sm90_table_* only)
  int batch, tokens, k_dim, n;
  long long out_token_stride, out_batch_stride;
  int gelu;  // 0: identity, 1: exact (erf) GELU
};

// One CUTLASS instantiation: the workspace it needs, and its launch (nullptr on success, else a static error
// text; workspace may be null when the size is 0).
struct LinearSm90Gemm {
  std::size_t (*workspace)(const LinearSm90Params& p);
  const char* (*run)(const LinearSm90Params& p, void* workspace, cudaStream_t stream);
};

// Every compiled instantiation registers itself (MEGAVLM_SM90_GEMM_ENTRY / _DEFAULT in gemm_sm90.cuh) as
// "<epilogue>/<tiles>": epilogue bias (the projector's second GEMM), gelu, gelu_aux (pre-activation stored too) or
// table (the patch embedding's positions); tiles names the schedule, tile and cluster, e.g. pp128x128x64_c2x1
// (pp ping-pong, co cooperative, sk cooperative stream-K; an _e<M>x<N> suffix fixes the epilogue's subtile). The
// unit gemm_sm90_<epilogue>.cu registers its epilogue's default; op.cpp looks them up (linear_sm90_gemms lists them).
bool register_sm90_gemm(const char* epilogue, const char* tiles, LinearSm90Gemm gemm, bool is_default);

}  // namespace projector
}  // namespace megavlm
