// Kernels for the fused projector (kernels only; checks/launch in op.cpp).
#include "common/device_utils.cuh"
#include "projector/kernel.h"

namespace megavlm {
namespace projector {

template <typename T, bool kVec>
__global__ void __launch_bounds__(256) merge_layernorm_impl(MergeLayerNormParams prm) {
  __shared__ float smem[33];
  const T* __restrict__ x = static_cast<const T*>(prm.x);
  T* __restrict__ y = static_cast<T*>(prm.y);
  constexpr int kW = kVec ? 8 : 1;
  const int F = prm.F;
  const int Din = prm.Din;
  const int half_w = prm.grid_w >> 1;
  const bool has_ln = prm.gamma != nullptr;
  for (long long r = blockIdx.x; r < prm.rows; r += gridDim.x) {
    const long long n = r / prm.out_tokens;
    const int q = static_cast<int>(r - n * prm.out_tokens);
    // Source of feature f: segment seg = f / Din (0..3 with merge, else 0) of
    //   token (2i + seg/2) * grid_w + 2j + seg%2   (merge)   or   token q (no merge).
    const T* src0;
    long long seg_row = 0, seg_col = 0;  // pointer offsets between segments (elements)
    if (prm.merge) {
      const int i = q / half_w;
      const int j = q - i * half_w;
      src0 = x + (n * prm.T_in + static_cast<long long>(2 * i) * prm.grid_w + 2 * j) * Din;
      seg_col = Din;                                        // (.., dj=1)
      seg_row = static_cast<long long>(prm.grid_w) * Din;   // (di=1, ..)
    } else {
      src0 = x + (n * prm.T_in + q) * static_cast<long long>(Din);
    }
    auto src_ptr = [&](int f) -> const T* {
      const int seg = f / Din;
      return src0 + (seg >> 1) * seg_row + (seg & 1) * seg_col + (f - seg * Din);
    };
    T* __restrict__ yr = y + r * F;

    float mean = 0.f, rstd = 1.f;
    if (has_ln) {
      float s = 0.f;
      for (int f = threadIdx.x * kW; f < F; f += blockDim.x * kW) {
        const T* p = src_ptr(f);
        if constexpr (kVec) {
          float v[8];
          load8<T>(p, v);
#pragma unroll
          for (int u = 0; u < 8; ++u) s += v[u];
        } else {
          s += to_float<T>(*p);
        }
      }
      mean = block_reduce_sum(s, smem) / static_cast<float>(F);
      float s2 = 0.f;
      for (int f = threadIdx.x * kW; f < F; f += blockDim.x * kW) {
        const T* p = src_ptr(f);
        if constexpr (kVec) {
          float v[8];
          load8<T>(p, v);
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            const float d = v[u] - mean;
            s2 += d * d;
          }
        } else {
          const float d = to_float<T>(*p) - mean;
          s2 += d * d;
        }
      }
      rstd = rsqrtf(block_reduce_sum(s2, smem) / static_cast<float>(F) + prm.eps);
    }

    for (int f = threadIdx.x * kW; f < F; f += blockDim.x * kW) {
      const T* p = src_ptr(f);
      if constexpr (kVec) {
        float v[8];
        load8<T>(p, v);
        if (has_ln) {
          float g[8], b[8];
          load8_f32(prm.gamma + f, g);
          if (prm.beta != nullptr) {
            load8_f32(prm.beta + f, b);
          } else {
#pragma unroll
            for (int u = 0; u < 8; ++u) b[u] = 0.f;
          }
#pragma unroll
          for (int u = 0; u < 8; ++u) v[u] = (v[u] - mean) * rstd * g[u] + b[u];
        }
        store8<T>(yr + f, v);
      } else {
        float v = to_float<T>(*p);
        if (has_ln) {
          v = (v - mean) * rstd * prm.gamma[f] + (prm.beta != nullptr ? prm.beta[f] : 0.f);
        }
        yr[f] = from_float<T>(v);
      }
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(256) bias_gelu_impl(BiasGeluParams prm) {
  const T* z = static_cast<const T*>(prm.z);
  T* out = static_cast<T*>(prm.out);
  constexpr int kW = kVec ? 8 : 1;
  const int cv = prm.cols / kW;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; v < prm.total; v += stride) {
    const int col = static_cast<int>(v % cv) * kW;
    if constexpr (kVec) {
      float a[8];
      load8<T>(z + v * 8, a);
      if (prm.bias != nullptr) {
        float b[8];
        load8_f32(prm.bias + col, b);
#pragma unroll
        for (int u = 0; u < 8; ++u) a[u] += b[u];
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) a[u] = gelu_erf(a[u]);
      store8<T>(out + v * 8, a);
    } else {
      float a = to_float<T>(z[v]);
      if (prm.bias != nullptr) a += prm.bias[col];
      out[v] = from_float<T>(gelu_erf(a));
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(256) bias_gelu_backward_impl(BiasGeluBackwardParams prm) {
  const T* g = static_cast<const T*>(prm.grad);
  const T* z = static_cast<const T*>(prm.z);
  T* dz = static_cast<T*>(prm.dz);
  constexpr int kW = kVec ? 8 : 1;
  const int cv = prm.cols / kW;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; v < prm.total; v += stride) {
    const int col = static_cast<int>(v % cv) * kW;
    if constexpr (kVec) {
      float a[8], gv[8];
      load8<T>(z + v * 8, a);
      load8<T>(g + v * 8, gv);
      if (prm.bias != nullptr) {
        float b[8];
        load8_f32(prm.bias + col, b);
#pragma unroll
        for (int u = 0; u < 8; ++u) a[u] += b[u];
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) a[u] = gv[u] * gelu_erf_grad(a[u]);
      store8<T>(dz + v * 8, a);
    } else {
      float a = to_float<T>(z[v]);
      if (prm.bias != nullptr) a += prm.bias[col];
      dz[v] = from_float<T>(to_float<T>(g[v]) * gelu_erf_grad(a));
    }
  }
}

template <typename U>
__global__ void __launch_bounds__(256) scatter_rows_impl(ScatterRowsParams prm) {
  U* __restrict__ dst = static_cast<U*>(prm.dst);
  const U* __restrict__ src = static_cast<const U*>(prm.src);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; v < prm.total; v += stride) {
    const long long k = v / prm.row_units;
    const long long c = v - k * prm.row_units;
    const long long idx = prm.index[k];
    if (idx < 0 || idx >= prm.dst_rows) continue;
    dst[idx * prm.row_units + c] = src[v];
  }
}

template <typename T, bool kVec>
const void* merge_layernorm_kernel() {
  return reinterpret_cast<const void*>(&merge_layernorm_impl<T, kVec>);
}
template <typename T, bool kVec>
const void* bias_gelu_kernel() {
  return reinterpret_cast<const void*>(&bias_gelu_impl<T, kVec>);
}
template <typename T, bool kVec>
const void* bias_gelu_backward_kernel() {
  return reinterpret_cast<const void*>(&bias_gelu_backward_impl<T, kVec>);
}
template <typename U>
const void* scatter_rows_kernel() {
  return reinterpret_cast<const void*>(&scatter_rows_impl<U>);
}

#define MEGAVLM_INSTANTIATE(T, V)                              \
  template const void* merge_layernorm_kernel<T, V>();         \
  template const void* bias_gelu_kernel<T, V>();               \
  template const void* bias_gelu_backward_kernel<T, V>();

MEGAVLM_INSTANTIATE(float, true)
MEGAVLM_INSTANTIATE(float, false)
MEGAVLM_INSTANTIATE(__half, true)
MEGAVLM_INSTANTIATE(__half, false)
MEGAVLM_INSTANTIATE(__nv_bfloat16, true)
MEGAVLM_INSTANTIATE(__nv_bfloat16, false)
#undef MEGAVLM_INSTANTIATE

template const void* scatter_rows_kernel<std::uint8_t>();
template const void* scatter_rows_kernel<std::uint16_t>();
template const void* scatter_rows_kernel<std::uint32_t>();
template const void* scatter_rows_kernel<std::uint64_t>();
template const void* scatter_rows_kernel<uint4>();

}  // namespace projector
}  // namespace megavlm
