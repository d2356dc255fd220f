// One instantiation of gemm_sm90.cuh (GemmGelu); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

namespace megavlm {
namespace projector {

std::size_t linear_sm90_gelu_workspace(const LinearSm90Params& p) { return sm90::GemmGelu::workspace(p); }

const char* linear_sm90_gelu_run(const LinearSm90Params& p, void* workspace, cudaStream_t stream) {
  return sm90::GemmGelu::run(p, workspace, stream);
}

}  // namespace projector
}  // namespace megavlm
