# Type stub of the compiled module manifold_sgd._C (csrc/bindings.cpp).
# tests/test_stub.py checks that it names exactly what the module defines.
from typing import Any, Dict

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
