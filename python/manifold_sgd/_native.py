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


_CUDA_COMPILED = _C is not None and bool(_C.info().get("cuda_compiled", False))


def cuda_compiled() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return _CUDA_COMPILED


def supports(device: torch.device) -> bool:
    """Whether a native kernel exists for tensors on this device."""
    if _C is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and cuda_compiled())


class NativeBucket:
    """The packed tables of one (param group, device, dtype) bucket.

    Built once per plan; each step only rewrites the parameter and gradient
    addresses (gradients are often new tensors after ``zero_grad``) and the flags.

    On a CUDA device the first ``run`` also builds the CUDA plan (work list) and
    uploads it with the group tables once; later steps upload the small tensor
    table only when an address or flag changed (a non-blocking copy from pinned
    memory on the current stream) and never synchronise. The report stays on the
    device; see ``run`` and ``take_report``.
    """

    def __init__(self, rows: Sequence[int], row_lens: Sequence[int], kinds: Sequence[str],
                 row_orders: Sequence[torch.Tensor], group_sizes: Sequence[torch.Tensor],
                 radii: Sequence[Optional[torch.Tensor]], dtype: torch.dtype,
                 block_rows: Optional[Sequence[int]] = None):
        n = len(rows)
        self.n = n
        self.dtype_code = DTYPE_CODES[dtype]
        self.table = torch.zeros(n, TENSOR_FIELDS, dtype=torch.int64)
        self.table[:, ROWS] = torch.tensor(list(rows), dtype=torch.int64)
        self.table[:, ROW_LEN] = torch.tensor(list(row_lens), dtype=torch.int64)
        self.table[:, KIND] = torch.tensor([KIND_CODES[k] for k in kinds], dtype=torch.int64)
        self.table[:, BLOCK_ROWS] = torch.tensor([1] * n if block_rows is None else list(block_rows),
                                                 dtype=torch.int64)
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
        # CUDA state, made by the first run on a CUDA device
        self.device: Optional[torch.device] = None
        self._cuda_plan = None
        self._plan_dev: Optional[torch.Tensor] = None
        self._workspace: Optional[torch.Tensor] = None
        self._table_dev: Optional[torch.Tensor] = None
        self._uploaded: Optional[torch.Tensor] = None
        self._report_init: Optional[torch.Tensor] = None

    def run(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            momenta: Sequence[Optional[torch.Tensor]], fresh: Sequence[bool], opt, *,
            stochastic_rounding: bool = False, seed: int = 0, step: int = 0,
            reset_report: bool = True) -> torch.Tensor:
        """One fused step; tensors must be contiguous. Returns the (n, 2) skip report.

        On the CPU the report is this step's and lies on the host. On CUDA it lies
        on the device: with ``reset_report`` (default) it is reset before the step,
        so it holds this step's skips as on the CPU (reading it synchronises); with
        ``reset_report=False`` it accumulates over steps (counts added, smallest
        skipped row kept) until ``take_report``. ``stochastic_rounding`` (CUDA,
        bfloat16 only) rounds the new weights stochastically with bits drawn from
        (seed, step, tensor, element).
        """
        self.table[:, PARAM] = torch.tensor([p.data_ptr() for p in params], dtype=torch.int64)
        self.table[:, GRAD] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        self.table[:, MOMENTUM] = torch.tensor([0 if m is None else m.data_ptr() for m in momenta],
                                               dtype=torch.int64)
        self.table[:, FLAGS] = torch.tensor([MOMENTUM_FRESH if f else 0 for f in fresh], dtype=torch.int64)
        if self.n and params[0].is_cuda:
            return self._run_cuda(params[0].device, opt, stochastic_rounding, seed, step, reset_report)
        if stochastic_rounding:
            raise ValueError("stochastic_rounding is implemented by the CUDA kernel only")
        _C.fused_step_cpu(
            self.table.data_ptr(), self.n, self.groups.data_ptr(), self.groups.shape[0],
            self.row_index.data_ptr(), self.row_index.numel(), self.dtype_code,
            self.report.data_ptr(), float(opt.lr), float(opt.momentum), bool(opt.nesterov),
            float(opt.weight_decay), ADAPTIVE_CODES[opt.adaptive], float(opt.curvature),
            float(opt.distance), float(opt.psi_max_norm), RETRACTION_CODES[opt.retraction],
            max(1, torch.get_num_threads()),
        )
        return self.report

    # ---- CUDA ----------------------------------------------------------------------

    def _cuda_setup(self, device: torch.device) -> None:
        """Device copies of the per-row radii and the report (once per bucket)."""
        if self.device == device:
            return
        if self.device is not None:
            raise ValueError(f"this bucket was set up for {self.device}, not {device}")
        self.device = device
        self.radii = [None if r is None else r.to(device) for r in self.radii]
        self.table[:, RADIUS] = torch.tensor([0 if r is None else r.data_ptr() for r in self.radii],
                                             dtype=torch.int64)
        self._report_init = torch.tensor([[0, -1]], dtype=torch.int64, device=device).repeat(self.n, 1)
        self.report = self._report_init.clone()

    def _run_cuda(self, device: torch.device, opt, stochastic_rounding: bool, seed: int, step: int,
                  reset_report: bool) -> torch.Tensor:
        self._cuda_setup(device)
        options = (float(opt.lr), float(opt.momentum), bool(opt.nesterov), float(opt.weight_decay),
                   ADAPTIVE_CODES[opt.adaptive], float(opt.curvature), float(opt.distance),
                   float(opt.psi_max_norm))
        grouped = opt.adaptive != "none"
        if self._cuda_plan is None or self._cuda_plan.grouped != grouped:
            # validates every table entry, then the work list; uploaded once (this copy waits)
            self._cuda_plan = _C.CudaPlan(
                self.table.data_ptr(), self.n, self.groups.data_ptr(), self.groups.shape[0],
                self.row_index.data_ptr(), self.row_index.numel(), self.dtype_code, *options)
            blob = torch.frombuffer(bytearray(self._cuda_plan.blob()), dtype=torch.uint8)
            self._plan_dev = blob.to(device)
            self._workspace = torch.zeros(self._cuda_plan.workspace_bytes, dtype=torch.uint8, device=device)
            self._table_dev = torch.empty(self.n, TENSOR_FIELDS, dtype=torch.int64, device=device)
            self._uploaded = None
        if self._uploaded is None or not torch.equal(self._uploaded, self.table):
            # a fresh pinned copy: the caching host allocator keeps it until the copy ran
            self._table_dev.copy_(self.table.pin_memory(), non_blocking=True)
            self._uploaded = self.table.clone()
        if reset_report:
            self.report.copy_(self._report_init)
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _C.fused_step_cuda(
                self._cuda_plan, self.table.data_ptr(), self.n, self._table_dev.data_ptr(),
                self._plan_dev.data_ptr(), self._workspace.data_ptr(), self.report.data_ptr(), *options,
                bool(stochastic_rounding), int(seed) & (2**64 - 1), int(step) & (2**64 - 1),
                device.index if device.index is not None else torch.cuda.current_device(), stream)
        return self.report

    @property
    def launches(self) -> int:
        """Kernel launches per step of the CUDA plan (0 before the first CUDA step)."""
        return 0 if self._cuda_plan is None else int(self._cuda_plan.launches)

    def take_report(self) -> torch.Tensor:
        """The report as a host tensor; on CUDA this synchronises and resets the device report."""
        rep = self.report.to("cpu")
        if self.report.is_cuda:
            self.report.copy_(self._report_init)
        return rep
