// Host entry points of the fused patch embedding (bound in bindings.cpp).
// All tensor arguments are raw device addresses; sizes are element counts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace megavlm {
namespace patch_embed {

// pixels: uint8 [B, H, W, C] contiguous; out: dtype [B, cls_rows + (H/p)*(W/p), k_pad].
void patchify(int device, std::uintptr_t stream, std::uintptr_t pixels, std::uintptr_t out, long long batch,
              long long height, long long width, long long channels, long long patch, long long cls_rows,
              long long k_pad, const std::vector<float>& scale, const std::vector<float>& shift,
              const std::string& dtype);

// In place: out [rows, dim] (rows = B * tokens) += per-token table built from
// pos [pos_rows, dim], bias [dim], cls [dim] (all fp32; 0 = absent).
void add_pos_bias(int device, std::uintptr_t stream, std::uintptr_t out, long long rows, long long tokens,
                  long long dim, std::uintptr_t pos, long long pos_rows, std::uintptr_t bias, std::uintptr_t cls,
                  long long cls_rows, const std::string& dtype);

}  // namespace patch_embed
}  // namespace megavlm
