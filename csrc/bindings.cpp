// pybind11 module manifold_sgd._C: the native entry points. Addresses arrive as
// integers (Python packs them from torch tensors); nothing here links libtorch.
// Errors: std::invalid_argument becomes ValueError in Python.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <thread>

#include "core/step.h"
#include "cpu/fused_step_cpu.h"

namespace py = pybind11;

#ifndef MANIFOLD_SGD_VERSION
#define MANIFOLD_SGD_VERSION "0.0.0"
#endif

namespace {

template <typename T>
const T* addr(int64_t a) { return reinterpret_cast<const T*>(a); }

void fused_step_cpu(int64_t table, int64_t n_tensors, int64_t groups, int64_t n_groups,
                    int64_t row_index, int64_t n_row_index, int dtype, int64_t report, double lr,
                    double momentum, bool nesterov, double weight_decay, int adaptive,
                    double curvature, double distance, double psi_max_norm, int retraction,
                    int num_threads) {
  msgd::StepOptions opt;
  opt.lr = lr;
  opt.momentum = momentum;
  opt.nesterov = nesterov;
  opt.weight_decay = weight_decay;
  opt.adaptive = msgd::Adaptive(adaptive);
  opt.curvature = curvature;
  opt.distance = distance;
  opt.psi_max_norm = psi_max_norm;
  opt.retraction = msgd::Retraction(retraction);
  // Guard block: every table entry checked before any memory is written.
  if (n_tensors > 0 && !report) throw std::invalid_argument("null report address");
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  std::string err = msgd::validate_tables(addr<int64_t>(table), n_tensors, addr<int64_t>(groups),
                                          n_groups, addr<int64_t>(row_index), n_row_index, dtype, opt);
  if (!err.empty()) throw std::invalid_argument(err);
  if (n_tensors == 0) return;
  py::gil_scoped_release release;
  msgd::fused_step_cpu(addr<int64_t>(table), n_tensors, addr<int64_t>(groups), n_groups,
                       addr<int64_t>(row_index), msgd::DType(dtype), opt,
                       reinterpret_cast<int64_t*>(report), num_threads);
}

py::dict info() {
  py::dict d;
  d["version"] = MANIFOLD_SGD_VERSION;
#ifdef MANIFOLD_SGD_WITH_CUDA
  d["cuda_compiled"] = true;
#else
  d["cuda_compiled"] = false;
#endif
  d["hardware_threads"] = int(std::thread::hardware_concurrency());
  d["tensor_fields"] = int(msgd::kTensorFields);
  d["group_fields"] = int(msgd::kGroupFields);
  d["report_fields"] = int(msgd::kReportFields);
  d["max_stiefel_rows"] = msgd::kMaxStiefelRows;
  d["cpu_variant"] = msgd::cpu_variant();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "manifold_sgd native kernels (fused manifold SGD steps on raw buffers)";
  m.def("fused_step_cpu", &fused_step_cpu,
        "One fused step over a bucket of host tensors described by int64 tables "
        "(layout in csrc/core/step.h). Validates every entry before writing.",
        py::arg("table"), py::arg("n_tensors"), py::arg("groups"), py::arg("n_groups"),
        py::arg("row_index"), py::arg("n_row_index"), py::arg("dtype"), py::arg("report"),
        py::arg("lr"), py::arg("momentum"), py::arg("nesterov"), py::arg("weight_decay"),
        py::arg("adaptive"), py::arg("curvature"), py::arg("distance"),
        py::arg("psi_max_norm"), py::arg("retraction"), py::arg("num_threads"));
  m.def("info", &info, "Build facts: version, whether CUDA kernels were compiled in, table layout.");
}
