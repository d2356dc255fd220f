// The exact (erf) GELU, torch.nn.functional.gelu(approximate='none'), in fewer instructions than
// 0.5 * x * (1 + erff(x / sqrt 2)): a candidate for the Hopper GELU GEMM's epilogue (the *_pgelu tiles
// of benchmarks/sm90_tiles.py), whose per-element math may be what keeps that GEMM behind cuBLAS (docs/kernels.md).
//
//   gelu(x) = x * Phi(x) = max(x, 0) - |x| * Phi(-|x|),   Phi(-t) = 2^p(t)
//
// p: a degree-9 polynomial fitted to log2(Phi(-t)) on [0, 6] by scripts/fit_gelu.py (weighted so that the absolute
// error of Phi is minimax: ~1e-9), evaluated with t clamped at 6 (Phi(-6) = 1e-9). Per element: one clamp, nine
// FMAs, one ex2, one max, one FMA, no branch and no select, where erff takes two coefficient sets, selects and an
// exp: in the SASS of the pp128x128x64_c2x1 GELU GEMM (nvcc 13.0, cuobjdump) about 15 instead of 25 arithmetic
// instructions per output element (docs/kernels.md). Accuracy (tests/ops/test_ops_build.py::test_gelu_poly_is_as_exact_as_torch_float32_gelu, on the host build
// of this same function; scripts/fit_gelu.py): max |error| vs float64 2.4e-7 (torch's float32 GELU on the CPU:
// 3.8e-7), relative error 3.0e-6 where |gelu| > 1e-3 (torch's: 2.2e-4; 0.5*x*(1+erf) in float32 with a correctly
// rounded erf: 5e-5). On the device ex2.approx stands in for exp2 (its error is not measured here: the GPU tests
// hold the GEMMs to the accuracy rule). NaN propagates; +inf -> +inf; -inf -> -6e-9 (torch: NaN).
//
// Plain C++ on the host (the _C binding gelu_poly_cpu, for that test), CUDA C++ on the device; no torch.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MEGAVLM_GELU_INLINE __host__ __device__ __forceinline__
#else
#define MEGAVLM_GELU_INLINE inline
#endif

namespace megavlm {
namespace gelu_detail {

// 2^p for p in [-31, -1]: the device's ex2.approx (one MUFU.EX2); the host's exp2.
MEGAVLM_GELU_INLINE float exp2_fast(float p) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(p));
  return r;
#else
  return std::exp2(p);
#endif
}

// max(x, 0) with NaN kept (fmaxf would return 0 for a NaN).
MEGAVLM_GELU_INLINE float relu_keep_nan(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(x), "f"(0.0f));
  return r;
#else
  return x != x ? x : (x > 0.0f ? x : 0.0f);
#endif
}

}  // namespace gelu_detail

MEGAVLM_GELU_INLINE float gelu_poly(float x) {
  using namespace gelu_detail;
  const float t = fminf(fabsf(x), 6.0f);
  // scripts/fit_gelu.py's coefficients, highest degree first (hex: exactly the float32 values it printed)
  float p = 0x1.101c3ep-21f;
  p = fmaf(p, t, -0x1.3dda68p-17f);
  p = fmaf(p, t, 0x1.384716p-14f);
  p = fmaf(p, t, -0x1.286e40p-12f);
  p = fmaf(p, t, 0x1.920178p-17f);
  p = fmaf(p, t, 0x1.c672d2p-8f);
  p = fmaf(p, t, -0x1.ad8fc2p-5f);
  p = fmaf(p, t, -0x1.d63dfcp-2f);
  p = fmaf(p, t, -0x1.26aec6p+0f);
  p = fmaf(p, t, -1.0f);
  return fmaf(-t, exp2_fast(p), relu_keep_nan(x));
}

}  // namespace megavlm
