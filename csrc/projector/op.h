// Host entry points of the fused projector kernels (bound in bindings.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace megavlm {
namespace projector {

// x [batch, tokens, dim] -> y [batch * out_tokens, F]; see kernel.h.
void merge_layernorm(int device, std::uintptr_t stream, std::uintptr_t x, std::uintptr_t y, long long batch,
                     long long tokens, long long dim, bool merge, long long grid_w, std::uintptr_t gamma,
                     std::uintptr_t beta, double eps, const std::string& dtype);

// out [rows, cols] = gelu(z + bias)
void bias_gelu(int device, std::uintptr_t stream, std::uintptr_t z, std::uintptr_t bias, std::uintptr_t out,
               long long rows, long long cols, const std::string& dtype);

// dz [rows, cols] = grad * gelu'(z + bias)
void bias_gelu_backward(int device, std::uintptr_t stream, std::uintptr_t grad, std::uintptr_t z,
                        std::uintptr_t bias, std::uintptr_t dz, long long rows, long long cols,
                        const std::string& dtype);

// dst [dst_rows, row_bytes] rows index[k] <- src [n_index, row_bytes] row k; index int64.
void scatter_rows(int device, std::uintptr_t stream, std::uintptr_t dst, long long dst_rows, std::uintptr_t index,
                  long long n_index, std::uintptr_t src, long long row_bytes);

// The Hopper GEMMs (gemm_sm90.h): out rows at (batch, token) strides = act(x @ w^T + bias [+ table[token]]),
// optional aux (pre-activation, gelu only) or fp32 table (no gelu); tiles names the instantiation of that epilogue
// ("" = its default; linear_sm90_gemms lists "<epilogue>/<tiles>" of every one compiled, see gemm_sm90.h).
// bf16 only; raises ValueError on bad arguments
// (or a build without them) and RuntimeError off sm_90.
bool linear_sm90_compiled() noexcept;
long long linear_sm90_workspace(long long batch, long long tokens, long long k_dim, long long n,
                                long long out_token_stride, long long out_batch_stride, bool gelu, bool aux,
                                bool table, const std::string& tiles);
void linear_sm90(int device, std::uintptr_t stream, std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias,
                 std::uintptr_t out, std::uintptr_t aux, std::uintptr_t table, std::uintptr_t workspace,
                 long long workspace_bytes, long long batch, long long tokens, long long k_dim, long long n,
                 long long out_token_stride, long long out_batch_stride, bool gelu, const std::string& tiles);
std::vector<std::string> linear_sm90_gemms();

}  // namespace projector
}  // namespace megavlm
