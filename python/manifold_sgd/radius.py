"""The rescaled manifolds of FG-SGD §4 (SPEC §4): radius rho = gamma / lambda per row.

``gamma = 1 / sqrt(b + b_hat)`` with ``b`` the fan-in of the row's unit (input channels x
receptive field) and ``b_hat`` the layer's output feature-map size x output channels.
``lambda`` is the standard deviation of the features entering the row over the last
epoch (all input features for filter/tensor rows; the row's input channel for kernel rows
and for column rows, each of which holds one input channel's weights).

``FeatureStats`` attaches forward hooks to a model's Conv/Linear modules and keeps, per
module, the output size per sample and running per-input-channel sums (no activations
are stored). Moments are gathered only from training passes (module in train mode,
autograd on), so a ``torch.no_grad()`` probe pass gives the geometry alone: the first
``rescale`` then uses lambda = 1, as the paper does at t = 1.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

WATCHED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class LayerStats:
    """Geometry and running input moments of one Conv/Linear module."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.weight = module.weight
        self.fan_in = module.weight[0].numel()  # input channels x receptive field
        self.out_size: Optional[int] = None  # output feature-map size x output channels, per sample
        self.in_channels = module.weight.shape[1]
        self.reset()

    def reset(self) -> None:
        self.sum = torch.zeros(self.in_channels, dtype=torch.float64)
        self.sumsq = torch.zeros(self.in_channels, dtype=torch.float64)
        self.count = 0  # elements per channel

    def hook(self, module: nn.Module, inputs, output) -> None:
        out = output.detach()
        self.out_size = out.numel() // out.shape[0] if out.dim() > 1 else out.numel()
        if not (module.training and torch.is_grad_enabled()):
            return
        x = inputs[0].detach()
        ch = x.dim() - 1 if isinstance(module, nn.Linear) else (1 if x.dim() == self.weight.dim() else 0)
        xc = x.movedim(ch, 0).reshape(x.shape[ch], -1)
        self.sum += xc.sum(dim=1, dtype=torch.float64).cpu()
        self.sumsq += (xc.to(torch.float64) ** 2).sum(dim=1).cpu()
        self.count += xc.shape[1]

    def gamma(self) -> float:
        if self.out_size is None:
            raise ValueError(f"module '{self.name}': no forward pass seen yet; run one (e.g. under "
                             f"torch.no_grad()) before rescale()")
        return 1.0 / float(self.fan_in + self.out_size) ** 0.5

    def std_per_channel(self) -> torch.Tensor:
        mean = self.sum / self.count
        return (self.sumsq / self.count - mean * mean).clamp_min(0).sqrt()

    def std_all(self) -> float:
        n = self.count * self.in_channels
        mean = float(self.sum.sum()) / n
        return max(float(self.sumsq.sum()) / n - mean * mean, 0.0) ** 0.5


class FeatureStats:
    """Forward hooks that collect what ``ManifoldSGD.rescale`` needs, cheaply."""

    def __init__(self, model: nn.Module):
        self._by_weight: Dict[int, LayerStats] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, WATCHED):
                rec = LayerStats(name, module)
                self._by_weight[id(module.weight)] = rec
                self._handles.append(module.register_forward_hook(rec.hook))

    def layer(self, weight: torch.Tensor) -> Optional[LayerStats]:
        return self._by_weight.get(id(weight))

    def reset(self) -> None:
        """Start a new epoch's moments (geometry is kept)."""
        for rec in self._by_weight.values():
            rec.reset()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def row_radius(rec: LayerStats, rows: int, granularity: str, use_std: bool) -> Tuple[torch.Tensor, float]:
    """rho = gamma / lambda for each of ``rows`` components of the layer's weight (float32).
    lambda is 1 without measured moments or when ``use_std`` is False."""
    gamma = rec.gamma()
    if not use_std or rec.count == 0:
        lam = torch.ones(rows, dtype=torch.float64)
    elif granularity == "kernel":  # row (out, in) reads input channel `in`
        lam = rec.std_per_channel().repeat(rows // rec.in_channels)
    elif granularity == "column" and rows == rec.in_channels:  # column i reads input channel i
        lam = rec.std_per_channel()
    else:
        lam = torch.full((rows,), rec.std_all(), dtype=torch.float64)
    return (gamma / lam.clamp_min(1e-12)).to(torch.float32), gamma
