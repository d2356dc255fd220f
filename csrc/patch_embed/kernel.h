// Kernel parameter blocks and kernel getters for the fused patch embedding.
// Shared by kernel.cu (definitions) and op.cpp (checks + launch).
#pragma once

#include <cstdint>

namespace megavlm {
namespace patch_embed {

constexpr int kMaxChannels = 4;

// uint8 HWC pixels [B, H, W, C] -> patch matrix [B, T, Kp] in the output dtype,
// T = cls_rows + (H/p)*(W/p). Row t < cls_rows is all zeros (class-token row);
// row cls_rows + i*gw + j holds patch (i, j) flattened as (c, ph, pw), each value
// x * scale[c] + shift[c]; columns K..Kp-1 are zero padding.
struct PatchifyParams {
  const std::uint8_t* pixels;
  void* out;
  long long total_vec;  // B * T * Kp / 8
  int H, W, C, p, gw, T, cls_rows, K, Kp;
  float scale[kMaxChannels];
  float shift[kMaxChannels];
};

// In place on out [rows, D] (rows = B*T):
//   out[r, :] += (t < cls_rows ? cls : bias) + pos[t - pos_offset]   with t = r % T
// (bias/cls/pos fp32, each optional; pos only for t >= pos_offset).
struct AddPosBiasParams {
  void* out;
  const float* pos;
  const float* bias;
  const float* cls;
  long long total;  // work items: rows*D (scalar) or rows*D/8 (vector)
  int T, D, pos_offset, cls_rows;
};

template <typename T>
const void* patchify_kernel();

template <typename T, bool kVec>
const void* add_pos_bias_kernel();

}  // namespace patch_embed
}  // namespace megavlm
