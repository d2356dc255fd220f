// Argument checks, device guard, dtype dispatch and launch for the projector
// kernels (kernel bodies live in kernel.cu).
#include "projector/op.h"

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/dtype.h"
#include "megavlm_build_info.h"
#include "projector/gemm_sm90.h"
#include "projector/kernel.h"

namespace megavlm {
namespace projector {

namespace {
constexpr int kThreads = 256;

void check_int_range(long long v, const char* name) {
  MEGAVLM_CHECK_ARG(v >= 0 && v <= INT_MAX, name << " = " << v << " is out of range");
}

bool vec_ok(long long cols, std::size_t es, std::uintptr_t a, std::uintptr_t b = 0, std::uintptr_t c = 0) {
  return cols % 8 == 0 && is_aligned(a, 8 * es) && is_aligned(b, 8 * es) && is_aligned(c, 8 * es);
}
}  // namespace

void merge_layernorm(int device, std::uintptr_t stream, std::uintptr_t x, std::uintptr_t y, long long batch,
                     long long tokens, long long dim, bool merge, long long grid_w, std::uintptr_t gamma,
                     std::uintptr_t beta, double eps, const std::string& dtype) {
  const DType dt = parse_dtype(dtype);
  MEGAVLM_CHECK_ARG(batch >= 0, "merge_layernorm: batch must be >= 0, got " << batch);
  MEGAVLM_CHECK_ARG(tokens > 0 && dim > 0, "merge_layernorm: tokens and dim must be positive");
  check_int_range(tokens, "tokens");
  long long out_tokens = tokens, F = dim;
  if (merge) {
    MEGAVLM_CHECK_ARG(grid_w > 0 && grid_w % 2 == 0 && tokens % grid_w == 0 && (tokens / grid_w) % 2 == 0,
                      "merge_layernorm: 2x2 merge needs an even grid; got " << tokens << " tokens with grid width "
                                                                            << grid_w);
    out_tokens = tokens / 4;
    F = 4 * dim;
  }
  check_int_range(F, "feature size");
  MEGAVLM_CHECK_ARG(gamma != 0 || beta == 0, "merge_layernorm: LayerNorm bias given without a weight");
  MEGAVLM_CHECK_ARG(merge || gamma != 0, "merge_layernorm: nothing to do (no merge and no LayerNorm)");
  MEGAVLM_CHECK_ARG(eps >= 0.0, "merge_layernorm: eps must be >= 0");
  const long long rows = batch * out_tokens;
  if (rows > 0) {
    check_ptr(x, "x");
    check_ptr(y, "y");
  }
  const std::size_t es = dtype_size(dt);
  const bool vec = dim % 8 == 0 && is_aligned(x, 8 * es) && is_aligned(y, 8 * es) && is_aligned(gamma, 16) &&
                   is_aligned(beta, 16);

  DeviceGuard guard(device);
  if (rows == 0) return;

  MergeLayerNormParams prm{};
  prm.x = reinterpret_cast<const void*>(x);
  prm.y = reinterpret_cast<void*>(y);
  prm.gamma = reinterpret_cast<const float*>(gamma);
  prm.beta = reinterpret_cast<const float*>(beta);
  prm.rows = rows;
  prm.T_in = static_cast<int>(tokens);
  prm.Din = static_cast<int>(dim);
  prm.F = static_cast<int>(F);
  prm.out_tokens = static_cast<int>(out_tokens);
  prm.grid_w = merge ? static_cast<int>(grid_w) : 0;
  prm.merge = merge ? 1 : 0;
  prm.eps = static_cast<float>(eps);
  // One block per output row; size the block to the row (multiple of 32, <= 256).
  const long long items = vec ? F / 8 : F;
  int threads = static_cast<int>(((items + 31) / 32) * 32);
  if (threads > kThreads) threads = kThreads;
  if (threads < 32) threads = 32;
  const int blocks_per_sm = 2048 / threads;
  long long cap = static_cast<long long>(multiprocessor_count(device)) * blocks_per_sm;
  const unsigned int grid = static_cast<unsigned int>(rows < cap ? rows : cap);
  MEGAVLM_DISPATCH_FLOAT_TYPES(dt, "merge_layernorm", [&] {
    MEGAVLM_DISPATCH_BOOL(vec, kVec, [&] {
      launch_kernel(merge_layernorm_kernel<scalar_t, kVec>(), grid, threads, &prm, as_stream(stream),
                    "merge_layernorm");
    });
  });
}

void bias_gelu(int device, std::uintptr_t stream, std::uintptr_t z, std::uintptr_t bias, std::uintptr_t out,
               long long rows, long long cols, const std::string& dtype) {
  const DType dt = parse_dtype(dtype);
  MEGAVLM_CHECK_ARG(rows >= 0 && cols > 0, "bias_gelu: bad shape [" << rows << ", " << cols << "]");
  check_int_range(cols, "cols");
  if (rows > 0) {
    check_ptr(z, "z");
    check_ptr(out, "out");
  }
  const std::size_t es = dtype_size(dt);
  const bool vec = vec_ok(cols, es, z, out) && is_aligned(bias, 16);

  DeviceGuard guard(device);
  const long long total = vec ? rows * cols / 8 : rows * cols;
  if (total == 0) return;
  BiasGeluParams prm{};
  prm.z = reinterpret_cast<const void*>(z);
  prm.bias = reinterpret_cast<const float*>(bias);
  prm.out = reinterpret_cast<void*>(out);
  prm.total = total;
  prm.cols = static_cast<int>(cols);
  const unsigned int grid = grid_for(total, kThreads, device);
  MEGAVLM_DISPATCH_FLOAT_TYPES(dt, "bias_gelu", [&] {
    MEGAVLM_DISPATCH_BOOL(vec, kVec, [&] {
      launch_kernel(bias_gelu_kernel<scalar_t, kVec>(), grid, kThreads, &prm, as_stream(stream), "bias_gelu");
    });
  });
}

void bias_gelu_backward(int device, std::uintptr_t stream, std::uintptr_t grad, std::uintptr_t z,
                        std::uintptr_t bias, std::uintptr_t dz, long long rows, long long cols,
                        const std::string& dtype) {
  const DType dt = parse_dtype(dtype);
  MEGAVLM_CHECK_ARG(rows >= 0 && cols > 0, "bias_gelu_backward: bad shape [" << rows << ", " << cols << "]");
  check_int_range(cols, "cols");
  if (rows > 0) {
    check_ptr(grad, "grad");
    check_ptr(z, "z");
    check_ptr(dz, "dz");
  }
  const std::size_t es = dtype_size(dt);
  const bool vec = vec_ok(cols, es, grad, z, dz) && is_aligned(bias, 16);

  DeviceGuard guard(device);
  const long long total = vec ? rows * cols / 8 : rows * cols;
  if (total == 0) return;
  BiasGeluBackwardParams prm{};
  prm.grad = reinterpret_cast<const void*>(grad);
  prm.z = reinterpret_cast<const void*>(z);
  prm.bias = reinterpret_cast<const float*>(bias);
  prm.dz = reinterpret_cast<void*>(dz);
  prm.total = total;
  prm.cols = static_cast<int>(cols);
  const unsigned int grid = grid_for(total, kThreads, device);
  MEGAVLM_DISPATCH_FLOAT_TYPES(dt, "bias_gelu_backward", [&] {
    MEGAVLM_DISPATCH_BOOL(vec, kVec, [&] {
      launch_kernel(bias_gelu_backward_kernel<scalar_t, kVec>(), grid, kThreads, &prm, as_stream(stream),
                    "bias_gelu_backward");
    });
  });
}

void scatter_rows(int device, std::uintptr_t stream, std::uintptr_t dst, long long dst_rows, std::uintptr_t index,
                  long long n_index, std::uintptr_t src, long long row_bytes) {
  MEGAVLM_CHECK_ARG(dst_rows >= 0 && n_index >= 0, "scatter_rows: negative sizes");
  MEGAVLM_CHECK_ARG(row_bytes > 0, "scatter_rows: row_bytes must be positive, got " << row_bytes);
  if (n_index > 0) {
    check_ptr(dst, "dst");
    check_ptr(index, "index");
    check_ptr(src, "src");
    MEGAVLM_CHECK_ARG(is_aligned(index, alignof(std::int64_t)), "scatter_rows: index must be int64-aligned");
  }
  // Widest copy unit that divides the row size and both base addresses.
  std::size_t unit = 16;
  while (unit > 1 && !(row_bytes % static_cast<long long>(unit) == 0 && is_aligned(dst, unit) &&
                       is_aligned(src, unit))) {
    unit >>= 1;
  }

  DeviceGuard guard(device);
  const long long row_units = row_bytes / static_cast<long long>(unit);
  const long long total = n_index * row_units;
  if (total == 0 || dst_rows == 0) return;
  ScatterRowsParams prm{};
  prm.dst = reinterpret_cast<void*>(dst);
  prm.index = reinterpret_cast<const std::int64_t*>(index);
  prm.src = reinterpret_cast<const void*>(src);
  prm.dst_rows = dst_rows;
  prm.row_units = row_units;
  prm.total = total;
  const void* kernel = nullptr;
  switch (unit) {
    case 16: kernel = scatter_rows_kernel<uint4>(); break;
    case 8: kernel = scatter_rows_kernel<std::uint64_t>(); break;
    case 4: kernel = scatter_rows_kernel<std::uint32_t>(); break;
    case 2: kernel = scatter_rows_kernel<std::uint16_t>(); break;
    default: kernel = scatter_rows_kernel<std::uint8_t>(); break;
  }
  const unsigned int grid = grid_for(total, kThreads, device);
  launch_kernel(kernel, grid, kThreads, &prm, as_stream(stream), "scatter_rows");
}

bool linear_sm90_compiled() noexcept { return MEGAVLM_HAS_SM90_GEMM != 0; }

// The registry of gemm_sm90.h, filled by the static initializers of the gemm_sm90*.cu units: every instantiation by
// "<epilogue>/<tiles>", and each epilogue's default tiles.
namespace {
struct Sm90Registry {
  std::map<std::string, LinearSm90Gemm> gemms;
  std::map<std::string, std::string> default_tiles;
};
Sm90Registry& sm90_registry() {
  static Sm90Registry registry;
  return registry;
}
}  // namespace

bool register_sm90_gemm(const char* epilogue, const char* tiles, LinearSm90Gemm gemm, bool is_default) {
  sm90_registry().gemms[std::string(epilogue) + "/" + tiles] = gemm;
  if (is_default) sm90_registry().default_tiles[epilogue] = tiles;
  return true;
}

std::vector<std::string> linear_sm90_gemms() {
  std::vector<std::string> names;
  for (const auto& item : sm90_registry().gemms) names.push_back(item.first);
  return names;
}

namespace {
LinearSm90Params linear_sm90_params(std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t out,
                                    std::uintptr_t aux, std::uintptr_t table, long long batch, long long tokens,
                                    long long k_dim, long long n, long long out_token_stride,
                                    long long out_batch_stride, bool gelu) {
  MEGAVLM_CHECK_ARG(batch > 0 && tokens > 0 && k_dim > 0 && n > 0,
                    "linear_sm90: sizes must be positive, got batch " << batch << ", tokens " << tokens << ", k "
                                                                      << k_dim << ", n " << n);
  check_int_range(batch, "batch");
  check_int_range(tokens, "tokens");
  check_int_range(k_dim, "k");
  check_int_range(n, "n");
  // TMA: every base address and leading dimension a multiple of 16 bytes (8 bf16).
  MEGAVLM_CHECK_ARG(k_dim % 8 == 0 && n % 8 == 0 && out_token_stride % 8 == 0 && out_batch_stride % 8 == 0,
                    "linear_sm90: k, n and the output strides must be multiples of 8 (got k " << k_dim << ", n " << n
                    << ", strides " << out_token_stride << ", " << out_batch_stride << ")");
  MEGAVLM_CHECK_ARG(out_token_stride >= n && (batch == 1 || out_batch_stride > 0),
                    "linear_sm90: output strides would overlap rows (token stride " << out_token_stride
                    << " < n " << n << ", or batch stride " << out_batch_stride << ")");
  MEGAVLM_CHECK_ARG(gelu || aux == 0, "linear_sm90: aux (the pre-activation) is only written with gelu");
  MEGAVLM_CHECK_ARG(!gelu || table == 0, "linear_sm90: a table is only added without gelu");
  check_ptr(x, "x");
  check_ptr(w, "w");
  check_ptr(out, "out");
  MEGAVLM_CHECK_ARG(is_aligned(x, 16) && is_aligned(w, 16) && is_aligned(out, 16) && is_aligned(aux, 16) &&
                    is_aligned(bias, 16) && is_aligned(table, 16),
                    "linear_sm90: x, w, out, aux, bias and table must be 16-byte aligned");
  LinearSm90Params p{};
  p.x = reinterpret_cast<const void*>(x);
  p.w = reinterpret_cast<const void*>(w);
  p.bias = reinterpret_cast<const float*>(bias);
  p.out = reinterpret_cast<void*>(out);
  p.aux = reinterpret_cast<void*>(aux);
  p.table = reinterpret_cast<const float*>(table);
  p.batch = static_cast<int>(batch);
  p.tokens = static_cast<int>(tokens);
  p.k_dim = static_cast<int>(k_dim);
  p.n = static_cast<int>(n);
  p.out_token_stride = out_token_stride;
  p.out_batch_stride = out_batch_stride;
  p.gelu = gelu ? 1 : 0;
  return p;
}

// The instantiation for these parameters and tiles ("" = the epilogue's default), see gemm_sm90.h.
const LinearSm90Gemm& pick_sm90_gemm(const LinearSm90Params& p, const std::string& tiles) {
  const std::string epilogue = p.table != nullptr ? "table" : !p.gelu ? "bias" : p.aux != nullptr ? "gelu_aux" : "gelu";
  const Sm90Registry& registry = sm90_registry();
  const auto dflt = registry.default_tiles.find(epilogue);
  const std::string name =
      epilogue + "/" + (!tiles.empty() ? tiles : dflt != registry.default_tiles.end() ? dflt->second : "(default)");
  const auto it = registry.gemms.find(name);
  if (it == registry.gemms.end()) {
    std::ostringstream msg;
    msg << "linear_sm90: this megavlm._C has no " << name << " GEMM; it has:";
    for (const auto& known : linear_sm90_gemms()) msg << " " << known;
    throw std::invalid_argument(msg.str());
  }
  return it->second;
}

void require_sm90(int device) {
  MEGAVLM_CHECK_ARG(linear_sm90_compiled(),
                    "linear_sm90: this megavlm._C was built without the Hopper GEMMs (no sm_90 arch or no CUTLASS; "
                    "see megavlm/_build.py)");
  DeviceGuard guard(device);
  int major = 0, minor = 0;
  MEGAVLM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MEGAVLM_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0) {
    std::ostringstream msg;
    msg << "megavlm._C: linear_sm90 runs on sm_90 GPUs (H100/H200) only; device " << device << " is sm_" << major
        << minor;
    throw std::runtime_error(msg.str());
  }
}
}  // namespace

long long linear_sm90_workspace(long long batch, long long tokens, long long k_dim, long long n,
                                long long out_token_stride, long long out_batch_stride, bool gelu, bool aux,
                                bool table, const std::string& tiles) {
  // Dummy aligned addresses: the size depends on the shape only.
  const std::uintptr_t fake = 256;
  const LinearSm90Params p = linear_sm90_params(fake, fake, 0, fake, aux ? fake : 0, table ? fake : 0, batch, tokens,
                                                k_dim, n, out_token_stride, out_batch_stride, gelu);
  if (!linear_sm90_compiled()) return 0;
  return static_cast<long long>(pick_sm90_gemm(p, tiles).workspace(p));
}

void linear_sm90(int device, std::uintptr_t stream, std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias,
                 std::uintptr_t out, std::uintptr_t aux, std::uintptr_t table, std::uintptr_t workspace,
                 long long workspace_bytes, long long batch, long long tokens, long long k_dim, long long n,
                 long long out_token_stride, long long out_batch_stride, bool gelu, const std::string& tiles) {
  const LinearSm90Params p = linear_sm90_params(x, w, bias, out, aux, table, batch, tokens, k_dim, n,
                                                out_token_stride, out_batch_stride, gelu);
  const long long need = linear_sm90_workspace(batch, tokens, k_dim, n, out_token_stride, out_batch_stride, gelu,
                                               aux != 0, table != 0, tiles);
  MEGAVLM_CHECK_ARG(workspace_bytes >= need && (need == 0 || workspace != 0),
                    "linear_sm90: needs a workspace of " << need << " bytes, got " << workspace_bytes);
  require_sm90(device);
  DeviceGuard guard(device);
  void* ws = reinterpret_cast<void*>(workspace);
  const char* err = pick_sm90_gemm(p, tiles).run(p, ws, as_stream(stream));
  if (err != nullptr) throw std::runtime_error(std::string("megavlm._C: linear_sm90: ") + err);
  MEGAVLM_CUDA_CHECK(cudaGetLastError());
  if (debug_sync()) MEGAVLM_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
}

}  // namespace projector
}  // namespace megavlm
