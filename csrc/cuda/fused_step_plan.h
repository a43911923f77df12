// The CUDA step's plan: the work list the kernels walk, built once on the host
// from the (validated) tensor/group tables and uploaded once.
//
// Every CTA has kBlock threads and takes one work item. A row of n elements is
// held in registers by a team of `lanes` threads (K elements per thread:
// slots_per_thread, K = 16 for float math, 8 for double), the smallest tier with
// lanes*K >= n:
//
//   tier    0   1   2    3     4        split
//   lanes   1   4   32   128   512      one CTA per chunk of 512*K elements
//   float   16  64  512  2048  8192     > 8192
//   double  8   32  256  1024  4096     > 4096
//
// Item kinds (phase: 1 = pre-pass, 2 = main, 3 = split finish):
//   Range      (2)    kBlock/lanes consecutive rows of one tensor, rows independent
//   Groups     (2)    whole adaptive groups that fit one CTA (one team per row):
//                     the group norm is summed on chip; one read of the rows
//   GroupSlice (1, 2) a slice of an adaptive group too large for one CTA:
//                     phase 1 writes each row's ||g~||^2; the CTA that completes
//                     the group (integer counter) sums them in row order into
//                     s_G; phase 2 steps the rows with s_G (rows w, g read twice)
//   Split      (1,2,3) one chunk of a row longer than a tier-4 team holds:
//                     phase 1 partial <w,w>,<w,g>,<g,g>; phase 2 the moved
//                     chunk's partial sums; phase 3 rewrites it with the finish.
//                     The CTA completing a row combines its chunks in chunk
//                     order. Rows w, g are read 3 times, m twice (L2 if it fits).
//   Columns    (1, 2) up to 32 adjacent columns of a kColumns tensor (granularity
//                     "column": rows are the columns of a row-major d0 x d1 matrix):
//                     lane l of every warp owns column c0 + l, the 16 warps stride over
//                     d0, so each warp's loads are 32 adjacent elements; per-column sums
//                     combine the warps' partials in warp order (no atomics). The columns
//                     are read three times (sums, moved sums, write). Adaptive: phase 1
//                     publishes each column's ||g~||^2 (grouping row or tensor only).
// Launches per bucket: phase 2 always; phase 1 only with GroupSlice or Split
// items; phase 3 only with Split items of non-Euclidean rows. At most 3: a long
// row (Split) of a sphere or PSI tensor takes all three even without an adaptive
// step. A step
// with phase 1 also issues one cudaMemsetAsync (before its first launch) that
// clears the completion counters (group_count, split_count: one contiguous
// region), so a counter left nonzero by a failed step cannot poison later ones.
// Kinds: Euclidean, Sphere, Psi; Stiefel blocks of p <= 32 rows as kItemStiefel items
// (fused_stiefel_plan.h: one block per thread); larger blocks are refused (reference path).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../core/step.h"

