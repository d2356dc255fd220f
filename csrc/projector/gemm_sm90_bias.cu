// One instantiation of gemm_sm90.cuh (GemmBias); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

namespace megavlm {
namespace projector {

std::size_t linear_sm90_bias_workspace(const LinearSm90Params& p) { return sm90::GemmBias::workspace(p); }

const char* linear_sm90_bias_run(const LinearSm90Params& p, void* workspace, cudaStream_t stream) {
  return sm90::GemmBias::run(p, workspace, stream);
}

}  // namespace projector
}  // namespace megavlm
