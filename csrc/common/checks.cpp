#include "common/checks.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace megavlm {

namespace {
std::atomic<bool> g_debug_sync{false};
bool g_debug_sync_env_read = false;
std::mutex g_mutex;
std::vector<int> g_sm_count;
}  // namespace

void throw_cuda_error(cudaError_t err, const char* what) {
  // Clear the (non-sticky) error state so later calls start clean.
  (void)cudaGetLastError();
  std::ostringstream s;
  s << "megavlm._C: CUDA error in " << what << ": " << cudaGetErrorName(err) << " ("
    << static_cast<int>(err) << "): " << cudaGetErrorString(err);
  throw std::runtime_error(s.str());
}

int device_count_or_throw() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    std::ostringstream s;
    s << "megavlm._C: no usable CUDA device: cudaGetDeviceCount failed with "
      << cudaGetErrorName(err) << ": " << cudaGetErrorString(err);
    throw std::runtime_error(s.str());
  }
  if (n <= 0) throw std::runtime_error("megavlm._C: no usable CUDA device: no CUDA devices are visible");
  return n;
}

bool cuda_available() noexcept {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

int device_count() noexcept {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_status() noexcept {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  if (n <= 0) return "no CUDA devices are visible";
  return "ok";
}

int runtime_version() noexcept {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

int driver_version() noexcept {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

DeviceGuard::DeviceGuard(int device) {
  const int n = device_count_or_throw();
  MEGAVLM_CHECK_ARG(device >= 0 && device < n,
                    "device index " << device << " out of range (" << n << " visible devices)");
  MEGAVLM_CUDA_CHECK(cudaGetDevice(&prev_));
  if (prev_ != device) {
    MEGAVLM_CUDA_CHECK(cudaSetDevice(device));
    changed_ = true;
  }
}

DeviceGuard::~DeviceGuard() {
  if (changed_) (void)cudaSetDevice(prev_);
}

int multiprocessor_count(int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (device >= static_cast<int>(g_sm_count.size())) g_sm_count.resize(device + 1, 0);
  if (g_sm_count[device] == 0) {
    int n = 0;
    MEGAVLM_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    g_sm_count[device] = n > 0 ? n : 1;
  }
  return g_sm_count[device];
}

unsigned int grid_for(long long work_items, int threads, int device, int blocks_per_sm) {
  if (work_items <= 0) return 1;
  const long long needed = (work_items + threads - 1) / threads;
  const long long cap = static_cast<long long>(multiprocessor_count(device)) * blocks_per_sm;
  long long g = needed < cap ? needed : cap;
  if (g < 1) g = 1;
  return static_cast<unsigned int>(g);
}

void set_debug_sync(bool on) noexcept { g_debug_sync.store(on); }

bool debug_sync() noexcept {
  if (!g_debug_sync_env_read) {
    g_debug_sync_env_read = true;
    const char* env = std::getenv("MEGAVLM_DEBUG_SYNC");
    if (env != nullptr && env[0] != '\0' && env[0] != '0') g_debug_sync.store(true);
  }
  return g_debug_sync.load();
}

void launch_kernel(const void* kernel, unsigned int grid, unsigned int block, void* params,
                   cudaStream_t stream, const char* name) {
  void* args[] = {params};
  cudaError_t err = cudaLaunchKernel(kernel, dim3(grid), dim3(block), args, 0, stream);
  if (err != cudaSuccess) throw_cuda_error(err, name);
  err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda_error(err, name);
  if (debug_sync()) {
    err = cudaStreamSynchronize(stream);
    if (err != cudaSuccess) throw_cuda_error(err, name);
  }
}

}  // namespace megavlm