namespace msgd {
namespace cuda {

constexpr int kBlock = 512;
constexpr int kWarps = kBlock / 32;
constexpr int kTiers = 5;

MSGD_HD constexpr int tier_lanes(int tier) {
  return tier == 0 ? 1 : tier == 1 ? 4 : tier == 2 ? 32 : tier == 3 ? 128 : kBlock;
}
constexpr int slots_per_thread(DType d) { return d == DType::Float64 ? 8 : 16; }
constexpr int storage_bytes(DType d) {
  return d == DType::Float64 ? 8 : d == DType::Float32 ? 4 : 2;
}
constexpr int math_bytes(DType d) { return d == DType::Float64 ? 8 : 4; }

enum ItemKind : int32_t { kItemRange = 0, kItemGroups = 1, kItemGroupSlice = 2, kItemSplit = 3, kItemColumns = 4,
                          kItemStiefel = 5 };
// kItemStiefel items: what `tier` holds (fused_stiefel_plan.h)
enum StiefelItem : int32_t { kStiefelRange = 0, kStiefelGroups = 1, kStiefelSlice = 2 };
constexpr int kColumnsPerItem = 32;  // one column per lane of a warp

struct Item {
  int32_t kind;    // ItemKind
  int32_t tier;    // team tier (Split: 4)
  int32_t tensor;  // tensor index in the table
  int32_t count;   // rows (teams) used: Range, Groups, GroupSlice; Split: chunks of the row
  int64_t row;     // Range: first row; Split: the row; Columns: first column
  int64_t group;   // GroupSlice, Split in an adaptive group: group index; else -1
  int64_t pos;     // GroupSlice: row_index position of the first row; Split: the row's
                   // row_index position (adaptive) or -1; Groups: first TeamSlot;
                   // Columns: row_index position of the tensor's column 0 (adaptive)
  int64_t split;   // Split: split-row id; Columns: 1 when every column is its own group
  int64_t chunk;   // Split: chunk index within the row
  int64_t slot;    // Split: partial-sum slot of this chunk (row's first slot + chunk)
};
static_assert(sizeof(Item) == 64, "Item layout");

// Groups items: the row of each team and where its group's teams are in the item.
struct TeamSlot {
  int64_t row;
  int32_t first;  // team index of the group's first row
  int32_t count;  // rows in the group
};
static_assert(sizeof(TeamSlot) == 16, "TeamSlot layout");

// Byte offsets into the plan blob (uploaded once) and the workspace (zeroed once).
struct PlanLayout {
  int64_t items[3];    // item array of phase 1, 2, 3
  int64_t n_items[3];
  int64_t slots;       // TeamSlot array
  int64_t groups;      // copy of the group table
  int64_t row_index;   // copy of the row index
  int64_t blob_bytes;
  int64_t row_tan;     // per row_index position: ||g~||^2 (math type)
  int64_t row_ok;      // per row_index position: int32 direction finite
  int64_t group_scale;  // per group: s_G (math type)
  int64_t group_ok;    // per group: int32, every row finite
  int64_t group_count;  // per group: uint32 arrival counter (rows)
  int64_t split_count;  // per split row: uint32 arrival counter (chunks); the counters
                        // are [group_count, split_row) in bytes, cleared at each step's start
  int64_t split_row;   // per split row: 8 math-type values {a, b, dir_ok, f, p, q, fin_ok, 0}
  int64_t partial;     // per chunk: 4 math-type partial sums
  int64_t stiefel;     // Stiefel blocks without a fixed-size kernel path: their scratch
  int64_t ws_bytes;
  int64_t n_split;
  int64_t n_chunks;
  int64_t dtype;
  int64_t grouped;     // 1: adaptive groups honoured (plan for adaptive != none)
};

// A built plan: the blob to upload, its layout, and the static table columns
// it was built from (each step checks the table still matches them).
struct HostPlan {
  PlanLayout layout{};
  std::vector<unsigned char> blob;
  int64_t n_tensors = 0, n_groups = 0, n_row_index = 0;
  std::vector<int64_t> statics;  // per tensor: rows, row_len, kind, radius, kColumns flag
  int64_t launches = 0;
  // the Adam family's plan (fused_adam_plan.h): its step, and the byte offset in the workspace
  // of its split rows' partial sums
  bool adam = false;
  int64_t adam_partial = 0;
};

constexpr int kStatics = 5;  // HostPlan::statics per tensor

// The items of Stiefel tensor t (fused_stiefel_plan.h, included at the end of this file).
inline std::string plan_stiefel_tensor(const StepTables& tables, int64_t t, bool grp,
                                       const std::vector<int64_t>& groups_of_t, std::vector<Item>* items,
                                       std::vector<TeamSlot>& slots, bool& need_rows, int64_t& scratch_elems);

namespace detail {
inline int64_t align16(int64_t x) { return (x + 15) & ~int64_t(15); }
}  // namespace detail

// Lays out the adaptive groups of one tensor (`groups_of_t`, indices into tables.groups) in CTAs of
// `capacity` rows (the teams of a tier, or Stiefel threads). A group that fits a CTA joins the open
// one whole, a TeamSlot per row (the row, the group's first slot in the CTA, its rows); the open
// CTA is emitted, `packed(first_slot, rows)`, when the next group does not fit, and at the end. A
// larger group is cut into slices of up to `capacity` rows, `slice(group, pos, rows)` for rows
// row_index[pos, pos + rows). Returns whether any group was sliced (its rows' ||g~||^2 then go
// through the workspace).
template <typename Packed, typename Slice>
inline bool pack_groups(const StepTables& tables, const std::vector<int64_t>& groups_of_t, int64_t capacity,
                        std::vector<TeamSlot>& slots, Packed packed, Slice slice) {
  bool sliced = false;
  int64_t open_first = int64_t(slots.size()), open_rows = 0;
  auto flush = [&]() {
    if (open_rows == 0) return;
    packed(open_first, open_rows);
    open_first = int64_t(slots.size());
    open_rows = 0;
  };
  for (int64_t k : groups_of_t) {
    const int64_t start = tables.groups[k * kGroupFields + kGroupStart];
    const int64_t cnt = tables.groups[k * kGroupFields + kGroupCount];
    if (cnt <= capacity) {
      if (open_rows + cnt > capacity) flush();
      for (int64_t j = 0; j < cnt; ++j)
        slots.push_back(TeamSlot{tables.row_index[start + j], int32_t(open_rows), int32_t(cnt)});
      open_rows += cnt;
    } else {
      sliced = true;
      for (int64_t j0 = 0; j0 < cnt; j0 += capacity) slice(k, start + j0, std::min(capacity, cnt - j0));
    }
  }
  flush();
  return sliced;
}

// Builds the plan. The tables must have passed validate_tables. Returns an
// error message, or an empty string on success.
inline std::string build_plan(const StepTables& tables, bool grouped, HostPlan& out) {
  const int64_t* table = tables.table;
  const int64_t* groups = tables.groups;
  const int64_t* row_index = tables.row_index;
  const int64_t n_tensors = tables.n_tensors, n_groups = tables.n_groups, n_row_index = tables.n_row_index;
  const DType dtype = DType(tables.dtype);
  const int64_t K = slots_per_thread(dtype);
  const int64_t chunk = int64_t(kBlock) * K;
  const int64_t A = math_bytes(dtype);
  std::vector<Item> items[3];
  std::vector<TeamSlot> slots;
  std::vector<std::vector<int64_t>> groups_of(static_cast<size_t>(n_tensors));
  for (int64_t k = 0; k < n_groups; ++k) groups_of[size_t(groups[k * kGroupFields + kGroupTensor])].push_back(k);
  if (n_tensors > INT32_MAX) return "too many tensors in one bucket";

  int64_t n_split = 0, n_chunks = 0, stiefel_elems = 0;
  bool need_rows = false;  // per-row ||g~||^2 slots (GroupSlice or adaptive Split)
  out.statics.assign(size_t(n_tensors) * kStatics, 0);
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t* e = table + t * kTensorFields;
    const int64_t rows = e[kRows], n = e[kRowLen];
    const Kind kind = Kind(e[kKind]);
    if (kind == Kind::Stiefel) {  // one thread per block (fused_stiefel_kernels.cuh)
      const std::string err = plan_stiefel_tensor(tables, t, grouped, groups_of[size_t(t)], items, slots,
                                                  need_rows, stiefel_elems);
      if (!err.empty()) return err;
    }
    out.statics[size_t(t) * kStatics + 0] = rows;
    out.statics[size_t(t) * kStatics + 1] = n;
    out.statics[size_t(t) * kStatics + 2] = e[kKind];
    out.statics[size_t(t) * kStatics + 3] = e[kRadius];
    out.statics[size_t(t) * kStatics + 4] = e[kFlags] & kColumns;
    if (kind == Kind::Stiefel) continue;
    const bool grp = grouped && kind_is_adaptive(kind);
    if (e[kFlags] & kColumns) {  // tiles of adjacent columns
      int64_t group0 = -1, pos0 = -1, per_column = 0;
      if (grp) {  // grouping "row" (a group per column) or "tensor" (one group), rows in order
        const std::vector<int64_t>& gs = groups_of[size_t(t)];
        pos0 = gs.empty() ? -1 : groups[gs[0] * kGroupFields + kGroupStart];
        bool ok = !gs.empty() && (int64_t(gs.size()) == rows || gs.size() == 1);
        per_column = int64_t(gs.size()) == rows && rows > 1 ? 1 : 0;
        for (size_t j = 0; ok && j < gs.size(); ++j)
          ok = gs[j] == gs[0] + int64_t(j) && groups[gs[j] * kGroupFields + kGroupStart] == pos0 + int64_t(j) * per_column;
        for (int64_t c = 0; ok && c < rows; ++c) ok = row_index[pos0 + c] == c;
        if (!ok)
          return "tensor " + std::to_string(t) +
                 ": column rows with an adaptive step need grouping 'row' or 'tensor' (rows in order)";
        group0 = gs[0];
        need_rows = true;
      }
      for (int64_t c0 = 0; c0 < rows; c0 += kColumnsPerItem) {
        const Item it{kItemColumns, 0, int32_t(t), int32_t(std::min<int64_t>(kColumnsPerItem, rows - c0)), c0,
                      group0, pos0, per_column, 0, 0};
        if (grp) items[0].push_back(it);
        items[1].push_back(it);
      }
      continue;
    }
    int tier = -1;
    for (int k = 0; k < kTiers; ++k)
      if (int64_t(tier_lanes(k)) * K >= n) { tier = k; break; }

    if (tier < 0) {  // split rows
      const int64_t C = (n + chunk - 1) / chunk;
      if (C > INT32_MAX) return "row too long";
      auto add = [&](int64_t row, int64_t group, int64_t pos) {
        const int64_t s = n_split++;
        const int64_t base = n_chunks;
        n_chunks += C;
        for (int64_t c = 0; c < C; ++c) {
          Item it{kItemSplit, kTiers - 1, int32_t(t), int32_t(C), row, group, pos, s, c, base + c};
          items[0].push_back(it);
          items[1].push_back(it);
          if (kind != Kind::Euclidean) items[2].push_back(it);
        }
      };
      if (grp) {
        need_rows = true;
        for (int64_t k : groups_of[size_t(t)]) {
          const int64_t start = groups[k * kGroupFields + kGroupStart];
          const int64_t cnt = groups[k * kGroupFields + kGroupCount];
          for (int64_t j = 0; j < cnt; ++j) add(row_index[start + j], k, start + j);
        }
      } else {
        for (int64_t r = 0; r < rows; ++r) add(r, -1, -1);
      }
      continue;
    }

    const int64_t per = kBlock / tier_lanes(tier);  // rows per CTA
    if (!grp) {
      for (int64_t r0 = 0; r0 < rows; r0 += per)
        items[1].push_back(Item{kItemRange, tier, int32_t(t), int32_t(std::min(per, rows - r0)), r0,
                                -1, -1, -1, 0, 0});
      continue;
    }
    // adaptive groups: pack the ones that fit a CTA, pre-pass the others
    const bool sliced = pack_groups(
        tables, groups_of[size_t(t)], per, slots,
        [&](int64_t first, int64_t count) {
          items[1].push_back(Item{kItemGroups, tier, int32_t(t), int32_t(count), 0, -1, first, -1, 0, 0});
        },
        [&](int64_t k, int64_t pos, int64_t count) {
          const Item it{kItemGroupSlice, tier, int32_t(t), int32_t(count), 0, k, pos, -1, 0, 0};
          items[0].push_back(it);
          items[1].push_back(it);
        });
    need_rows = need_rows || sliced;
  }

