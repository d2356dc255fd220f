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
  int gelu;      // 0: identity, 1: exact (erf) GELU
  int pingpong;  // gelu only: 1 = the ping-pong kernels, 0 = cooperative
};

// One CUTLASS instantiation: the workspace it needs, and its launch (nullptr on success, else a static error
// text; workspace may be null when the size is 0). gemm_sm90_<NAME>.cu defines linear_sm90_<NAME>.
struct LinearSm90Gemm {
  std::size_t (*workspace)(const LinearSm90Params& p);
  const char* (*run)(const LinearSm90Params& p, void* workspace, cudaStream_t stream);
};
extern const LinearSm90Gemm linear_sm90_bias;      // + bias (the projector's second GEMM)
extern const LinearSm90Gemm linear_sm90_gelu;      // + bias, exact GELU
extern const LinearSm90Gemm linear_sm90_gelu_aux;  // + bias, exact GELU, pre-activation stored as aux
extern const LinearSm90Gemm linear_sm90_gelu_pingpong;      // the same two GELU GEMMs with the ping-pong schedule
extern const LinearSm90Gemm linear_sm90_gelu_aux_pingpong;
extern const LinearSm90Gemm linear_sm90_table;  // + bias + table[t, j] (the patch embedding's positions)

}  // namespace projector
}  // namespace megavlm
