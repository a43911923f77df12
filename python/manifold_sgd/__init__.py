"""manifold_sgd: fused SGD on weight manifolds for PyTorch.

``ManifoldSGD`` is a drop-in ``torch.optim.Optimizer``; ``UNSGD``, ``FGSGD`` and
``PSISGD`` preset it to the three papers' methods. The math is in SPEC.md; the
native kernel and the pure-PyTorch reference path compute the same steps.
"""
from . import _native
from .adam import ManifoldAdam
from .optimizer import FGSGD, ManifoldSGD, PSISGD, UNSGD
from .param_groups import ParamGroups, manifold_param_groups
from .radius import FeatureStats

__version__ = "0.1.0"
__all__ = ["ManifoldSGD", "ManifoldAdam", "UNSGD", "FGSGD", "PSISGD", "FeatureStats", "manifold_param_groups",
           "ParamGroups",
           "native_available", "native_info", "__version__"]


def native_available() -> bool:
    """True when the compiled extension imported (the CPU kernel is then usable)."""
    return _native.available()


def native_info() -> dict:
    """Facts about the native build: version, cuda_compiled, num_threads, hardware_threads."""
    return _native.info()
