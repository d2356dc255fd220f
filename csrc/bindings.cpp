// pybind11 module `megavlm._C`: plain CUDA C++ (not a torch extension).
// Tensors travel as raw device addresses (tensor.data_ptr()) and the stream as
// torch.cuda.current_stream().cuda_stream; see megavlm/ops/fused.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/checks.h"
#include "common/gelu.h"
#include "megavlm_build_info.h"
#include "patch_embed/op.h"
#include "projector/op.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "megavlm fused CUDA kernels (patch embedding, projector). Pointer-based API; use megavlm.ops.";
  m.attr("__version__") = MEGAVLM_C_VERSION;
  m.attr("compiled_archs") = MEGAVLM_C_ARCHS;
  m.attr("cuda_compiled_version") = CUDART_VERSION;

  m.def("cuda_available", &megavlm::cuda_available, "True if the CUDA runtime sees at least one device.");
  m.def("device_count", &megavlm::device_count, "Number of visible CUDA devices (0 on any error).");
  m.def("cuda_status", &megavlm::cuda_status, "'ok' or the CUDA error text explaining why no device is usable.");
  m.def("runtime_version", &megavlm::runtime_version);
  m.def("driver_version", &megavlm::driver_version);
  m.def("set_debug_sync", &megavlm::set_debug_sync, py::arg("on"),
        "Synchronize the stream after every launch and raise on asynchronous errors (also MEGAVLM_DEBUG_SYNC=1).");
  m.def("debug_sync", &megavlm::debug_sync);

  using guard = py::call_guard<py::gil_scoped_release>;

  m.def("patchify", &megavlm::patch_embed::patchify, guard(), py::arg("device"), py::arg("stream"),
        py::arg("pixels"), py::arg("out"), py::arg("batch"), py::arg("height"), py::arg("width"),
        py::arg("channels"), py::arg("patch"), py::arg("cls_rows"), py::arg("k_pad"), py::arg("scale"),
        py::arg("shift"), py::arg("dtype"),
        "uint8 [B,H,W,C] -> normalized patch matrix [B, cls_rows + P, k_pad] (flatten order C, ph, pw).");
  m.def("add_pos_bias", &megavlm::patch_embed::add_pos_bias, guard(), py::arg("device"), py::arg("stream"),
        py::arg("out"), py::arg("rows"), py::arg("tokens"), py::arg("dim"), py::arg("pos"), py::arg("pos_rows"),
        py::arg("bias"), py::arg("cls"), py::arg("cls_rows"), py::arg("dtype"),
        "In place: out[r] += (class row ? cls : bias) + pos[token]; fp32 pos/bias/cls.");
  m.def("merge_layernorm", &megavlm::projector::merge_layernorm, guard(), py::arg("device"), py::arg("stream"),
        py::arg("x"), py::arg("y"), py::arg("batch"), py::arg("tokens"), py::arg("dim"), py::arg("merge"),
        py::arg("grid_w"), py::arg("gamma"), py::arg("beta"), py::arg("eps"), py::arg("dtype"),
        "Optional 2x2 token merge + optional LayerNorm (fp32 gamma/beta) in one pass.");
  m.def("bias_gelu", &megavlm::projector::bias_gelu, guard(), py::arg("device"), py::arg("stream"), py::arg("z"),
        py::arg("bias"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
        "out = gelu_erf(z + bias) (fp32 bias, may be 0).");
  m.def("bias_gelu_backward", &megavlm::projector::bias_gelu_backward, guard(), py::arg("device"),
        py::arg("stream"), py::arg("grad"), py::arg("z"), py::arg("bias"), py::arg("dz"), py::arg("rows"),
        py::arg("cols"), py::arg("dtype"), "dz = grad * gelu_erf'(z + bias).");
  m.def("scatter_rows", &megavlm::projector::scatter_rows, guard(), py::arg("device"), py::arg("stream"),
        py::arg("dst"), py::arg("dst_rows"), py::arg("index"), py::arg("n_index"), py::arg("src"),
        py::arg("row_bytes"), "dst[index[k]] = src[k] row copy (int64 index; out-of-range rows are skipped).");
  m.def("linear_sm90_compiled", &megavlm::projector::linear_sm90_compiled,
        "True if this build has the Hopper (sm_90a, CUTLASS) projector GEMMs.");
  m.def("linear_sm90_workspace", &megavlm::projector::linear_sm90_workspace, py::arg("batch"), py::arg("tokens"),
        py::arg("k"), py::arg("n"), py::arg("out_token_stride"), py::arg("out_batch_stride"), py::arg("gelu"),
        py::arg("aux"), py::arg("table"), py::arg("tiles") = "",
        "Workspace bytes linear_sm90 needs for this shape.");
  m.def("linear_sm90", &megavlm::projector::linear_sm90, guard(), py::arg("device"), py::arg("stream"),
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("aux"), py::arg("table"),
        py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("batch"), py::arg("tokens"), py::arg("k"), py::arg("n"),
        py::arg("out_token_stride"), py::arg("out_batch_stride"), py::arg("gelu"), py::arg("tiles") = "",
        "bf16 out[b*out_batch_stride + t*out_token_stride + j] = act(x[b,t,:] . w[j,:] + bias[j] (+ table[t,j])) "
        "(fp32 bias/table, exact GELU), aux[b,t,j] = pre-activation; CUTLASS TMA/WGMMA kernels, sm_90 only; "
        "tiles: which compiled instantiation of the epilogue ('' = its default; see linear_sm90_gemms).");
  m.def(
      "gelu_poly_cpu",
      [](py::buffer values) {
        py::buffer_info info = values.request(true);
        if (info.format != py::format_descriptor<float>::format() || info.itemsize != sizeof(float)) {
          throw py::value_error("gelu_poly_cpu: needs a float32 buffer (e.g. a numpy float32 array), got format " +
                                info.format);
        }
        py::ssize_t expected = sizeof(float);
        for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
          if (info.shape[d] > 1 && info.strides[d] != expected) {
            throw py::value_error("gelu_poly_cpu: needs a contiguous buffer");
          }
          expected *= info.shape[d];
        }
        float* x = static_cast<float*>(info.ptr);
        py::gil_scoped_release release;
        for (py::ssize_t i = 0; i < info.size; ++i) x[i] = megavlm::gelu_poly(x[i]);
      },
      py::arg("values"),
      "In place on a contiguous float32 buffer: the host build of common/gelu.h's gelu_poly (the exact GELU of the "
      "'_pgelu' Hopper GEMMs), for tests of its accuracy.");
  m.def("linear_sm90_gemms", &megavlm::projector::linear_sm90_gemms,
        "Every compiled Hopper GEMM as '<epilogue>/<tiles>' (epilogue bias, gelu, gelu_aux or table).");
}
