// Device-side helpers shared by the kernels: conversions, 8-wide packed
// loads/stores, reductions and the exact (erf) GELU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace megavlm {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 8 consecutive elements; 16 bytes for 2-byte types, 32 bytes for float.
// The host side only takes the vector path when the pointer is aligned to
// sizeof(Pack8<T>) and the row length is a multiple of 8.
template <typename T>
struct alignas(sizeof(T) * 8) Pack8 {
  T v[8];
};

template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, float (&out)[8]) {
  const Pack8<T> pk = *reinterpret_cast<const Pack8<T>*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float<T>(pk.v[i]);
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, const float (&in)[8]) {
  Pack8<T> pk;
#pragma unroll
  for (int i = 0; i < 8; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack8<T>*>(p) = pk;
}

// 8 floats from a 16-byte aligned fp32 pointer.
__device__ __forceinline__ void load8_f32(const float* __restrict__ p, float (&out)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block; every thread gets the result. `smem` holds >= 33 floats.
// Safe to call repeatedly (barriers on entry and exit).
__device__ __forceinline__ float block_reduce_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_reduce_sum(v);
  __syncthreads();
  if (lane == 0) smem[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float w = lane < nwarps ? smem[lane] : 0.f;
    w = warp_reduce_sum(w);
    if (lane == 0) smem[32] = w;
  }
  __syncthreads();
  return smem[32];
}

// Exact GELU (torch.nn.functional.gelu with approximate='none').
__device__ __forceinline__ float gelu_erf(float u) {
  return 0.5f * u * (1.f + erff(u * 0.70710678118654752440f));
}

// d/du gelu(u) = Phi(u) + u * phi(u)
__device__ __forceinline__ float gelu_erf_grad(float u) {
  const float cdf = 0.5f * (1.f + erff(u * 0.70710678118654752440f));
  const float pdf = 0.39894228040143267794f * expf(-0.5f * u * u);
  return cdf + u * pdf;
}

}  // namespace megavlm
