"""The only module that touches the compiled ``_C``: availability, and packing a
bucket of tensors into the int64 tables the kernels read (csrc/core/step.h)."""
from __future__ import annotations

import contextlib
import ctypes
import re
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from . import skips
from .layout import is_dense, rows_in_place

try:  # the extension is optional: the reference path runs without it
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = exc

# Column order of the tables; must match csrc/core/step.h (checked against _C.info()).
(PARAM, GRAD, MOMENTUM, ROWS, ROW_LEN, KIND, FLAGS, RADIUS, BLOCK_ROWS, ROUNDING_KEY, SECOND_MOMENT,
 STEP_COUNT) = range(12)
TENSOR_FIELDS = 12
GROUP_FIELDS = 3
REPORT_FIELDS = 2
SKIPPED_ROWS, FIRST_SKIPPED_ROW = 0, 1
MOMENTUM_FRESH = 1
STOCHASTIC_ROUND = 2  # with ROUNDING_KEY: bf16 weights rounded stochastically (stochastic_round.h)
COLUMNS = 4  # granularity "column": rows are the columns of the row-major (row_len x rows) matrix

# Names behind the codes of the tables and options; checked against _C.info() (its enum tables).
KINDS = ("euclidean", "sphere", "psi", "stiefel")
KIND_CODES = {k: i for i, k in enumerate(KINDS)}
MAX_STIEFEL_ROWS = 32  # Stiefel blocks with more rows take the batched linear-algebra path
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


# Measuring the Python side of a step (bench --overhead): while True, the CPU step does all
# its checks and table writes but calls no kernel (and leaves every weight as it is).
_NOOP_KERNEL = False


@contextlib.contextmanager
def noop_kernel():
    """Within this block CPU steps skip the native call (a no-op kernel); for measuring the
    per-step Python overhead only: the weights do not move."""
    global _NOOP_KERNEL
    before, _NOOP_KERNEL = _NOOP_KERNEL, True
    try:
        yield
    finally:
        _NOOP_KERNEL = before


def available() -> bool:
    return _C is not None


def info() -> dict:
    """Facts about the native build, plus the CPU threads a step uses, and whether the CUDA
    kernels can run here (``cuda_usable``, ``cuda_driver_version``, ``cuda_runtime_version``,
    ``cuda_reason``; see ``cuda_usability``)."""
    if _C is None:
        return {"available": False, "error": repr(_IMPORT_ERROR), "cuda_compiled": False,
                "cuda_usable": False, "cuda_reason": "the native extension did not import",
                "num_threads": torch.get_num_threads()}
    d = dict(_C.info())
    d["available"] = True
    d["num_threads"] = torch.get_num_threads()
    d.update(_cuda_status())
    return d


_CUDA_COMPILED = _C is not None and bool(_C.info().get("cuda_compiled", False))


def cuda_compiled() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return _CUDA_COMPILED


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def cuda_usability(driver_version: int, runtime_version: int, compiled: bool, error: str = ""):
    """Whether the CUDA kernels can run, from the CUDA version the driver supports
    (``cudaDriverGetVersion``: 0 without a driver) and that of the runtime linked statically
    into the extension (``cudaRuntimeGetVersion``), both as 1000 * major + 10 * minor.
    Returns ``(usable, reason)``; ``reason`` is '' when usable.

    A driver older than the runtime fails the first CUDA call of the extension (e.g. a
    CUDA 13 build on a CUDA 12 driver); such a machine needs the extension built with a
    toolkit no newer than the driver (README, CUDA)."""
    if not compiled:
        return False, "the extension was built without its CUDA kernels (no nvcc at build time)"
    if error and not driver_version:
        return False, f"the CUDA driver could not be queried ({error})"
    if driver_version <= 0:
        return False, "no CUDA driver is installed (cudaDriverGetVersion reports 0)"
    if runtime_version <= 0:
        return False, f"the linked CUDA runtime reports no version ({error or 'version 0'})"
    if driver_version < runtime_version:
        return False, (f"the CUDA driver supports CUDA {_version(driver_version)}, older than the CUDA "
                       f"{_version(runtime_version)} runtime this extension was built with; rebuild it "
                       f"with a CUDA toolkit <= {_version(driver_version)} (README, CUDA) or update the driver")
    return True, ""


