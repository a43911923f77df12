# Type stub of the compiled module manifold_sgd._C (csrc/bindings.cpp).
# tests/test_stub.py checks that it names exactly what the module defines.
from typing import Any, Dict, Tuple

def fused_step_cpu(
    table: int,
    n_tensors: int,
    groups: int,
    n_groups: int,
    row_index: int,
    n_row_index: int,
    dtype: int,
    report: int,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    adaptive: int,
    curvature: float,
    distance: float,
    psi_max_norm: float,
    retraction: int,
    num_threads: int,
) -> None: ...
def info() -> Dict[str, Any]: ...

# ---- CUDA builds only --------------------------------------------------------------
# The names below exist only when info()["cuda_compiled"] is True; a stub check
# treats them as optional in CPU-only builds (the marker line lists them).
# cuda-only: CudaPlan fused_step_cuda

class CudaPlan:
    def __init__(
        self,
        table: int,
        n_tensors: int,
        groups: int,
        n_groups: int,
        row_index: int,
        n_row_index: int,
        dtype: int,
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        adaptive: int,
        curvature: float,
        distance: float,
        psi_max_norm: float,
    ) -> None: ...
    def blob(self) -> bytes: ...
    @property
    def workspace_bytes(self) -> int: ...
    @property
    def launches(self) -> int: ...
    @property
    def n_items(self) -> Tuple[int, int, int]: ...
    @property
    def grouped(self) -> bool: ...

def fused_step_cuda(
    plan: CudaPlan,
    table: int,
    n_tensors: int,
    table_dev: int,
    plan_dev: int,
    workspace: int,
    report: int,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    adaptive: int,
    curvature: float,
    distance: float,
    psi_max_norm: float,
    device: int,
    stream: int,
) -> None: ...
