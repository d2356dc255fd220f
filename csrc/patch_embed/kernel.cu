// Kernels for the fused patch embedding (kernels only; checks/launch in op.cpp).
#include "common/device_utils.cuh"
#include "patch_embed/kernel.h"

namespace megavlm {
namespace patch_embed {

template <typename T>
__global__ void __launch_bounds__(256) patchify_impl(PatchifyParams prm) {
  T* __restrict__ out = static_cast<T*>(prm.out);
  const int kv = prm.Kp >> 3;
  const int pp = prm.p * prm.p;
  const std::size_t px_row = static_cast<std::size_t>(prm.W) * prm.C;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; v < prm.total_vec;
       v += stride) {
    const long long row = v / kv;
    const int k0 = static_cast<int>(v - row * kv) * 8;
    const long long b = row / prm.T;
    const int t = static_cast<int>(row - b * prm.T);
    float vals[8];
    if (t < prm.cls_rows) {
#pragma unroll
      for (int u = 0; u < 8; ++u) vals[u] = 0.f;
    } else {
      const int q = t - prm.cls_rows;
      const int i = q / prm.gw;
      const int j = q - i * prm.gw;
      const std::uint8_t* __restrict__ base =
          prm.pixels + (static_cast<std::size_t>(b) * prm.H + static_cast<std::size_t>(i) * prm.p) * px_row +
          static_cast<std::size_t>(j) * prm.p * prm.C;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int k = k0 + u;
        float x = 0.f;
        if (k < prm.K) {
          const int c = k / pp;
          const int r = k - c * pp;
          const int ph = r / prm.p;
          const int pw = r - ph * prm.p;
          const std::uint8_t px = __ldg(base + static_cast<std::size_t>(ph) * px_row + pw * prm.C + c);
          // constant indices keep the per-channel constants in registers (no local-memory copy)
          const float sc = c == 0 ? prm.scale[0] : c == 1 ? prm.scale[1] : c == 2 ? prm.scale[2] : prm.scale[3];
          const float sh = c == 0 ? prm.shift[0] : c == 1 ? prm.shift[1] : c == 2 ? prm.shift[2] : prm.shift[3];
          x = fmaf(static_cast<float>(px), sc, sh);
        }
        vals[u] = x;
      }
    }
    store8<T>(out + row * prm.Kp + k0, vals);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(256) add_pos_bias_impl(AddPosBiasParams prm) {
  T* __restrict__ out = static_cast<T*>(prm.out);
  constexpr int kW = kVec ? 8 : 1;
  const int dv = prm.D / kW;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; v < prm.total; v += stride) {
    const long long row = v / dv;
    const int col = static_cast<int>(v - row * dv) * kW;
    const int t = static_cast<int>(row % prm.T);
    const int pr = t - prm.pos_offset;
    const float* __restrict__ base = (t < prm.cls_rows) ? prm.cls : prm.bias;
    const float* __restrict__ posr =
        (prm.pos != nullptr && pr >= 0) ? prm.pos + static_cast<std::size_t>(pr) * prm.D : nullptr;
    T* o = out + row * prm.D + col;
    if constexpr (kVec) {
      float acc[8], add[8];
      load8<T>(o, acc);
      if (base != nullptr) {
        load8_f32(base + col, add);
      } else {
#pragma unroll
        for (int u = 0; u < 8; ++u) add[u] = 0.f;
      }
      if (posr != nullptr) {
        float pv[8];
        load8_f32(posr + col, pv);
#pragma unroll
        for (int u = 0; u < 8; ++u) add[u] += pv[u];
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] += add[u];
      store8<T>(o, acc);
    } else {
      float add = base != nullptr ? base[col] : 0.f;
      if (posr != nullptr) add += posr[col];
      *o = from_float<T>(to_float<T>(*o) + add);
    }
  }
}

template <typename T>
const void* patchify_kernel() {
  return reinterpret_cast<const void*>(&patchify_impl<T>);
}

template <typename T, bool kVec>
const void* add_pos_bias_kernel() {
  return reinterpret_cast<const void*>(&add_pos_bias_impl<T, kVec>);
}

#define MEGAVLM_INSTANTIATE(T)                                 \
  template const void* patchify_kernel<T>();                   \
  template const void* add_pos_bias_kernel<T, true>();         \
  template const void* add_pos_bias_kernel<T, false>();

MEGAVLM_INSTANTIATE(float)
MEGAVLM_INSTANTIATE(__half)
MEGAVLM_INSTANTIATE(__nv_bfloat16)
#undef MEGAVLM_INSTANTIATE

}  // namespace patch_embed
}  // namespace megavlm
