# Type stub of the compiled module manifold_sgd._C (csrc/bindings.cpp).
# tests/test_build.py checks that it names exactly what the module defines, with the same
# parameters in the same order.
from typing import Any, Dict, Tuple

class StepOptions:
    """The options record of one step (csrc/core/step.h); enum fields by name."""

    algorithm: str  # "sgd" | "adam"
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    adaptive: str  # "none" | "sphere" | "general"
    curvature: float
    distance: float
    psi_max_norm: float
    retraction: str  # "qr" | "polar"
    beta1: float  # Adam
    beta2: float
    eps: float
    second_moment: str  # "row" | "element"
    def __init__(
        self,
        *,
        algorithm: str = "sgd",
        lr: float = 0.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        adaptive: str = "none",
        curvature: float = 1.0,
        distance: float = 1.0,
        psi_max_norm: float = 1e4,
        retraction: str = "qr",
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        second_moment: str = "row",
    ) -> None: ...
    def validate(self) -> str: ...

class StepTables:
    """Addresses and sizes of a bucket's int64 tables and the dtype tag of its tensors."""

    def __init__(
        self,
        table: int,
        n_tensors: int,
        groups: int,
        n_groups: int,
        row_index: int,
        n_row_index: int,
        dtype: int,
    ) -> None: ...
    @property
    def n_tensors(self) -> int: ...
    @property
    def n_groups(self) -> int: ...
    @property
    def n_row_index(self) -> int: ...
    @property
    def dtype(self) -> int: ...

def fused_step_cpu(tables: StepTables, options: StepOptions, report: int, num_threads: int) -> None: ...
def info() -> Dict[str, Any]: ...

# ---- CUDA builds only --------------------------------------------------------------
# The names below exist only when info()["cuda_compiled"] is True; a stub check
# treats them as optional in CPU-only builds (the marker line lists them).
# cuda-only: CudaPlan fused_step_cuda cuda_versions

class CudaPlan:
    def __init__(self, tables: StepTables, options: StepOptions) -> None: ...
    def blob(self) -> bytes: ...
    @property
    def workspace_bytes(self) -> int: ...
    @property
    def launches(self) -> int: ...
    @property
    def n_items(self) -> Tuple[int, int, int]: ...
    @property
    def grouped(self) -> bool: ...
    @property
    def algorithm(self) -> str: ...

def fused_step_cuda(
    plan: CudaPlan,
    tables: StepTables,
    table_dev: int,
    plan_dev: int,
    workspace: int,
    report: int,
    options: StepOptions,
    device: int,
    stream: int,
) -> None: ...
def cuda_versions() -> Dict[str, Any]: ...
