// The step description shared by every backend: the tensor table, the group
// table, the scalar options, validation, and the scalar formulas of SPEC.md.
// Nothing here knows torch; pointers arrive as integers from Python.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "dtypes.h"
#include "stiefel.h"

namespace msgd {

// Every enum that crosses the boundary ends in kCount: validation takes its bounds from
// there, and each has its names (the strings Python uses) in one table beside it.

// SPEC §2: how a row's Riemannian gradient, retraction and transport are made.
enum class Kind : int64_t { Euclidean = 0, Sphere = 1, Psi = 2, Stiefel = 3, kCount };
constexpr const char* kKindNames[] = {"euclidean", "sphere", "psi", "stiefel"};
// SPEC §3 step 2.
enum class Adaptive : int { None = 0, Sphere = 1, General = 2, kCount };
constexpr const char* kAdaptiveNames[] = {"none", "sphere", "general"};
// The update rule that forms a row's direction from its Riemannian gradient and state:
// SGD with momentum (SPEC §3). The Adam family (SPEC §6) adds a value here.
enum class Algorithm : int { Sgd = 0, Adam = 1, kCount };
constexpr const char* kAlgorithmNames[] = {"sgd", "adam"};
// Adam (SPEC §6): where a manifold row keeps its second moment. Euclidean rows are AdamW and
// keep one per element whatever this says.
enum class SecondMoment : int { Row = 0, Element = 1, kCount };
constexpr const char* kSecondMomentNames[] = {"row", "element"};

static_assert(sizeof(kKindNames) / sizeof(kKindNames[0]) == size_t(Kind::kCount), "kKindNames");
static_assert(sizeof(kAdaptiveNames) / sizeof(kAdaptiveNames[0]) == size_t(Adaptive::kCount), "kAdaptiveNames");
static_assert(sizeof(kAlgorithmNames) / sizeof(kAlgorithmNames[0]) == size_t(Algorithm::kCount),
              "kAlgorithmNames");
static_assert(sizeof(kSecondMomentNames) / sizeof(kSecondMomentNames[0]) == size_t(SecondMoment::kCount),
              "kSecondMomentNames");

// One row of the tensor table (an int64 matrix built in Python, one row per tensor).
enum TensorField : int {
  kParam = 0,     // address of the parameter storage (rows x row_len, contiguous)
  kGrad,          // address of its gradient (same layout and dtype)
  kMomentum,      // address of the momentum buffer (math type), 0 without momentum
  kRows,          // number of rows
  kRowLen,        // elements per row
  kKind,          // Kind
  kFlags,         // TensorFlag bits
  kRadius,        // address of a float32 per-row radius, 0 for radius 1
  kBlockRows,     // Stiefel: rows p of each p x (row_len / p) block; 1 otherwise
  kRoundingKey,   // with kStochasticRound: the 64-bit key of stochastic_round.h (bits as int64)
  kSecondMoment,  // Adam: address of v (math type): one per row (per Stiefel block) with
                  // SecondMoment::Row on manifold rows, else one per element; 0 for SGD
  kStepCount,     // Adam: the parameter's step count t of this step (>= 1; bias corrections); 0 for SGD
  kTensorFields
};
enum TensorFlag : int64_t {
  kMomentumFresh = 1,    // the buffer holds no history yet: first step sets m = d
  kStochasticRound = 2,  // bfloat16 only: write w with to_bf16_stochastic, bits from
                         // sr_bits16(kRoundingKey, row * row_len + column)
  kColumns = 4,          // granularity "column": the rows are the columns of the row-major
                         // (row_len x rows) matrix: element j of row i at j * rows + i (w, g, m
                         // and an element-wise v alike); the rounding index stays
                         // row * row_len + j (the index in W^T). Row manifolds, CPU kernels only.
  kKnownFlags = kMomentumFresh | kStochasticRound | kColumns,
};

// One row of the group table: rows row_index[start .. start+count) of tensor `tensor`
// share one adaptive step (SPEC §1). Every row of every tensor is in exactly one group.
enum GroupField : int { kGroupTensor = 0, kGroupStart, kGroupCount, kGroupFields };

// Per-tensor report written by the kernel: rows left unchanged because a
// gradient or a result was not finite, and the first such row (-1 if none).
enum ReportField : int { kSkippedRows = 0, kFirstSkippedRow, kReportFields };

// The options record of one step: built once on the Python side (bindings.cpp binds it as
// _C.StepOptions) and passed whole to every native entry, which checks it with
// validate_options before anything else.
struct StepOptions {
  Algorithm algorithm = Algorithm::Sgd;
  double lr = 0.0;
  double momentum = 0.0;
  bool nesterov = false;
  double weight_decay = 0.0;  // Euclidean rows only (SPEC §2)
  Adaptive adaptive = Adaptive::None;
  double curvature = 1.0;     // c_G of eq. 5
  double distance = 1.0;      // delta_G of eq. 5
  double psi_max_norm = 1e4;  // PSI renormalisation guard
  Retraction retraction = Retraction::Qr;  // Stiefel blocks
  // Adam (SPEC §6); momentum, nesterov, adaptive and psi_max_norm are SGD's
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  SecondMoment second_moment = SecondMoment::Row;
};

// Whether a manifold row of this kind keeps one second moment per row (SPEC §6 "row").
MSGD_HD bool row_second_moment(Kind k, SecondMoment s) {
  return k != Kind::Euclidean && s == SecondMoment::Row;
}

// SPEC §3 step 2: the group's step scale s_G = 1 / r_G from R_G^2 = sum ||g~_i||^2.
template <typename A>
MSGD_HD A adaptive_scale(Adaptive mode, A sum_sq, A curvature, A distance) {
  if (mode == Adaptive::None) return A(1);
  A R = sqrt(sum_sq);
  A r;
  if (mode == Adaptive::Sphere) {
    r = R * (A(2) + R);  // eq. 7
    r = r > A(1) ? r : A(1);
  } else {  // eq. 5
    A a = A(2) * distance + R;
    A b = A(1) + curvature * (distance + R);
    A inner = a * a > b ? a * a : b;
    A q = R * R * inner;
    r = sqrt(q > A(1) ? q : A(1));
  }
  return A(1) / r;
}

// Whether adaptive scaling applies to rows of this kind: FG-SGD scales steps on
// the component manifolds; Euclidean rows (biases, gains) keep s = 1.
MSGD_HD bool kind_is_adaptive(Kind k) { return k != Kind::Euclidean; }

// The tables of one bucket as they cross the boundary: addresses of int64 arrays (the
// tensor table, the group table, the row index; layouts above) and their sizes, and the
// dtype tag of every tensor in them.
struct StepTables {
  const int64_t* table = nullptr;
  int64_t n_tensors = 0;
  const int64_t* groups = nullptr;
  int64_t n_groups = 0;
  const int64_t* row_index = nullptr;
  int64_t n_row_index = 0;
  int dtype = 0;  // DType
  // Set by validate_tables once the group table and row index passed, to a digest of what
  // their check read besides them (their addresses and sizes, every tensor's row count). The
  // tables of a bucket are packed once and never rewritten, so later steps with the same
  // digest skip that check: it reads every row's entries (kernel-granular tensors have one
  // group per row, millions of them, and would spend more time there than in the step).
  mutable uint64_t groups_checked = 0;
};

// The one check of a step's options, run by every native entry first. Returns an empty
// string when they are usable, else a message naming the option.
std::string validate_options(const StepOptions& opt);

// The validation every native entry runs before touching memory. Returns an
// empty string when the tables are consistent, else a message naming the tensor.
std::string validate_tables(const StepTables& t, const StepOptions& opt);

}  // namespace msgd
