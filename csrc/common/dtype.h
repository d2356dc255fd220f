// Host-side dtype tags and the dtype dispatch macro used by the op.cpp files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <stdexcept>
#include <string>

namespace megavlm {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Accepts the names produced by `str(torch_dtype).split(".")[-1]`.
inline DType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "float") return DType::kFloat32;
  if (name == "float16" || name == "half") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw std::invalid_argument("megavlm._C: unsupported dtype '" + name +
                              "' (expected float32, float16 or bfloat16)");
}

inline std::size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
  }
  return 0;
}

}  // namespace megavlm

// MEGAVLM_DISPATCH_FLOAT_TYPES(dtype, "name", [&] { launch<scalar_t>(...); });
// Binds `scalar_t` to float / __half / __nv_bfloat16 inside the lambda.
#define MEGAVLM_DISPATCH_FLOAT_TYPES(DT, NAME, ...)                               \
  [&] {                                                                           \
    switch (DT) {                                                                 \
      case ::megavlm::DType::kFloat32: {                                          \
        using scalar_t = float;                                                   \
        return __VA_ARGS__();                                                     \
      }                                                                           \
      case ::megavlm::DType::kFloat16: {                                          \
        using scalar_t = __half;                                                  \
        return __VA_ARGS__();                                                     \
      }                                                                           \
      case ::megavlm::DType::kBFloat16: {                                         \
        using scalar_t = __nv_bfloat16;                                           \
        return __VA_ARGS__();                                                     \
      }                                                                           \
    }                                                                             \
    throw std::invalid_argument(std::string(NAME) + ": unsupported dtype");       \
  }()

// MEGAVLM_DISPATCH_BOOL(cond, kVec, [&] { ... kVec ... });
#define MEGAVLM_DISPATCH_BOOL(COND, CONST_NAME, ...) \
  [&] {                                              \
    if (COND) {                                      \
      constexpr bool CONST_NAME = true;              \
      return __VA_ARGS__();                          \
    } else {                                         \
      constexpr bool CONST_NAME = false;             \
      return __VA_ARGS__();                          \
    }                                                \
  }()