_CUDA_STATUS: Optional[dict] = None
_CUDA_WARNED = False


def _cuda_status() -> dict:
    """The CUDA usability facts of this process, asked once (no CUDA context is created)."""
    global _CUDA_STATUS
    if _CUDA_STATUS is None:
        driver = runtime = 0
        error = ""
        if cuda_compiled():
            try:
                v = _C.cuda_versions()
                driver, runtime, error = int(v["driver"]), int(v["runtime"]), str(v["error"])
            except Exception as exc:  # pragma: no cover - an extension without the entry
                error = repr(exc)
        usable, reason = cuda_usability(driver, runtime, cuda_compiled(), error)
        _CUDA_STATUS = {"cuda_usable": usable, "cuda_driver_version": driver,
                        "cuda_runtime_version": runtime, "cuda_reason": reason}
    return dict(_CUDA_STATUS)


def cuda_usable() -> bool:
    """Whether the CUDA kernels were compiled in and this machine's driver can run them."""
    return bool(_cuda_status()["cuda_usable"])


def supports(device: torch.device) -> bool:
    """Whether a native kernel exists for tensors on this device and can run here. For a CUDA
    device whose kernels are compiled in but unusable (see ``cuda_usability``) this warns once
    (RuntimeWarning, with the reason) and returns False: those tensors take the reference path."""
    global _CUDA_WARNED
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not cuda_compiled():
        return False
    status = _cuda_status()
    if not status["cuda_usable"]:
        if not _CUDA_WARNED:
            _CUDA_WARNED = True
            warnings.warn(f"manifold_sgd: the CUDA kernels cannot run here: {status['cuda_reason']}; "
                          f"CUDA tensors take the reference path (backend='native' raises)",
                          RuntimeWarning, stacklevel=2)
        return False
    return True


def supports_columns(device: torch.device, kind: str, adam: bool) -> bool:
    """Whether the native kernels step ``granularity="column"`` rows of this kind: row manifolds
    in the CPU kernels (tiles of columns gathered as rows, csrc/cpu/tensor_view.h) and the CUDA
    SGD kernels (Columns items, csrc/cuda/fused_step_plan.h); Stiefel blocks (``W^T`` whole)
    and ManifoldAdam on CUDA take the reference path."""
    if kind == "stiefel":
        return False
    return device.type == "cpu" or (device.type == "cuda" and not adam)


def supports_stiefel(device: torch.device, block_rows: int, adam: bool) -> bool:
    """Whether the native kernels step Stiefel blocks of ``block_rows`` rows on this device: the CPU
    kernel (SGD and the Adam family) and the CUDA SGD kernels (kItemStiefel items,
    csrc/cuda/fused_stiefel_plan.h) for p <= MAX_STIEFEL_ROWS; larger blocks, and ManifoldAdam's
    blocks on CUDA, take the reference path (batched linear algebra)."""
    if block_rows > MAX_STIEFEL_ROWS:
        return False
    return device.type == "cpu" or (device.type == "cuda" and not adam)


def step_options(opt) -> "_C.StepOptions":
    """The options record the native entries take (csrc/core/step.h), from the reference
    path's ``StepOptions`` (SGD) or ``AdamOptions``; the native side checks it (and names the
    option in its messages)."""
    if getattr(opt, "algorithm", "sgd") == "adam":
        beta1, beta2 = opt.betas
        return _C.StepOptions(algorithm="adam", lr=float(opt.lr), weight_decay=float(opt.weight_decay),
                              beta1=float(beta1), beta2=float(beta2), eps=float(opt.eps),
                              second_moment=opt.second_moment, retraction=getattr(opt, "retraction", "qr"))
    return _C.StepOptions(algorithm="sgd", lr=float(opt.lr),
                          momentum=float(opt.momentum), nesterov=bool(opt.nesterov),
                          weight_decay=float(opt.weight_decay), adaptive=opt.adaptive,
                          curvature=float(opt.curvature), distance=float(opt.distance),
                          psi_max_norm=float(opt.psi_max_norm), retraction=getattr(opt, "retraction", "qr"))


