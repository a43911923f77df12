#include <cmath>
#include <string>
#include <vector>

#include "step.h"
#include "stochastic_round.h"

namespace msgd {

namespace {
std::string tensor_msg(int64_t t, const std::string& what) {
  return "tensor " + std::to_string(t) + ": " + what;
}
}  // namespace

std::string validate_options(const StepOptions& opt) {
  if (int(opt.algorithm) < 0 || int(opt.algorithm) >= int(Algorithm::kCount)) return "unknown algorithm";
  if (int(opt.adaptive) < 0 || int(opt.adaptive) >= int(Adaptive::kCount)) return "unknown adaptive mode";
  if (int(opt.retraction) < 0 || int(opt.retraction) >= int(Retraction::kCount)) return "unknown retraction";
  if (!(std::isfinite(opt.lr) && opt.lr >= 0)) return "lr must be finite and >= 0";
  if (!(opt.momentum >= 0 && opt.momentum < 1)) return "momentum must be in [0, 1)";
  if (opt.nesterov && opt.momentum <= 0) return "nesterov needs momentum > 0";
  if (!(std::isfinite(opt.weight_decay) && opt.weight_decay >= 0))
    return "weight_decay must be finite and >= 0";
  if (!(opt.curvature >= 0 && std::isfinite(opt.curvature))) return "curvature must be finite and >= 0";
  if (!(opt.distance >= 0 && std::isfinite(opt.distance))) return "distance must be finite and >= 0";
  if (!(opt.psi_max_norm > 0)) return "psi_max_norm must be > 0";
  if (int(opt.second_moment) < 0 || int(opt.second_moment) >= int(SecondMoment::kCount))
    return "unknown second_moment";
  if (opt.algorithm == Algorithm::Adam) {
    if (!(opt.beta1 >= 0 && opt.beta1 < 1)) return "beta1 must be in [0, 1)";
    if (!(opt.beta2 >= 0 && opt.beta2 < 1)) return "beta2 must be in [0, 1)";
    if (!(opt.eps > 0 && std::isfinite(opt.eps))) return "eps must be finite and > 0";
    if (opt.adaptive != Adaptive::None) return "the adaptive step (FG-SGD) is SGD's: adaptive must be 'none' with Adam";
    if (opt.momentum != 0 || opt.nesterov) return "momentum and nesterov are SGD's: Adam's first moment uses beta1";
  }
  return {};
}

std::string validate_tables(const StepTables& tables, const StepOptions& opt) {
  const int64_t* table = tables.table;
  const int64_t* groups = tables.groups;
  const int64_t* row_index = tables.row_index;
  const int64_t n_tensors = tables.n_tensors, n_groups = tables.n_groups, n_row_index = tables.n_row_index;
  if (tables.dtype < 0 || tables.dtype > int(DType::Float16)) return "unknown dtype tag " + std::to_string(tables.dtype);
  if (n_tensors < 0 || n_groups < 0 || n_row_index < 0) return "negative table size";
  if (n_tensors > 0 && (!table || !groups || !row_index)) return "null table pointer";

  int64_t total_rows = 0;
  std::vector<int64_t> row_base(size_t(n_tensors) + 1, 0);
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t* e = table + t * kTensorFields;
    if (!e[kParam] || !e[kGrad]) return tensor_msg(t, "null parameter or gradient address");
    if (opt.algorithm == Algorithm::Adam) {
      if (!e[kMomentum] || !e[kSecondMoment]) return tensor_msg(t, "Adam needs first and second moment buffers");
      if (e[kStepCount] < 1) return tensor_msg(t, "Adam's step count must be >= 1");
      if (e[kKind] == int64_t(Kind::Psi)) return tensor_msg(t, "PSI rows have no Adam step (SPEC §6)");
    } else {
      if ((opt.momentum > 0) != (e[kMomentum] != 0))
        return tensor_msg(t, "a momentum buffer is needed exactly when momentum > 0");
      if (e[kSecondMoment] || e[kStepCount]) return tensor_msg(t, "second moment and step count are Adam's");
    }
    if (e[kRows] < 1 || e[kRowLen] < 1) return tensor_msg(t, "rows and row length must be >= 1");
    if (e[kKind] < 0 || e[kKind] >= int64_t(Kind::kCount)) return tensor_msg(t, "unknown manifold kind");
    if (e[kKind] == int64_t(Kind::Stiefel)) {
      int64_t p = e[kBlockRows];
      if (p < 1 || p > kMaxStiefelRows || e[kRowLen] % p != 0 || e[kRowLen] / p < p)
        return tensor_msg(t, "a Stiefel block needs 1 <= p <= " + std::to_string(kMaxStiefelRows) +
                                 " rows and p <= n columns");
    } else if (e[kBlockRows] != 1) {
      return tensor_msg(t, "block rows must be 1 for a row manifold");
    }
    if (e[kFlags] & ~int64_t(kKnownFlags)) return tensor_msg(t, "unknown flags");
    if ((e[kFlags] & kColumns) && e[kKind] == int64_t(Kind::Stiefel))
      return tensor_msg(t, "column rows (kColumns) are for row manifolds; a Stiefel block is stepped whole");
    if ((e[kFlags] & kStochasticRound) && tables.dtype != int(DType::BFloat16))
      return tensor_msg(t, "stochastic rounding applies to bfloat16 parameters only");
    total_rows += e[kRows];
    row_base[size_t(t) + 1] = total_rows;
  }
  if (total_rows != n_row_index) return "row index table does not cover every row once";

  // the group table and row index were checked with these sizes and row counts already
  uint64_t digest = mix64(uint64_t(n_tensors) ^ mix64(uint64_t(n_groups) ^ mix64(uint64_t(n_row_index))));
  digest = mix64(digest ^ uint64_t(reinterpret_cast<uintptr_t>(groups)));
  digest = mix64(digest ^ uint64_t(reinterpret_cast<uintptr_t>(row_index)));
  for (int64_t t = 0; t < n_tensors; ++t) digest = mix64(digest ^ uint64_t(table[t * kTensorFields + kRows]));
  digest |= 1;  // never 0, the unchecked value
  if (tables.groups_checked == digest) return {};

  // every row of every tensor belongs to exactly one group
  std::vector<unsigned char> seen(size_t(total_rows), 0);
  for (int64_t k = 0; k < n_groups; ++k) {
    const int64_t* gr = groups + k * kGroupFields;
    int64_t t = gr[kGroupTensor], start = gr[kGroupStart], count = gr[kGroupCount];
    if (t < 0 || t >= n_tensors) return "group " + std::to_string(k) + ": bad tensor index";
    if (count < 1 || start < 0 || start + count > n_row_index)
      return tensor_msg(t, "group " + std::to_string(k) + " has a bad row range");
    int64_t rows = table[t * kTensorFields + kRows];
    for (int64_t j = start; j < start + count; ++j) {
      int64_t r = row_index[j];
      if (r < 0 || r >= rows) return tensor_msg(t, "row " + std::to_string(r) + " out of range");
      auto& s = seen[size_t(row_base[size_t(t)] + r)];
      if (s) return tensor_msg(t, "row " + std::to_string(r) + " is in two groups");
      s = 1;
    }
  }
  for (int64_t t = 0; t < n_tensors; ++t)
    for (int64_t r = row_base[size_t(t)]; r < row_base[size_t(t) + 1]; ++r)
      if (!seen[size_t(r)])
        return tensor_msg(t, "row " + std::to_string(r - row_base[size_t(t)]) + " is in no group");
  tables.groups_checked = digest;
  return {};
}

}  // namespace msgd
