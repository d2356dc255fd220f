// Argument checks, CUDA error handling, device guard and the kernel launcher.
//
// Error policy (mapped by pybind11):
//   std::invalid_argument -> ValueError   (bad shapes / dtypes / null pointers)
//   std::runtime_error    -> RuntimeError (no CUDA device, CUDA API / launch errors)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace megavlm {

#define MEGAVLM_CHECK_ARG(COND, MSG)                     \
  do {                                                   \
    if (!(COND)) {                                       \
      std::ostringstream megavlm_msg_;                   \
      megavlm_msg_ << "megavlm._C: " << MSG;             \
      throw std::invalid_argument(megavlm_msg_.str());   \
    }                                                    \
  } while (0)

// Throws std::runtime_error carrying the CUDA error name and string.
void throw_cuda_error(cudaError_t err, const char* what);

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda_error(err, what);
}

#define MEGAVLM_CUDA_CHECK(EXPR) ::megavlm::check_cuda((EXPR), #EXPR)

// Pointer checks. `ptr` is a raw device address passed from Python as an int.
inline void check_ptr(std::uintptr_t ptr, const char* name) {
  MEGAVLM_CHECK_ARG(ptr != 0, name << " is a null pointer");
}
inline bool is_aligned(std::uintptr_t ptr, std::size_t bytes) { return ptr % bytes == 0; }

// Number of visible devices; throws RuntimeError (with the CUDA error string)
// when the runtime/driver is unusable or there is no device. Never crashes.
int device_count_or_throw();

// Non-throwing queries for the Python side.
bool cuda_available() noexcept;
int device_count() noexcept;
std::string cuda_status() noexcept;  // "ok" or the CUDA error text
int runtime_version() noexcept;
int driver_version() noexcept;

// Selects `device` for the lifetime of the guard and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
  bool changed_ = false;
};

// Multiprocessor count of the current device (cached per device).
int multiprocessor_count(int device);

// Grid size for a grid-stride kernel over `work_items` items.
unsigned int grid_for(long long work_items, int threads, int device, int blocks_per_sm = 8);

// Launches a kernel whose only parameter is a params struct passed by value,
// then checks cudaGetLastError (and synchronizes when debug sync is on).
void launch_kernel(const void* kernel, unsigned int grid, unsigned int block, void* params,
                   cudaStream_t stream, const char* name);

inline cudaStream_t as_stream(std::uintptr_t stream) {
  return reinterpret_cast<cudaStream_t>(stream);
}

void set_debug_sync(bool on) noexcept;
bool debug_sync() noexcept;

}  // namespace megavlm