  PlanLayout& L = out.layout;
  L = PlanLayout{};
  int64_t off = 0;
  for (int ph = 0; ph < 3; ++ph) {
    L.items[ph] = off;
    L.n_items[ph] = int64_t(items[ph].size());
    off = detail::align16(off + L.n_items[ph] * int64_t(sizeof(Item)));
  }
  L.slots = off;
  off = detail::align16(off + int64_t(slots.size() * sizeof(TeamSlot)));
  L.groups = off;
  off = detail::align16(off + n_groups * kGroupFields * 8);
  L.row_index = off;
  off = detail::align16(off + n_row_index * 8);
  L.blob_bytes = std::max<int64_t>(off, 16);

  int64_t w = 0;
  const int64_t nr = need_rows ? n_row_index : 0;
  const int64_t ng = grouped ? n_groups : 0;
  L.row_tan = w;      w = detail::align16(w + nr * A);
  L.row_ok = w;       w = detail::align16(w + nr * 4);
  L.group_scale = w;  w = detail::align16(w + ng * A);
  L.group_ok = w;     w = detail::align16(w + ng * 4);
  L.group_count = w;  w = detail::align16(w + ng * 4);
  L.split_count = w;  w = detail::align16(w + n_split * 4);
  L.split_row = w;    w = detail::align16(w + n_split * 8 * A);
  L.partial = w;      w = detail::align16(w + n_chunks * 4 * A);
  L.stiefel = w;      w = detail::align16(w + stiefel_elems * A);
  L.ws_bytes = std::max<int64_t>(w, 16);
  L.n_split = n_split;
  L.n_chunks = n_chunks;
  L.dtype = int64_t(dtype);
  L.grouped = grouped ? 1 : 0;

