// pybind11 module manifold_sgd._C: the native entry points. Addresses arrive as
// integers (Python packs them from torch tensors); nothing here links libtorch.
// Errors: std::invalid_argument becomes ValueError in Python.
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "core/step.h"
#include "cpu/fused_step_cpu.h"
#include "cpu/parallel.h"
#ifdef MANIFOLD_SGD_WITH_CUDA
#include "cuda/fused_step_cuda.h"
#endif

namespace py = pybind11;

#ifndef MANIFOLD_SGD_VERSION
#define MANIFOLD_SGD_VERSION "0.0.0"
#endif

namespace {

template <typename T>
const T* addr(int64_t a) { return reinterpret_cast<const T*>(a); }

msgd::StepOptions step_options(double lr, double momentum, bool nesterov, double weight_decay, int adaptive,
                               double curvature, double distance, double psi_max_norm) {
  msgd::StepOptions opt;
  opt.lr = lr;
  opt.momentum = momentum;
  opt.nesterov = nesterov;
  opt.weight_decay = weight_decay;
  opt.adaptive = msgd::Adaptive(adaptive);
  opt.curvature = curvature;
  opt.distance = distance;
  opt.psi_max_norm = psi_max_norm;
  return opt;
}

void fused_step_cpu(int64_t table, int64_t n_tensors, int64_t groups, int64_t n_groups,
                    int64_t row_index, int64_t n_row_index, int dtype, int64_t report, double lr,
                    double momentum, bool nesterov, double weight_decay, int adaptive,
                    double curvature, double distance, double psi_max_norm, int retraction,
                    int num_threads) {
  msgd::StepOptions opt = step_options(lr, momentum, nesterov, weight_decay, adaptive, curvature, distance,
                                       psi_max_norm);
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

#ifdef MANIFOLD_SGD_WITH_CUDA
// The CUDA plan of one bucket: built from host tables (fully validated here,
// with the options of the step it is built for), uploaded once by Python.
std::unique_ptr<msgd::cuda::HostPlan> make_cuda_plan(int64_t table, int64_t n_tensors, int64_t groups,
                                                     int64_t n_groups, int64_t row_index, int64_t n_row_index,
                                                     int dtype, double lr, double momentum, bool nesterov,
                                                     double weight_decay, int adaptive, double curvature,
                                                     double distance, double psi_max_norm) {
  const msgd::StepOptions opt =
      step_options(lr, momentum, nesterov, weight_decay, adaptive, curvature, distance, psi_max_norm);
  std::string err = msgd::validate_tables(addr<int64_t>(table), n_tensors, addr<int64_t>(groups), n_groups,
                                          addr<int64_t>(row_index), n_row_index, dtype, opt);
  if (!err.empty()) throw std::invalid_argument(err);
  auto plan = std::make_unique<msgd::cuda::HostPlan>();
  err = msgd::cuda::build_plan(addr<int64_t>(table), n_tensors, addr<int64_t>(groups), n_groups,
                               addr<int64_t>(row_index), n_row_index, msgd::DType(dtype),
                               opt.adaptive != msgd::Adaptive::None, *plan);
  if (!err.empty()) throw std::invalid_argument(err);
  return plan;
}

void fused_step_cuda(const msgd::cuda::HostPlan& plan, int64_t table, int64_t n_tensors, int64_t table_dev,
                     int64_t plan_dev, int64_t workspace, int64_t report, double lr, double momentum,
                     bool nesterov, double weight_decay, int adaptive, double curvature, double distance,
                     double psi_max_norm, int device, int64_t stream) {
  const msgd::StepOptions opt =
      step_options(lr, momentum, nesterov, weight_decay, adaptive, curvature, distance, psi_max_norm);
  // Guard block: the options, and the host copy of the table the caller uploaded
  // (its static columns must match the plan; the plan's groups were validated when built).
  if (n_tensors > 0 && !report) throw std::invalid_argument("null report address");
  if (n_tensors > 0 && (!table || !table_dev || !plan_dev || !workspace))
    throw std::invalid_argument("null table, plan or workspace address");
  std::string err = msgd::validate_tables(nullptr, 0, nullptr, 0, nullptr, 0, int(plan.layout.dtype), opt);
  if (err.empty()) err = msgd::cuda::check_step_table(plan, addr<int64_t>(table), n_tensors, opt);
  if (!err.empty()) throw std::invalid_argument(err);
  if (n_tensors == 0) return;
  py::gil_scoped_release release;
  msgd::fused_step_cuda(plan, addr<int64_t>(table_dev), reinterpret_cast<const void*>(plan_dev),
                        reinterpret_cast<void*>(workspace), reinterpret_cast<int64_t*>(report), opt, device,
                        reinterpret_cast<void*>(stream));
}
#endif

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
  d["cpu_parallel"] = msgd::parallel_backend();  // who runs the kernel's threads
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
#ifdef MANIFOLD_SGD_WITH_CUDA
  py::class_<msgd::cuda::HostPlan>(m, "CudaPlan",
                                   "The work list of the CUDA step for one bucket (csrc/cuda/fused_step_plan.h).")
      .def(py::init(&make_cuda_plan), py::arg("table"), py::arg("n_tensors"), py::arg("groups"),
           py::arg("n_groups"), py::arg("row_index"), py::arg("n_row_index"), py::arg("dtype"), py::arg("lr"),
           py::arg("momentum"), py::arg("nesterov"), py::arg("weight_decay"), py::arg("adaptive"),
           py::arg("curvature"), py::arg("distance"), py::arg("psi_max_norm"))
      .def("blob", [](const msgd::cuda::HostPlan& p) {
        return py::bytes(reinterpret_cast<const char*>(p.blob.data()), p.blob.size());
      }, "The bytes to upload once to the device (plan_dev of fused_step_cuda).")
      .def_property_readonly("workspace_bytes", [](const msgd::cuda::HostPlan& p) { return p.layout.ws_bytes; },
                             "Bytes of device workspace, zeroed once, reused by every step.")
      .def_property_readonly("launches", [](const msgd::cuda::HostPlan& p) { return p.launches; },
                             "Kernel launches per step (1 to 3).")
      .def_property_readonly("n_items", [](const msgd::cuda::HostPlan& p) {
        return py::make_tuple(p.layout.n_items[0], p.layout.n_items[1], p.layout.n_items[2]);
      }, "CTAs of each phase (pre-pass, main, split finish).")
      .def_property_readonly("grouped", [](const msgd::cuda::HostPlan& p) { return p.layout.grouped != 0; },
                             "Built for an adaptive step (groups honoured).");
  m.def("fused_step_cuda", &fused_step_cuda,
        "One fused step over a bucket of CUDA tensors. `table` is the host copy of the tensor table whose "
        "device copy `table_dev` the caller uploaded; `plan_dev` holds CudaPlan.blob(); `workspace` "
        "CudaPlan.workspace_bytes zeroed once; `report` (device int64, n_tensors x 2) is accumulated, "
        "not reset. Tensors flagged for stochastic rounding in the table (bfloat16 only) round their new "
        "weights with the bits of their rounding key. Runs on `stream` (cudaStream_t as int) and never "
        "synchronises.",
        py::arg("plan"), py::arg("table"), py::arg("n_tensors"), py::arg("table_dev"), py::arg("plan_dev"),
        py::arg("workspace"), py::arg("report"), py::arg("lr"), py::arg("momentum"), py::arg("nesterov"),
        py::arg("weight_decay"), py::arg("adaptive"), py::arg("curvature"), py::arg("distance"),
        py::arg("psi_max_norm"), py::arg("device"), py::arg("stream"));
#endif
  m.def("info", &info, "Build facts: version, whether CUDA kernels were compiled in, table layout.");
}
