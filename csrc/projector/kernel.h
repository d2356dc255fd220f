// Kernel parameter blocks and kernel getters for the fused projector.
#pragma once

#include <cstdint>

namespace megavlm {
namespace projector {

// x [N, T_in, Din] -> y [rows = N*out_tokens, F] with optional 2x2 merge
// (out_tokens = T_in/4, F = 4*Din; merged vector = concat of the tokens at
// (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1) of the grid_w-wide token grid)
// and optional LayerNorm over F (fp32 statistics, gamma/beta fp32).
struct MergeLayerNormParams {
  const void* x;
  void* y;
  const float* gamma;  // null -> no LayerNorm
  const float* beta;   // may be null
  long long rows;
  int T_in, Din, F, out_tokens, grid_w, merge;
  float eps;
};

// out[r, c] = gelu(z[r, c] + bias[c]); bias fp32, may be null. out may alias z.
struct BiasGeluParams {
  const void* z;
  const float* bias;
  void* out;
  long long total;  // work items (elements, or 8-element vectors)
  int cols;
};

// dz[r, c] = grad[r, c] * gelu'(z[r, c] + bias[c]); dz may alias grad.
struct BiasGeluBackwardParams {
  const void* grad;
  const void* z;
  const float* bias;
  void* dz;
  long long total;
  int cols;
};

// dst[index[k], :] = src[k, :] (row copy in units of U bytes); rows whose index
// is outside [0, dst_rows) are skipped.
struct ScatterRowsParams {
  void* dst;
  const std::int64_t* index;
  const void* src;
  long long dst_rows;
  long long row_units;
  long long total;  // n_index * row_units
};

template <typename T, bool kVec>
const void* merge_layernorm_kernel();

template <typename T, bool kVec>
const void* bias_gelu_kernel();

template <typename T, bool kVec>
const void* bias_gelu_backward_kernel();

// U is one of uint8_t, uint16_t, uint32_t, uint64_t, uint4 (1/2/4/8/16 bytes).
template <typename U>
const void* scatter_rows_kernel();

}  // namespace projector
}  // namespace megavlm
