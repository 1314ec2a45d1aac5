// Python binding of the persistent LSTM kernels (built by sha_rnn_kernels/_cuda.py).
//
// The functions take buffers allocated by the Python side (so tests can NaN-poison them),
// check every shape, dtype, device, layout and alignment the kernels rely on, and launch on
// the current CUDA stream of the tensors' device. The GEMMs around the recurrence (input
// projection, weight gradients, dx) stay in Python as torch matmuls.
// Only the Tensor type and torch's pybind11 casters (not torch/extension.h, which pulls in the
// whole C++ frontend): the binding compiles in a third of the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

#include "lstm_persistent.h"

namespace {

using sha_rnn::LstmDtype;

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  const at::Device& device, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must be 16-byte aligned (the kernels access it in 16-byte vectors and pairs)");
}

LstmDtype kernel_dtype(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return LstmDtype::kFloat16;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16,
              "sha_rnn_kernels LSTM: the CUDA kernel takes float16 or bfloat16, got ",
              t.scalar_type());
  return LstmDtype::kBFloat16;
}

// Forward. xproj [T, B, 4H], w_hh [4H, H], h0/c0 [B, H] in the model dtype; writes out
// [T, B, H] and c_n [B, H]; when gates [T, B, 4H] and cells [T, B, H] (fp32) are defined,
// also the activations the backward needs.
at::Tensor lstm_forward(const at::Tensor& xproj, const at::Tensor& w_hh, const at::Tensor& h0,
                        const at::Tensor& c0, at::Tensor out, at::Tensor c_n,
                        const std::optional<at::Tensor>& gates,
                        const std::optional<at::Tensor>& cells, int64_t units,
                        int64_t reserve_sms) {
  TORCH_CHECK(xproj.is_cuda(), "xproj must be a CUDA tensor");
  const LstmDtype dtype = kernel_dtype(xproj);
  const auto st = xproj.scalar_type();
  const auto dev = xproj.device();
  TORCH_CHECK(xproj.dim() == 3, "xproj must be [T, B, 4H]");
  const int64_t T = xproj.size(0), B = xproj.size(1), H = w_hh.size(1);
  check_tensor(xproj, "xproj", st, dev, {T, B, 4 * H});
  check_tensor(w_hh, "w_hh", st, dev, {4 * H, H});
  check_tensor(h0, "h0", st, dev, {B, H});
  check_tensor(c0, "c0", st, dev, {B, H});
  check_tensor(out, "out", st, dev, {T, B, H});
  check_tensor(c_n, "c_n", st, dev, {B, H});
  const bool save = gates.has_value() && gates->defined();
  TORCH_CHECK(save == (cells.has_value() && cells->defined()),
              "gates and cells are saved together");
  if (save) {
    check_tensor(*gates, "gates", at::kFloat, dev, {T, B, 4 * H});
    check_tensor(*cells, "cells", at::kFloat, dev, {T, B, H});
  }
  const c10::cuda::CUDAGuard guard(dev);
  sha_rnn::LstmFwdParams p{};
  p.xproj = xproj.data_ptr();
  p.w_hh = w_hh.data_ptr();
  p.h0 = h0.data_ptr();
  p.c0 = c0.data_ptr();
  p.out = out.data_ptr();
  p.c_n = c_n.data_ptr();
  p.gates = save ? gates->data_ptr<float>() : nullptr;
  p.cells = save ? cells->data_ptr<float>() : nullptr;
  TORCH_CHECK(units >= 1, "units must be >= 1, got ", units);
  TORCH_CHECK(reserve_sms >= 0, "reserve_sms must be >= 0, got ", reserve_sms);
  // The error word (the launcher sets it on the stream before the kernel); returned so that
  // the caller can read it.
  at::Tensor status = at::empty({sha_rnn::kLstmStatusWords}, xproj.options().dtype(at::kInt));
  p.status = static_cast<unsigned long long*>(status.data_ptr());
  p.seq_len = static_cast<int>(T);
  p.batch = static_cast<int>(B);
  p.hidden = static_cast<int>(H);
  p.units = static_cast<int>(units);
  p.reserve_sms = static_cast<int>(reserve_sms);
  sha_rnn::lstm_forward_launch(dtype, p, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  return status;
}

// Backward of the recurrence. Writes d_gates [T, B, 4H] (gradient of the gate
// pre-activations), d_h0 and d_c0 [B, H]. Both launchers return the status buffer (int32: the
// error word in its two elements, see kLstmWaitLimitCycles).
at::Tensor lstm_backward(const at::Tensor& w_hh, const at::Tensor& gates,
                         const at::Tensor& cells, const at::Tensor& c0, const at::Tensor& d_out,
                         const at::Tensor& d_hn, const at::Tensor& d_cn, at::Tensor d_gates,
                         at::Tensor d_h0, at::Tensor d_c0, int64_t units,
                         int64_t reserve_sms) {
  TORCH_CHECK(w_hh.is_cuda(), "w_hh must be a CUDA tensor");
  const LstmDtype dtype = kernel_dtype(w_hh);
  const auto st = w_hh.scalar_type();
  const auto dev = w_hh.device();
  TORCH_CHECK(gates.dim() == 3, "gates must be [T, B, 4H]");
  const int64_t T = gates.size(0), B = gates.size(1), H = w_hh.size(1);
  check_tensor(w_hh, "w_hh", st, dev, {4 * H, H});
  check_tensor(gates, "gates", at::kFloat, dev, {T, B, 4 * H});
  check_tensor(cells, "cells", at::kFloat, dev, {T, B, H});
  check_tensor(c0, "c0", st, dev, {B, H});
  check_tensor(d_out, "d_out", st, dev, {T, B, H});
  check_tensor(d_hn, "d_hn", st, dev, {B, H});
  check_tensor(d_cn, "d_cn", st, dev, {B, H});
  check_tensor(d_gates, "d_gates", st, dev, {T, B, 4 * H});
  check_tensor(d_h0, "d_h0", st, dev, {B, H});
  check_tensor(d_c0, "d_c0", st, dev, {B, H});
  const c10::cuda::CUDAGuard guard(dev);
  sha_rnn::LstmBwdParams p{};
  p.w_hh = w_hh.data_ptr();
  p.gates = gates.data_ptr<float>();
  p.cells = cells.data_ptr<float>();
  p.c0 = c0.data_ptr();
  p.d_out = d_out.data_ptr();
  p.d_hn = d_hn.data_ptr();
  p.d_cn = d_cn.data_ptr();
  p.d_gates = d_gates.data_ptr();
  p.d_h0 = d_h0.data_ptr();
  p.d_c0 = d_c0.data_ptr();
  TORCH_CHECK(units >= 1, "units must be >= 1, got ", units);
  TORCH_CHECK(reserve_sms >= 0, "reserve_sms must be >= 0, got ", reserve_sms);
  at::Tensor status = at::empty({sha_rnn::kLstmStatusWords}, w_hh.options().dtype(at::kInt));
  p.status = static_cast<unsigned long long*>(status.data_ptr());
  p.seq_len = static_cast<int>(T);
  p.batch = static_cast<int>(B);
  p.hidden = static_cast<int>(H);
  p.units = static_cast<int>(units);
  p.reserve_sms = static_cast<int>(reserve_sms);
  sha_rnn::lstm_backward_launch(dtype, p, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  return status;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sha_rnn_kernels persistent LSTM (cooperative launch, W_hh resident on chip)";
  m.def("forward", &lstm_forward, "persistent LSTM forward", py::arg("xproj"), py::arg("w_hh"),
        py::arg("h0"), py::arg("c0"), py::arg("out"), py::arg("c_n"), py::arg("gates"),
        py::arg("cells"), py::arg("units"), py::arg("reserve_sms") = 0);
  m.def("backward", &lstm_backward, "persistent LSTM backward of the recurrence",
        py::arg("w_hh"), py::arg("gates"), py::arg("cells"), py::arg("c0"), py::arg("d_out"),
        py::arg("d_hn"), py::arg("d_cn"), py::arg("d_gates"), py::arg("d_h0"), py::arg("d_c0"),
        py::arg("units"), py::arg("reserve_sms") = 0);
  m.attr("max_batch") = sha_rnn::kLstmMaxBatch;
  m.attr("wait_limit_cycles") = sha_rnn::kLstmWaitLimitCycles;
  m.def("fwd_smem_bytes", [](int hidden, int units) {
    return sha_rnn::lstm_fwd_smem_bytes(hidden, units);
  });
  m.def("bwd_smem_bytes", [](int hidden, int units) {
    return sha_rnn::lstm_bwd_smem_bytes(hidden, units);
  });
}
