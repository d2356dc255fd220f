// One instantiation of gemm_sm90.cuh (GemmBiasTable); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

namespace megavlm {
namespace projector {

std::size_t linear_sm90_table_workspace(const LinearSm90Params& p) { return sm90::GemmBiasTable::workspace(p); }

const char* linear_sm90_table_run(const LinearSm90Params& p, void* workspace, cudaStream_t stream) {
  return sm90::GemmBiasTable::run(p, workspace, stream);
}

}  // namespace projector
}  // namespace megavlm
