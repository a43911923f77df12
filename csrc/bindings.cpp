// pybind11 module manifold_sgd._C: the native entry points. Addresses arrive as
// integers (Python packs them from torch tensors); nothing here links libtorch.
// Errors: std::invalid_argument becomes ValueError in Python.
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "core/step.h"
#include "cpu/adam_cpu.h"
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

// ---- the options record: enum fields by name ------------------------------------------

template <typename E, size_t N>
E enum_from_name(const char* const (&names)[N], const std::string& name, const char* what) {
  for (size_t i = 0; i < N; ++i)
    if (name == names[i]) return E(i);
  std::string known;
  for (size_t i = 0; i < N; ++i) known += (i ? ", '" : "'") + std::string(names[i]) + "'";
  throw std::invalid_argument(std::string("unknown ") + what + " '" + name + "' (expected one of " + known + ")");
}

template <typename E, size_t N>
std::string enum_name(const char* const (&names)[N], E value) {
  const auto i = size_t(value);
  return i < N ? names[i] : "<invalid " + std::to_string(int64_t(value)) + ">";
}

py::list names_of(const char* const* names, size_t n) {
  py::list out;
  for (size_t i = 0; i < n; ++i) out.append(names[i]);
  return out;
}

msgd::StepOptions make_options(const std::string& algorithm, double lr, double momentum, bool nesterov,
                               double weight_decay, const std::string& adaptive, double curvature,
                               double distance, double psi_max_norm, const std::string& retraction,
                               double beta1, double beta2, double eps, const std::string& second_moment) {
  msgd::StepOptions opt;
  opt.algorithm = enum_from_name<msgd::Algorithm>(msgd::kAlgorithmNames, algorithm, "algorithm");
  opt.lr = lr;
  opt.momentum = momentum;
  opt.nesterov = nesterov;
  opt.weight_decay = weight_decay;
  opt.adaptive = enum_from_name<msgd::Adaptive>(msgd::kAdaptiveNames, adaptive, "adaptive mode");
  opt.curvature = curvature;
  opt.distance = distance;
  opt.psi_max_norm = psi_max_norm;
  opt.retraction = enum_from_name<msgd::Retraction>(msgd::kRetractionNames, retraction, "retraction");
  opt.beta1 = beta1;
  opt.beta2 = beta2;
  opt.eps = eps;
  opt.second_moment = enum_from_name<msgd::SecondMoment>(msgd::kSecondMomentNames, second_moment, "second_moment");
  return opt;
}

// ---- the guard block every entry runs first --------------------------------------------

void guard(const msgd::StepOptions& opt, const msgd::StepTables* tables) {
  std::string err = msgd::validate_options(opt);
  if (err.empty() && tables) err = msgd::validate_tables(*tables, opt);
  if (!err.empty()) throw std::invalid_argument(err);
}

void fused_step_cpu(const msgd::StepTables& tables, const msgd::StepOptions& opt, int64_t report,
                    int num_threads) {
  guard(opt, &tables);
  if (tables.n_tensors > 0 && !report) throw std::invalid_argument("null report address");
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  if (tables.n_tensors == 0) return;
  py::gil_scoped_release release;
  auto* rep = reinterpret_cast<int64_t*>(report);
  if (opt.algorithm == msgd::Algorithm::Adam)
    msgd::fused_adam_cpu(tables.table, tables.n_tensors, msgd::DType(tables.dtype), opt, rep, num_threads);
  else
    msgd::fused_step_cpu(tables.table, tables.n_tensors, tables.groups, tables.n_groups, tables.row_index,
                         msgd::DType(tables.dtype), opt, rep, num_threads);
}

#ifdef MANIFOLD_SGD_WITH_CUDA
// The CUDA plan of one bucket: built from host tables (fully validated here,
// with the options of the step it is built for), uploaded once by Python.
std::unique_ptr<msgd::cuda::HostPlan> make_cuda_plan(const msgd::StepTables& tables,
                                                     const msgd::StepOptions& opt) {
  guard(opt, &tables);
  auto plan = std::make_unique<msgd::cuda::HostPlan>();
  const std::string err = opt.algorithm == msgd::Algorithm::Adam
                              ? msgd::cuda::build_adam_plan(tables, *plan)
                              : msgd::cuda::build_plan(tables, opt.adaptive != msgd::Adaptive::None, *plan);
  if (!err.empty()) throw std::invalid_argument(err);
  return plan;
}