class NativeBucket:
    """The packed tables of one (param group, device, dtype) bucket.

    Built once per plan; each step only rewrites the parameter and gradient
    addresses (gradients are often new tensors after ``zero_grad``) and the flags.

    This is the checked boundary of the native code: ``_C`` reads raw addresses and
    cannot know how large a buffer is, so every tensor is checked here (device, dtype,
    size, a dense layout shared by w, g and m) and every error names the tensor
    (``names``, else ``tensor i``). The tables themselves are validated again in C++.
    """

    def __init__(self, rows: Sequence[int], row_lens: Sequence[int], kinds: Sequence[str],
                 row_orders: Sequence[torch.Tensor], group_sizes: Sequence[torch.Tensor],
                 radii: Sequence[Optional[torch.Tensor]], dtype: torch.dtype,
                 block_rows: Optional[Sequence[int]] = None, names: Optional[Sequence[str]] = None,
                 leads: Optional[Sequence[int]] = None, columns: Optional[Sequence[bool]] = None):
        n = len(rows)
        self.n = n
        self.names = list(names) if names is not None else [f"tensor {i}" for i in range(n)]
        lists = dict(row_lens=row_lens, kinds=kinds, row_orders=row_orders, group_sizes=group_sizes,
                     radii=radii, names=self.names)
        for what, seq in lists.items():
            if len(seq) != n:
                raise ValueError(f"NativeBucket: {len(seq)} {what} for {n} tensors")
        if dtype not in DTYPE_CODES:
            raise ValueError(f"NativeBucket: dtype {dtype} has no native kernel")
        for i in range(n):
            _check_rows(self, i, rows[i], row_lens[i], kinds[i], row_orders[i], group_sizes[i], radii[i])
        # per tensor, how many leading dims index its rows (layout.lead_dims): a tensor that is not
        # contiguous is stepped in place only where its rows are consecutive blocks of its storage
        self.leads = [None] * n if leads is None else list(leads)
        if len(self.leads) != n:
            raise ValueError(f"NativeBucket: {len(self.leads)} leads for {n} tensors")
        # per tensor, whether its rows are the columns of a row-major (row_len x rows) matrix
        self.static_flags = [0] * n if columns is None else [COLUMNS if c else 0 for c in columns]
        if len(self.static_flags) != n:
            raise ValueError(f"NativeBucket: {len(self.static_flags)} column flags for {n} tensors")
        for i in range(n):
            if self.static_flags[i] and kinds[i] == "stiefel":
                raise ValueError(f"{self.names[i]}: column rows are for row manifolds (a Stiefel block is W^T whole)")
        self.dtype = dtype
        self.math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.sizes = [int(r) * int(c) for r, c in zip(rows, row_lens)]
        self.dtype_code = DTYPE_CODES[dtype]
        self.table = torch.zeros(n, TENSOR_FIELDS, dtype=torch.int64)
        self.table[:, ROWS] = torch.tensor([int(r) for r in rows], dtype=torch.int64)
        self.table[:, ROW_LEN] = torch.tensor([int(c) for c in row_lens], dtype=torch.int64)
        self.table[:, KIND] = torch.tensor([KIND_CODES[k] for k in kinds], dtype=torch.int64)
        self.table[:, BLOCK_ROWS] = torch.tensor([1] * n if block_rows is None else [int(b) for b in block_rows],
                                                 dtype=torch.int64)
        self.radii = [None if r is None else r.to(torch.float32).contiguous() for r in radii]
        self.table[:, RADIUS] = torch.tensor([0 if r is None else r.data_ptr() for r in self.radii],
                                             dtype=torch.int64)
        self.row_index = (torch.cat(list(row_orders)).to(torch.int64).contiguous() if n
                          else torch.zeros(0, dtype=torch.int64))
        group_rows: List[torch.Tensor] = []
        for t, sizes in enumerate(group_sizes):
            sizes = sizes.to(torch.int64)
            group_rows.append(torch.stack([torch.full_like(sizes, t), sizes], dim=1))
        if n:
            gr = torch.cat(group_rows)
            starts = torch.cumsum(gr[:, 1], 0) - gr[:, 1]
            self.groups = torch.stack([gr[:, 0], starts, gr[:, 1]], dim=1).contiguous()
        else:
            self.groups = torch.zeros(0, GROUP_FIELDS, dtype=torch.int64)
        self._grad_ptrs: Optional[List[int]] = None  # the gradient column as last written
        # Adam: per second_moment option, the values of each tensor's second moment (its rows
        # or its elements; the table's rows and kinds do not change), made by the first check
        self._adam_wants: Dict[str, List[int]] = {}
        self._tables_key = None  # the tables' addresses, and the native record of them
        self._tables = None
        self._options_key = None  # the options of the last step, and their native record
        self._options = None
        self.report = torch.tensor([[0, -1]], dtype=torch.int64).repeat(n, 1)
        self._step_report = self.report.clone()  # the CPU kernel's output when accumulating
        # CUDA state, made by the first run on a CUDA device
        self.device: Optional[torch.device] = None
        self._cuda_plan = None
        self._plan_dev: Optional[torch.Tensor] = None
        self._workspace: Optional[torch.Tensor] = None
        self._table_dev: Optional[torch.Tensor] = None
        self._uploaded: Optional[torch.Tensor] = None
        self._report_init: Optional[torch.Tensor] = None
        self._last_stream = None  # the stream of the previous CUDA step, and its completion event
        self._done = None

    def run(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            momenta: Sequence[Optional[torch.Tensor]], fresh: Sequence[bool], opt, *,
            rounding_keys: Optional[Sequence[Optional[int]]] = None,
            second_moments: Optional[Sequence[torch.Tensor]] = None,
            step_counts: Optional[Sequence[int]] = None,
            reset_report: bool = True) -> torch.Tensor:
        """One fused step (SGD, or the Adam family for ``opt.algorithm == "adam"``). Returns the
        (n, 2) skip report.

        The kernels step each tensor's storage in memory order as ``rows x row_len``. So w, g
        and m of a tensor must share one dense layout in which the rows are consecutive blocks
        of the storage: contiguous tensors, or (with ``leads`` given at construction) a dense
        permuted layout such as ``channels_last`` whose leading ``lead`` dims are outermost in
        memory (``layout.rows_in_place``). Anything else is a ValueError naming the tensor.

        With ``reset_report`` (default) the report holds this step's skips; with
        ``reset_report=False`` it accumulates over steps (counts added, smallest skipped
        row kept) until ``take_report``. On the CPU it lies on the host; on CUDA on the
        device, where reading it synchronises (so a step that must not synchronise
        accumulates, and the caller takes the report when it wants it).

        ``rounding_keys``: one entry per tensor (bfloat16 buckets only): an int key
        (``reference.rounding_key(seed, step, tensor)``, in [0, 2^64)) rounds that
        tensor's new weights stochastically with the bits of the key and each element's
        index (``row * row_len + column``), as ``reference.step_rows`` does; None rounds
        to nearest.

        Adam (``reference.AdamOptions``): ``momenta`` are the first moments (always needed),
        ``second_moments`` the second (math dtype, contiguous: one per row on a manifold row
        with ``second_moment="row"``, else one per element), ``step_counts`` each tensor's step
        count t of this step (>= 1), and ``fresh`` says that m and v hold nothing yet.
        """
        n = self.n
        for what, seq in (("parameters", params), ("gradients", grads), ("momentum buffers", momenta),
                          ("fresh flags", fresh)):
            if len(seq) != n:
                raise ValueError(f"NativeBucket.run: {len(seq)} {what} for {n} tensors")
        options = self._native_options(opt)
        keys = _rounding_keys(self, rounding_keys)
        adam = getattr(opt, "algorithm", "sgd") == "adam"
        use_m = adam or float(opt.momentum) > 0
        # one device for the whole bucket: the one it was set up for, else the first parameter's
        device = self.device if self.device is not None else getattr(params[0], "device", None) if n else None
        on_cpu = device is not None and device.type == "cpu"
        for i in range(n):
            _check_tensors(self, i, params[i], grads[i], momenta[i], use_m, device, on_cpu)
        if adam:
            _check_adam_state(self, params, second_moments, step_counts, opt.second_moment)
        elif second_moments is not None or step_counts is not None:
            raise ValueError("NativeBucket.run: second moments and step counts are Adam's")
        # the per-step columns, written through a view of the table's memory (a torch
        # assignment per column would cost more than the rest of a small step)
        tv = self._table_view()
        tv[PARAM::TENSOR_FIELDS] = [p.data_ptr() for p in params]
        self._grad_ptrs = [g.data_ptr() for g in grads]
        tv[GRAD::TENSOR_FIELDS] = self._grad_ptrs
        tv[MOMENTUM::TENSOR_FIELDS] = [0 if m is None else m.data_ptr() for m in momenta]
        flags = [(MOMENTUM_FRESH if f else 0) | c for f, c in zip(fresh, self.static_flags)]
        if keys is None:
            tv[ROUNDING_KEY::TENSOR_FIELDS] = [0] * n
        else:
            flags = [f | (0 if k is None else STOCHASTIC_ROUND) for f, k in zip(flags, keys)]
            tv[ROUNDING_KEY::TENSOR_FIELDS] = [0 if k is None else k for k in keys]
        tv[FLAGS::TENSOR_FIELDS] = flags
        tv[SECOND_MOMENT::TENSOR_FIELDS] = [v.data_ptr() for v in second_moments] if adam else [0] * n
        tv[STEP_COUNT::TENSOR_FIELDS] = [int(t) for t in step_counts] if adam else [0] * n
        return self._launch(device, options, reset_report)

    def run_steady(self, grad_ptrs: Sequence[int], device: torch.device, options, reset_report: bool,
                   step_counts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """A step that repeats the previous one but for the gradients' addresses and, for
        Adam, the step counts (steady.py: the caller has checked that the parameters, state
        tensors, flags and options are those of the tables, every gradient as ``run`` checks
        it, and that ``step_counts`` are ints >= 1). Writes the gradient column only when an
        address moved, and the step-count column when counts are given, then runs the kernel."""
        tv = self._table_view()
        if grad_ptrs != self._grad_ptrs:
            tv[GRAD::TENSOR_FIELDS] = grad_ptrs
            self._grad_ptrs = grad_ptrs
        if step_counts is not None:
            tv[STEP_COUNT::TENSOR_FIELDS] = step_counts
        return self._launch(device, options, reset_report)

    def _launch(self, device, options, reset_report: bool) -> torch.Tensor:
        """The kernel over the tables as they are (every column written and checked)."""
        n = self.n
        if n and device.type == "cuda":
            return _run_cuda(self, device, options, reset_report)
        out = self.report if reset_report else self._step_report
        try:
            if not _NOOP_KERNEL:
                _C.fused_step_cpu(self._step_tables(), options, out.data_ptr(), max(1, torch.get_num_threads()))
        except ValueError as exc:  # "tensor 3: ..." from C++ -> the tensor's name
            msg = str(exc)
            m = re.match(r"tensor (\d+): (.*)", msg, flags=re.S)
            if m and int(m.group(1)) < n:
                raise ValueError(f"{self.names[int(m.group(1))]}: {m.group(2)}") from None
            raise
        if not reset_report:  # add this step's skips, as the CUDA kernel does on the device
            skips.merge(self.report, out)
        return self.report

    def _step_tables(self) -> "_C.StepTables":
        """The native record of this bucket's tables (made again if a table moved, e.g. in a copy)."""
        key = (self.table.data_ptr(), self.groups.data_ptr(), self.row_index.data_ptr())
        if key != self._tables_key:
            self._tables = _C.StepTables(key[0], self.n, key[1], self.groups.shape[0], key[2],
                                         self.row_index.numel(), self.dtype_code)
            self._tables_key = key
        return self._tables

    def _native_options(self, opt) -> "_C.StepOptions":
        """The native options record of ``opt``, made again only when the options changed."""
        # an option held as a tensor (lr) may change in place: compared by value
        key = (getattr(opt, "algorithm", "sgd"),
               *(float(v) if isinstance(v, torch.Tensor) else v for v in vars(opt).values()))
        if key != self._options_key:
            self._options = step_options(opt)
            self._options_key = key
        return self._options

    def _table_view(self):
        """A ctypes int64 array over the table's memory (made again if the table moved, e.g.
        in a copy of this bucket)."""
        ptr = self.table.data_ptr()
        if getattr(self, "_view_ptr", None) != ptr:
            self._view = (ctypes.c_int64 * max(1, self.table.numel())).from_address(ptr)
            self._view_ptr = ptr
        return self._view

    def skipped(self) -> List[int]:
        """Indices of the tensors with skipped rows in the host report (a cheap read)."""
        if self.report.is_cuda or not self.n:
            return [int(i) for i in self.report[:, SKIPPED_ROWS].nonzero().flatten().tolist()]
        ptr = self.report.data_ptr()
        if getattr(self, "_report_ptr", None) != ptr:
            self._report_view = (ctypes.c_int64 * self.report.numel()).from_address(ptr)
            self._report_ptr = ptr
        counts = self._report_view[SKIPPED_ROWS::REPORT_FIELDS]
        return [i for i, v in enumerate(counts) if v] if any(counts) else []

    @property
    def launches(self) -> int:
        """Kernel launches per step of the CUDA plan (0 before the first CUDA step)."""
        return 0 if self._cuda_plan is None else int(self._cuda_plan.launches)

    def take_report(self) -> torch.Tensor:
        """The report as a host tensor, and a fresh one for the next steps; on CUDA this
        synchronises."""
        if not self.report.is_cuda:
            rep = self.report.clone()
            self.report.copy_(skips.empty(self.n))
            return rep
        rep = self.report.to("cpu")
        self.report.copy_(self._report_init)
        return rep


# ---- the boundary's checks (every error names the tensor), and the CUDA step -----------
# (functions of a bucket rather than its methods: NativeBucket keeps to what a step does)

def _check_rows(b: "NativeBucket", i, rows, row_len, kind, order, sizes, radius) -> None:
    name = b.names[i]

    def bad(why):
        raise ValueError(f"{name}: {why}")

    for what, v in (("rows", rows), ("row length", row_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(f"{what} must be an int >= 1, got {v!r}")
    if kind not in KIND_CODES:
        bad(f"manifold kind {kind!r} has no native kernel (expected one of {list(KIND_CODES)})")
    for what, t in (("row order", order), ("group sizes", sizes)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.is_complex():
            bad(f"{what} must be a 1-D integer tensor")
    if order.numel() != rows:
        bad(f"row order has {order.numel()} entries for {rows} rows")
    if sizes.numel() and (int(sizes.min()) < 1 or int(sizes.sum()) != rows):
        bad(f"group sizes must be >= 1 and sum to the {rows} rows")
    if radius is not None and (not isinstance(radius, torch.Tensor) or radius.numel() != rows):
        bad(f"radius must be a tensor of {rows} values")
    # a permutation of the rows: checked again in C++, named here


def _rounding_keys(b: "NativeBucket", keys) -> Optional[List[Optional[int]]]:
    """The keys as int64 bits (None: round to nearest), checked; None when no tensor rounds."""
    if keys is None:
        return None
    keys = list(keys)
    if len(keys) != b.n:
        raise ValueError(f"NativeBucket.run: {len(keys)} rounding keys for {b.n} tensors")
    out: List[Optional[int]] = []
    for i, k in enumerate(keys):
        if k is None:
            out.append(None)
            continue
        if b.dtype != torch.bfloat16:
            raise ValueError(f"{b.names[i]}: stochastic rounding applies to bfloat16 parameters "
                             f"only (this bucket holds {b.dtype})")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < 1 << 64:
            raise ValueError(f"{b.names[i]}: a rounding key must be an int in [0, 2**64), got {k!r}")
        out.append(k - (1 << 64) if k >= 1 << 63 else k)  # the same 64 bits as an int64
    return out if any(k is not None for k in out) else None


def _cuda_setup(b: "NativeBucket", device: torch.device) -> None:
    """Device copies of the per-row radii and the report (once per bucket)."""
    if b.device == device:
        return
    if b.device is not None:
        raise ValueError(f"this bucket was set up for {b.device}, not {device}")
    if not cuda_usable():
        raise RuntimeError(f"manifold_sgd: the CUDA kernels cannot run here: {_cuda_status()['cuda_reason']}")
    b.device = device
    b.radii = [None if r is None else r.to(device) for r in b.radii]
    b.table[:, RADIUS] = torch.tensor([0 if r is None else r.data_ptr() for r in b.radii],
                                         dtype=torch.int64)
    b._report_init = torch.tensor([[0, -1]], dtype=torch.int64, device=device).repeat(b.n, 1)
    b.report = b._report_init.clone()


def _run_cuda(b: "NativeBucket", device: torch.device, options, reset_report: bool) -> torch.Tensor:
    """The CUDA step on the current stream of ``device``.

    CUDA graphs: a step may be captured (``torch.cuda.graph``) only when the bucket was
    set up by an earlier step outside the capture and the step uploads nothing: the same
    tensors (addresses), flags and rounding keys as the previous step. The graph then
    replays exactly that step (the counters' memset, the report reset, the kernels). A
    step that would upload the table (new gradient tensors; stochastic rounding, whose key
    advances every step) raises RuntimeError while the stream is capturing: a replay would
    reuse the capture-time addresses and keys, and the copy would read a pinned host
    buffer the graph does not own.

    Streams: a step runs on the current stream; when that differs from the stream of the
    bucket's previous step, it first waits for that step (an event), so the table,
    workspace and counters are never used by two steps at once (not while capturing).
    """
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing and (b.device != device or b._cuda_plan is None
                      or b._cuda_plan.grouped != (options.adaptive != "none")):
        raise RuntimeError("manifold_sgd: the first CUDA step of a bucket (plan upload) cannot be "
                           "captured in a CUDA graph; run one step before capturing")
    _cuda_setup(b, device)
    grouped = options.adaptive != "none"
    if b._cuda_plan is None or b._cuda_plan.grouped != grouped:
        # validates every table entry, then the work list; uploaded once (this copy waits)
        b._cuda_plan = _C.CudaPlan(b._step_tables(), options)
        blob = torch.frombuffer(bytearray(b._cuda_plan.blob()), dtype=torch.uint8)
        b._plan_dev = blob.to(device)
        b._workspace = torch.zeros(b._cuda_plan.workspace_bytes, dtype=torch.uint8, device=device)
        b._table_dev = torch.empty(b.n, TENSOR_FIELDS, dtype=torch.int64, device=device)
        b._uploaded = None
    stream = torch.cuda.current_stream(device)
    if not capturing and b._last_stream is not None and b._last_stream != stream:
        stream.wait_event(b._done)  # the previous step ran on another stream
    if b._uploaded is None or not torch.equal(b._uploaded, b.table):
        if capturing:
            raise RuntimeError(
                "manifold_sgd: this CUDA step uploads its tensor table (new parameter, gradient or "
                "momentum tensors, changed flags, or stochastic rounding, whose key advances every "
                "step) and cannot be captured in a CUDA graph; capture only steps that repeat the "
                "previous step's tensors, without stochastic rounding")
        # a fresh pinned copy: the caching host allocator keeps it until the copy ran
        with torch.cuda.stream(stream):
            b._table_dev.copy_(b.table.pin_memory(), non_blocking=True)
        b._uploaded = b.table.clone()
    if reset_report:
        with torch.cuda.stream(stream):
            b.report.copy_(b._report_init)
    with torch.cuda.device(device):
        _C.fused_step_cuda(
            b._cuda_plan, b._step_tables(), b._table_dev.data_ptr(), b._plan_dev.data_ptr(),
            b._workspace.data_ptr(), b.report.data_ptr(), options,
            device.index if device.index is not None else torch.cuda.current_device(), stream.cuda_stream)
    if not capturing:
        if b._done is None:
            b._done = torch.cuda.Event()
        b._done.record(stream)
        b._last_stream = stream
    return b.report


def _check_adam_state(b: "NativeBucket", params, second_moments, step_counts, second_moment: str) -> None:
    n = b.n
    if second_moments is None or step_counts is None or len(second_moments) != n or len(step_counts) != n:
        raise ValueError(f"NativeBucket.run: Adam needs one second moment and one step count per tensor "
                         f"({n} tensors)")
    wants = b._adam_wants
    if second_moment not in wants:
        wants[second_moment] = [int(b.table[i, ROWS]) if (KINDS[int(b.table[i, KIND])] != "euclidean"
                                                            and second_moment == "row") else b.sizes[i]
                                for i in range(n)]
    md = b.math_dtype
    try:  # the common case in one expression: contiguous CPU tensors of the right size, int counts >= 1
        if all(p.is_cpu and v.is_cpu and v.dtype is md and v.numel() == want and v.is_contiguous()
               and type(t) is int and t >= 1
               for p, v, t, want in zip(params, second_moments, step_counts, wants[second_moment])):
            return
    except AttributeError:
        pass
    for i, (p, v, t) in enumerate(zip(params, second_moments, step_counts)):
        name = b.names[i]
        rows = int(b.table[i, ROWS])
        kind = KINDS[int(b.table[i, KIND])]
        want = rows if (kind != "euclidean" and second_moment == "row") else b.sizes[i]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: second moment is a {type(v).__name__}, not a torch.Tensor")
        if v.device != p.device or v.dtype != b.math_dtype or v.numel() != want or not v.is_contiguous():
            raise ValueError(f"{name}: the second moment must be a contiguous {b.math_dtype} tensor of "
                             f"{want} values on {p.device} (got {v.numel()} values of {v.dtype} on {v.device})")
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"{name}: Adam's step count must be an int >= 1, got {t!r}")


def _check_tensors(b: "NativeBucket", i: int, p, g, m, use_m: bool, device: torch.device, on_cpu: bool) -> None:
    size, dt = b.sizes[i], b.dtype
    if (m is not None) != use_m:
        raise ValueError(f"{b.names[i]}: a momentum buffer is needed exactly when momentum > 0 "
                         f"(and always with Adam)")
    try:  # the common case in one expression: all contiguous CPU tensors of the right kind
        if (on_cpu and p.is_cpu and g.is_cpu and p.dtype is dt and g.dtype is dt and p.numel() == size
                and g.numel() == size and p.is_contiguous() and g.is_contiguous()
                and (m is None or (m.is_cpu and m.dtype is b.math_dtype and m.numel() == size
                                   and m.is_contiguous()))):
            return
    except AttributeError:
        pass
    name = b.names[i]
    checks = (("parameter", p, dt), ("gradient", g, dt), ("momentum buffer", m, b.math_dtype))
    for what, t, want in checks:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {what} is a {type(t).__name__}, not a torch.Tensor")
        if t.device != device:  # a foreign pointer in the table would crash the kernel
            raise ValueError(f"{name}: {what} is on {t.device}, but this bucket's tensors are on "
                             f"{device} (one device per bucket)")
        if not supports(t.device):
            raise ValueError(f"{name}: {what} is on {t.device}; native kernels here: cpu"
                             + (", cuda" if cuda_usable() else ""))
        if t.dtype != want:
            raise ValueError(f"{name}: {what} has dtype {t.dtype}, expected {want}")
        if t.numel() != size:
            raise ValueError(f"{name}: {what} has {t.numel()} elements, the table says "
                             f"{int(b.table[i, ROWS])} rows x {int(b.table[i, ROW_LEN])}")
        if not t.is_contiguous() and not is_dense(t):
            raise ValueError(f"{name}: {what} is not dense in memory (strides {t.stride()})")
        if t is p and not p.is_contiguous() and (b.leads[i] is None
                                                 or not rows_in_place(p, b.leads[i])):
            raise ValueError(f"{name}: the parameter is not contiguous and its rows are not consecutive "
                             f"blocks of its storage (shape {tuple(p.shape)}, strides {p.stride()}); "
                             f"step a contiguous copy")
        if t is not p and not (t.is_contiguous() and p.is_contiguous()) and (
                t.shape != p.shape or t.stride() != p.stride()):
            raise ValueError(f"{name}: {what} is laid out differently from the parameter "
                             f"(shape {tuple(t.shape)}, strides {t.stride()} vs "
                             f"{tuple(p.shape)}, {p.stride()})")
