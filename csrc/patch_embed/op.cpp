// Argument checks, device guard, dtype dispatch and launch for the fused patch
// embedding kernels (kernel bodies live in kernel.cu).
#include "patch_embed/op.h"

#include <climits>

#include "common/checks.h"
#include "common/dtype.h"
#include "patch_embed/kernel.h"

namespace megavlm {
namespace patch_embed {

namespace {
constexpr int kThreads = 256;

void check_int_range(long long v, const char* name) {
  MEGAVLM_CHECK_ARG(v >= 0 && v <= INT_MAX, name << " = " << v << " is out of range");
}
}  // namespace

void patchify(int device, std::uintptr_t stream, std::uintptr_t pixels, std::uintptr_t out, long long batch,
              long long height, long long width, long long channels, long long patch, long long cls_rows,
              long long k_pad, const std::vector<float>& scale, const std::vector<float>& shift,
              const std::string& dtype) {
  const DType dt = parse_dtype(dtype);
  MEGAVLM_CHECK_ARG(batch >= 0, "patchify: batch must be >= 0, got " << batch);
  MEGAVLM_CHECK_ARG(height > 0 && width > 0, "patchify: image size must be positive, got " << height << "x" << width);
  MEGAVLM_CHECK_ARG(channels >= 1 && channels <= kMaxChannels,
                    "patchify: channels must be in [1, " << kMaxChannels << "], got " << channels);
  MEGAVLM_CHECK_ARG(patch > 0, "patchify: patch size must be positive, got " << patch);
  MEGAVLM_CHECK_ARG(height % patch == 0 && width % patch == 0,
                    "patchify: image " << height << "x" << width << " is not divisible by patch size " << patch);
  MEGAVLM_CHECK_ARG(cls_rows == 0 || cls_rows == 1, "patchify: cls_rows must be 0 or 1, got " << cls_rows);
  const long long K = channels * patch * patch;
  MEGAVLM_CHECK_ARG(k_pad >= K && k_pad % 8 == 0,
                    "patchify: k_pad must be >= C*p*p = " << K << " and a multiple of 8, got " << k_pad);
  MEGAVLM_CHECK_ARG(static_cast<long long>(scale.size()) == channels &&
                        static_cast<long long>(shift.size()) == channels,
                    "patchify: scale/shift must have one value per channel (" << channels << "), got "
                                                                              << scale.size() << "/" << shift.size());
  check_int_range(height, "height");
  check_int_range(width, "width");
  check_int_range(k_pad, "k_pad");
  const long long gh = height / patch, gw = width / patch;
  const long long tokens = cls_rows + gh * gw;
  check_int_range(tokens, "tokens");
  const long long total_vec = batch * tokens * (k_pad / 8);
  if (total_vec > 0) {
    check_ptr(pixels, "pixels");
    check_ptr(out, "out");
    MEGAVLM_CHECK_ARG(is_aligned(out, 8 * dtype_size(dt)),
                      "patchify: out must be aligned to " << 8 * dtype_size(dt) << " bytes");
  }

  DeviceGuard guard(device);
  if (total_vec == 0) return;

  PatchifyParams prm{};
  prm.pixels = reinterpret_cast<const std::uint8_t*>(pixels);
  prm.out = reinterpret_cast<void*>(out);
  prm.total_vec = total_vec;
  prm.H = static_cast<int>(height);
  prm.W = static_cast<int>(width);
  prm.C = static_cast<int>(channels);
  prm.p = static_cast<int>(patch);
  prm.gw = static_cast<int>(gw);
  prm.T = static_cast<int>(tokens);
  prm.cls_rows = static_cast<int>(cls_rows);
  prm.K = static_cast<int>(K);
  prm.Kp = static_cast<int>(k_pad);
  for (int c = 0; c < kMaxChannels; ++c) {
    prm.scale[c] = c < channels ? scale[c] : 0.f;
    prm.shift[c] = c < channels ? shift[c] : 0.f;
  }
  const unsigned int grid = grid_for(total_vec, kThreads, device);
  MEGAVLM_DISPATCH_FLOAT_TYPES(dt, "patchify", [&] {
    launch_kernel(patchify_kernel<scalar_t>(), grid, kThreads, &prm, as_stream(stream), "patchify");
  });
}

void add_pos_bias(int device, std::uintptr_t stream, std::uintptr_t out, long long rows, long long tokens,
                  long long dim, std::uintptr_t pos, long long pos_rows, std::uintptr_t bias, std::uintptr_t cls,
                  long long cls_rows, const std::string& dtype) {
  const DType dt = parse_dtype(dtype);
  MEGAVLM_CHECK_ARG(rows >= 0, "add_pos_bias: rows must be >= 0, got " << rows);
  MEGAVLM_CHECK_ARG(tokens > 0 && dim > 0, "add_pos_bias: tokens and dim must be positive");
  MEGAVLM_CHECK_ARG(rows % tokens == 0, "add_pos_bias: rows (" << rows << ") must be a multiple of tokens ("
                                                                << tokens << ")");
  check_int_range(tokens, "tokens");
  check_int_range(dim, "dim");
  MEGAVLM_CHECK_ARG(cls_rows == 0 || cls_rows == 1, "add_pos_bias: cls_rows must be 0 or 1");
  MEGAVLM_CHECK_ARG(cls_rows == 0 || cls != 0, "add_pos_bias: cls_rows = 1 requires a class embedding pointer");
  MEGAVLM_CHECK_ARG(cls_rows == 1 || cls == 0, "add_pos_bias: class embedding given but cls_rows = 0");
  if (pos != 0) {
    MEGAVLM_CHECK_ARG(pos_rows == tokens || pos_rows == tokens - cls_rows,
                      "add_pos_bias: pos has " << pos_rows << " rows; expected " << tokens << " or "
                                               << tokens - cls_rows);
  } else {
    MEGAVLM_CHECK_ARG(pos_rows == 0, "add_pos_bias: pos_rows given without a pos pointer");
  }
  if (rows > 0) check_ptr(out, "out");
  const std::size_t es = dtype_size(dt);
  const bool vec = dim % 8 == 0 && is_aligned(out, 8 * es) && is_aligned(pos, 16) && is_aligned(bias, 16) &&
                   is_aligned(cls, 16);

  DeviceGuard guard(device);
  const long long total = vec ? rows * dim / 8 : rows * dim;
  if (total == 0) return;

  AddPosBiasParams prm{};
  prm.out = reinterpret_cast<void*>(out);
  prm.pos = reinterpret_cast<const float*>(pos);
  prm.bias = reinterpret_cast<const float*>(bias);
  prm.cls = reinterpret_cast<const float*>(cls);
  prm.total = total;
  prm.T = static_cast<int>(tokens);
  prm.D = static_cast<int>(dim);
  prm.pos_offset = pos != 0 ? static_cast<int>(tokens - pos_rows) : 0;
  prm.cls_rows = static_cast<int>(cls_rows);
  const unsigned int grid = grid_for(total, kThreads, device);
  MEGAVLM_DISPATCH_FLOAT_TYPES(dt, "add_pos_bias", [&] {
    MEGAVLM_DISPATCH_BOOL(vec, kVec, [&] {
      launch_kernel(add_pos_bias_kernel<scalar_t, kVec>(), grid, kThreads, &prm, as_stream(stream),
                    "add_pos_bias");
    });
  });
}

}  // namespace patch_embed
}  // namespace megavlm