// `tables` is the host copy of the tensor table the caller uploaded to `table_dev` (its static
// columns must match the plan; the plan's groups were validated when it was built).
void fused_step_cuda(const msgd::cuda::HostPlan& plan, const msgd::StepTables& tables, int64_t table_dev,
                     int64_t plan_dev, int64_t workspace, int64_t report, const msgd::StepOptions& opt,
                     int device, int64_t stream) {
  guard(opt, nullptr);
  if ((opt.algorithm == msgd::Algorithm::Adam) != plan.adam)
    throw std::invalid_argument(std::string("the plan was built for the ") + (plan.adam ? "adam" : "sgd") +
                                " step, the options are " + msgd::kAlgorithmNames[int(opt.algorithm)] +
                                "'s: build a plan for this step");
  const int64_t n_tensors = tables.n_tensors;
  if (n_tensors > 0 && !report) throw std::invalid_argument("null report address");
  if (n_tensors > 0 && (!tables.table || !table_dev || !plan_dev || !workspace))
    throw std::invalid_argument("null table, plan or workspace address");
  const std::string err = plan.adam ? msgd::cuda::check_adam_step_table(plan, tables.table, n_tensors, opt)
                                    : msgd::cuda::check_step_table(plan, tables.table, n_tensors, opt);
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
  // the names behind the codes of the tables' kind column and of the options' enum fields
  d["kinds"] = names_of(msgd::kKindNames, size_t(msgd::Kind::kCount));
  d["algorithms"] = names_of(msgd::kAlgorithmNames, size_t(msgd::Algorithm::kCount));
  d["adaptive_modes"] = names_of(msgd::kAdaptiveNames, size_t(msgd::Adaptive::kCount));
  d["retractions"] = names_of(msgd::kRetractionNames, size_t(msgd::Retraction::kCount));
  d["second_moments"] = names_of(msgd::kSecondMomentNames, size_t(msgd::SecondMoment::kCount));
  d["cpu_variant"] = msgd::cpu_variant();
  d["cpu_parallel"] = msgd::parallel_backend();  // who runs the kernel's threads
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "manifold_sgd native kernels (fused manifold SGD steps on raw buffers)";
  py::class_<msgd::StepOptions>(m, "StepOptions",
                                "The options of one step (csrc/core/step.h), passed whole to every entry, "
                                "which checks them first. Enum fields are read and set by name.")
      .def(py::init(&make_options), py::kw_only(), py::arg("algorithm") = "sgd", py::arg("lr") = 0.0,
           py::arg("momentum") = 0.0, py::arg("nesterov") = false, py::arg("weight_decay") = 0.0,
           py::arg("adaptive") = "none", py::arg("curvature") = 1.0, py::arg("distance") = 1.0,
           py::arg("psi_max_norm") = 1e4, py::arg("retraction") = "qr", py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("second_moment") = "row")
      .def_property(
          "algorithm", [](const msgd::StepOptions& o) { return enum_name(msgd::kAlgorithmNames, o.algorithm); },
          [](msgd::StepOptions& o, const std::string& v) {
            o.algorithm = enum_from_name<msgd::Algorithm>(msgd::kAlgorithmNames, v, "algorithm");
          })
      .def_readwrite("lr", &msgd::StepOptions::lr)
      .def_readwrite("momentum", &msgd::StepOptions::momentum)
      .def_readwrite("nesterov", &msgd::StepOptions::nesterov)
      .def_readwrite("weight_decay", &msgd::StepOptions::weight_decay)
      .def_property(
          "adaptive", [](const msgd::StepOptions& o) { return enum_name(msgd::kAdaptiveNames, o.adaptive); },
          [](msgd::StepOptions& o, const std::string& v) {
            o.adaptive = enum_from_name<msgd::Adaptive>(msgd::kAdaptiveNames, v, "adaptive mode");
          })
      .def_readwrite("curvature", &msgd::StepOptions::curvature)
      .def_readwrite("distance", &msgd::StepOptions::distance)
      .def_readwrite("psi_max_norm", &msgd::StepOptions::psi_max_norm)
      .def_property(
          "retraction",
          [](const msgd::StepOptions& o) { return enum_name(msgd::kRetractionNames, o.retraction); },
          [](msgd::StepOptions& o, const std::string& v) {
            o.retraction = enum_from_name<msgd::Retraction>(msgd::kRetractionNames, v, "retraction");
          })
      .def_readwrite("beta1", &msgd::StepOptions::beta1)
      .def_readwrite("beta2", &msgd::StepOptions::beta2)
      .def_readwrite("eps", &msgd::StepOptions::eps)
      .def_property(
          "second_moment",
          [](const msgd::StepOptions& o) { return enum_name(msgd::kSecondMomentNames, o.second_moment); },
          [](msgd::StepOptions& o, const std::string& v) {
            o.second_moment = enum_from_name<msgd::SecondMoment>(msgd::kSecondMomentNames, v, "second_moment");
          })
      .def("validate", [](const msgd::StepOptions& o) { return msgd::validate_options(o); },
           "The check every entry runs: an empty string, or what is wrong.");
  py::class_<msgd::StepTables>(m, "StepTables",
                               "Addresses and sizes of a bucket's int64 tables (tensor table, group table, "
                               "row index; csrc/core/step.h) and the dtype tag of its tensors.")
      .def(py::init([](int64_t table, int64_t n_tensors, int64_t groups, int64_t n_groups, int64_t row_index,
                       int64_t n_row_index, int dtype) {
             return msgd::StepTables{addr<int64_t>(table), n_tensors, addr<int64_t>(groups), n_groups,
                                     addr<int64_t>(row_index), n_row_index, dtype};
           }),
           py::arg("table"), py::arg("n_tensors"), py::arg("groups"), py::arg("n_groups"), py::arg("row_index"),
           py::arg("n_row_index"), py::arg("dtype"))
      .def_readonly("n_tensors", &msgd::StepTables::n_tensors)
      .def_readonly("n_groups", &msgd::StepTables::n_groups)
      .def_readonly("n_row_index", &msgd::StepTables::n_row_index)
      .def_readonly("dtype", &msgd::StepTables::dtype);
  m.def("fused_step_cpu", &fused_step_cpu,
        "One fused step over a bucket of host tensors described by `tables` (layout in csrc/core/step.h), "
        "writing the (n_tensors x 2) int64 skip report at `report`. Validates the options and every table "
        "entry before writing.",
        py::arg("tables"), py::arg("options"), py::arg("report"), py::arg("num_threads"));
#ifdef MANIFOLD_SGD_WITH_CUDA
  py::class_<msgd::cuda::HostPlan>(m, "CudaPlan",
                                   "The work list of the CUDA step for one bucket (csrc/cuda/fused_step_plan.h).")
      .def(py::init(&make_cuda_plan), py::arg("tables"), py::arg("options"))
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
                             "Built for an adaptive step (groups honoured).")
      .def_property_readonly("algorithm", [](const msgd::cuda::HostPlan& p) { return p.adam ? "adam" : "sgd"; },
                             "The step the plan was built for (the options' algorithm).");
  m.def("fused_step_cuda", &fused_step_cuda,
        "One fused step over a bucket of CUDA tensors. `tables` describes the host copy of the tensor table "
        "whose device copy `table_dev` the caller uploaded; `plan_dev` holds CudaPlan.blob(); `workspace` "
        "CudaPlan.workspace_bytes zeroed once; `report` (device int64, n_tensors x 2) is accumulated, "
        "not reset. Tensors flagged for stochastic rounding in the table (bfloat16 only) round their new "
        "weights with the bits of their rounding key. Runs on `stream` (cudaStream_t as int) and never "
        "synchronises.",
        py::arg("plan"), py::arg("tables"), py::arg("table_dev"), py::arg("plan_dev"), py::arg("workspace"),
        py::arg("report"), py::arg("options"), py::arg("device"), py::arg("stream"));
  m.def("cuda_versions", []() {
    int driver = 0, runtime = 0;
    const std::string err = msgd::cuda_versions(&driver, &runtime);
    py::dict d;
    d["driver"] = driver;
    d["runtime"] = runtime;
    d["error"] = err;
    return d;
  }, "The CUDA version the driver supports (0: no driver) and that of the runtime linked in (static), "
     "as 1000 * major + 10 * minor, and an error description ('' when both calls succeeded). Creates no "
     "CUDA context and needs no GPU.");
#endif
  m.def("info", &info, "Build facts: version, whether CUDA kernels were compiled in, table layout, enum names.");
}
