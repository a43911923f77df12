"""The only module that touches the compiled ``_C``: availability, and packing a
bucket of tensors into the int64 tables the kernels read (csrc/core/step.h)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

try:  # the extension is optional: the reference path runs without it
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = exc

# Column order of the tables; must match csrc/core/step.h (checked against _C.info()).
PARAM, GRAD, MOMENTUM, ROWS, ROW_LEN, KIND, FLAGS, RADIUS, BLOCK_ROWS = range(9)
TENSOR_FIELDS = 9
GROUP_FIELDS = 3
REPORT_FIELDS = 2
SKIPPED_ROWS, FIRST_SKIPPED_ROW = 0, 1
MOMENTUM_FRESH = 1

KIND_CODES = {"euclidean": 0, "sphere": 1, "psi": 2, "stiefel": 3}
RETRACTION_CODES = {"qr": 0, "polar": 1}
MAX_STIEFEL_ROWS = 32  # Stiefel blocks with more rows take the batched linear-algebra path
ADAPTIVE_CODES = {"none": 0, "sphere": 1, "general": 2}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def available() -> bool:
    return _C is not None


def info() -> dict:
    """Facts about the native build, plus the CPU threads a step uses."""
    if _C is None:
        return {"available": False, "error": repr(_IMPORT_ERROR), "cuda_compiled": False,
                "num_threads": torch.get_num_threads()}
    d = dict(_C.info())
    d["available"] = True
    d["num_threads"] = torch.get_num_threads()
    return d


def supports(device: torch.device) -> bool:
    """Whether a native kernel exists for tensors on this device."""
    return _C is not None and device.type == "cpu"


class NativeBucket:
    """The packed tables of one (param group, device, dtype) bucket.

    Built once per plan; each step only rewrites the parameter and gradient
    addresses (gradients are often new tensors after ``zero_grad``) and the flags.
    """

    def __init__(self, rows: Sequence[int], row_lens: Sequence[int], kinds: Sequence[str],
                 row_orders: Sequence[torch.Tensor], group_sizes: Sequence[torch.Tensor],
                 radii: Sequence[Optional[torch.Tensor]], block_rows: Sequence[int], dtype: torch.dtype):
        n = len(rows)
        self.n = n
        self.dtype_code = DTYPE_CODES[dtype]
        self.table = torch.zeros(n, TENSOR_FIELDS, dtype=torch.int64)
        self.table[:, ROWS] = torch.tensor(list(rows), dtype=torch.int64)
        self.table[:, ROW_LEN] = torch.tensor(list(row_lens), dtype=torch.int64)
        self.table[:, KIND] = torch.tensor([KIND_CODES[k] for k in kinds], dtype=torch.int64)
        self.table[:, BLOCK_ROWS] = torch.tensor(list(block_rows), dtype=torch.int64)
        self.radii = [None if r is None else r.to(torch.float32).contiguous() for r in radii]
        self.table[:, RADIUS] = torch.tensor([0 if r is None else r.data_ptr() for r in self.radii],
                                             dtype=torch.int64)
        self.row_index = torch.cat(list(row_orders)).to(torch.int64).contiguous() if n else torch.zeros(0, dtype=torch.int64)
        group_rows: List[torch.Tensor] = []
        for t, sizes in enumerate(group_sizes):
            group_rows.append(torch.stack([torch.full_like(sizes, t), sizes], dim=1))
        if n:
            gr = torch.cat(group_rows)
            starts = torch.cumsum(gr[:, 1], 0) - gr[:, 1]
            self.groups = torch.stack([gr[:, 0], starts, gr[:, 1]], dim=1).contiguous()
        else:
            self.groups = torch.zeros(0, GROUP_FIELDS, dtype=torch.int64)
        self.report = torch.zeros(n, REPORT_FIELDS, dtype=torch.int64)

    def run(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            momenta: Sequence[Optional[torch.Tensor]], fresh: Sequence[bool], opt) -> torch.Tensor:
        """One fused step; tensors must be contiguous. Returns the (n, 2) skip report."""
        self.table[:, PARAM] = torch.tensor([p.data_ptr() for p in params], dtype=torch.int64)
        self.table[:, GRAD] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        self.table[:, MOMENTUM] = torch.tensor([0 if m is None else m.data_ptr() for m in momenta],
                                               dtype=torch.int64)
        self.table[:, FLAGS] = torch.tensor([MOMENTUM_FRESH if f else 0 for f in fresh], dtype=torch.int64)
        _C.fused_step_cpu(
            self.table.data_ptr(), self.n, self.groups.data_ptr(), self.groups.shape[0],
            self.row_index.data_ptr(), self.row_index.numel(), self.dtype_code,
            self.report.data_ptr(), float(opt.lr), float(opt.momentum), bool(opt.nesterov),
            float(opt.weight_decay), ADAPTIVE_CODES[opt.adaptive], float(opt.curvature),
            float(opt.distance), float(opt.psi_max_norm), RETRACTION_CODES[opt.retraction],
            max(1, torch.get_num_threads()),
        )
        return self.report