  for (int ph = 0; ph < 2; ++ph)  // Stiefel scratch: element offsets become workspace byte offsets
    for (Item& it : items[ph])
      if (it.kind == kItemStiefel) it.slot = L.stiefel + it.slot * A;
  out.blob.assign(size_t(L.blob_bytes), 0);
  unsigned char* b = out.blob.data();
  for (int ph = 0; ph < 3; ++ph)
    if (!items[ph].empty()) std::memcpy(b + L.items[ph], items[ph].data(), items[ph].size() * sizeof(Item));
  if (!slots.empty()) std::memcpy(b + L.slots, slots.data(), slots.size() * sizeof(TeamSlot));
  if (n_groups) std::memcpy(b + L.groups, groups, size_t(n_groups) * kGroupFields * 8);
  if (n_row_index) std::memcpy(b + L.row_index, row_index, size_t(n_row_index) * 8);
  out.n_tensors = n_tensors;
  out.n_groups = n_groups;
  out.n_row_index = n_row_index;
  out.launches = (L.n_items[0] > 0) + (L.n_items[1] > 0) + (L.n_items[2] > 0);
  return {};
}

// The per-tensor part of a per-step guard, SGD's and Adam's alike: each tensor's static columns
// still match the plan, its parameter and gradient addresses are set, then `own(e)`, the
// algorithm's checks of its state buffers (a message, or nullptr), then its flags are known and
// stochastic rounding applies to bfloat16 only. Returns an error message or an empty string.
template <typename Own>
inline std::string check_table_tensors(const HostPlan& plan, const int64_t* table, int64_t n_tensors, Own own) {
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t* e = table + t * kTensorFields;
    const int64_t* s = plan.statics.data() + t * kStatics;
    const std::string name = "tensor " + std::to_string(t) + ": ";
    if (e[kRows] != s[0] || e[kRowLen] != s[1] || e[kKind] != s[2] || e[kRadius] != s[3] ||
        (e[kFlags] & kColumns) != s[4])
      return name + "rows, row length, kind, radius or column rows differ from the plan";
    if (!e[kParam] || !e[kGrad]) return name + "null parameter or gradient address";
    if (const char* err = own(e)) return name + err;
    if (e[kFlags] & ~int64_t(kKnownFlags)) return name + "unknown flags";
    if ((e[kFlags] & kStochasticRound) && plan.layout.dtype != int64_t(DType::BFloat16))
      return name + "stochastic rounding applies to bfloat16 parameters only";
  }
  return {};
}

// The per-step guard: the table's static columns still match the plan and the
// per-step columns are usable. Returns an error message or an empty string.
inline std::string check_step_table(const HostPlan& plan, const int64_t* table, int64_t n_tensors,
                                    const StepOptions& opt) {
  if (n_tensors != plan.n_tensors) return "the table has a different number of tensors than the plan";
  if ((opt.adaptive != Adaptive::None) != (plan.layout.grouped != 0))
    return "the plan was built for a different adaptive mode (none vs sphere/general)";
  return check_table_tensors(plan, table, n_tensors, [&](const int64_t* e) -> const char* {
    return (opt.momentum > 0) != (e[kMomentum] != 0) ? "a momentum buffer is needed exactly when momentum > 0"
                                                       : nullptr;
  });
}

}  // namespace cuda
}  // namespace msgd

#include "fused_stiefel_plan.h"
