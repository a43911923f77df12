"""PSI paper §6.1, Figure 4: gradient-norm curves on a toy regression.

Data: n = 1000 samples x ~ N(0, I_10), y = muᵀx + eps, eps ~ N(0, 1), with
mu ~ N(0, I_10) drawn once per run (the paper does not give mu).
Network: f(x) = w1ᵀ ELU(W2 x), w1 in R^100, W2 in R^100x10, no biases, MSE loss;
He-normal initialisation (std sqrt(2 / fan_in)), as the paper assumes in §5.1.

Which parameters are PSI parameters: this network has no batch norm, so no
weight is positively scale-invariant (ELU is not even positively homogeneous,
so a row of W2 is not invariant up to w1 either). The paper applies PSI-SGD to
"the PSI parameters" and plain SGD to the others without saying which weights
of the toy network it counts as PSI; we follow its definition of w^(i) as the
incoming weight vector of a hidden neuron: the 100 rows of W2 take the PSI step
(``manifold="psi"``, w <- w - lr ||w||^2 g), and the output weights w1 take the
Euclidean (S)GD step, as the non-PSI parameters g of Algorithm 1 do. PSI-SGD is
therefore SGD with a per-row learning rate lr ||w_i||^2 on W2.

Optimisers (as in the paper's list minus SGDG): SGD with momentum 0.9, Adam,
PSI-SGD (momentum 0) and PSI-SGDM (momentum 0.9), mini-batches of 50, the
learning rate divided by 5 at 50% and 75% of the epochs (the paper's schedule
shape for CIFAR; §6.1 gives none). Each method's base learning rate is the one
of a small grid with the lowest final full-batch gradient norm on the first
run's data; the curves are the full-batch Euclidean gradient norm
||(dL/dW2, dL/dw1)|| after every epoch, geometric mean over runs (shaded:
min-max).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Dict, List

import torch
from torch import nn
import torch.nn.functional as F

from .. import PSISGD
from . import _common as C

NAME = "psi-toy"
METHODS = ("SGD", "Adam", "PSI-SGD", "PSI-SGDM")


class ToyNet(nn.Module):
    def __init__(self, d: int = 10, hidden: int = 100):
        super().__init__()
        self.W2 = nn.Linear(d, hidden, bias=False)
        self.w1 = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.W2.weight, std=math.sqrt(2.0 / d))
            nn.init.normal_(self.w1.weight, std=math.sqrt(2.0 / hidden))

    def forward(self, x):
        return self.w1(F.elu(self.W2(x))).squeeze(-1)


def make_optimizer(method: str, model: ToyNet, lr: float):
    if method == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if method == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    groups = [{"params": [model.W2.weight], "manifold": "psi"},
              {"params": [model.w1.weight], "manifold": "euclidean"}]
    if method == "PSI-SGD":
        return PSISGD(groups, lr=lr, momentum=0.0)
    if method == "PSI-SGDM":
        return PSISGD(groups, lr=lr, momentum=0.9)
    raise ValueError(method)


def make_data(n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    mu = torch.randn(d, generator=g)
    y = x @ mu + torch.randn(n, generator=g)
    return x, y


def full_batch(model: ToyNet, x, y):
    """(loss, Euclidean gradient norm) on the whole training set."""
    model.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(loss.detach()), float(torch.sqrt(sum((g * g).sum() for g in grads)))


def train(method: str, lr: float, cfg: Dict, seed: int, bar) -> Dict:
    x, y = make_data(cfg["n"], 10, seed)
    torch.manual_seed(seed)
    model = ToyNet()
    opt = make_optimizer(method, model, lr)
    gen = torch.Generator().manual_seed(seed + 1)
    loss0, gn0 = full_batch(model, x, y)
    losses, gnorms = [loss0], [gn0]
    step_time = 0.0
    milestones = [int(f * cfg["epochs"]) for f in cfg["decay_at"]]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=cfg["decay"])
    for _ in range(cfg["epochs"]):
        for idx in C.batches(cfg["n"], cfg["batch_size"], gen):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x[idx]), y[idx]).backward()
            t = time.perf_counter()
            opt.step()
            step_time += time.perf_counter() - t
        sched.step()
        loss, gn = full_batch(model, x, y)
        losses.append(loss)
        gnorms.append(gn)
        bar.update(1)
        if not math.isfinite(loss):
            break
    row_norms = C.tensor_rows_norm(model.W2.weight)
    return {"loss": losses, "grad_norm": gnorms, "final_loss": losses[-1],
            "final_grad_norm": gnorms[-1], "min_grad_norm": min(gnorms),
            "W2_row_norm_mean": float(row_norms.mean()), "W2_row_norm_max": float(row_norms.max()),
            "optimizer_step_seconds": step_time}


def config(args) -> Dict:
    sgd = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    grids = {"SGD": sgd, "Adam": [1e-4, 1e-3, 1e-2, 1e-1], "PSI-SGD": sgd, "PSI-SGDM": sgd}
    common = dict(n=1000, batch_size=50, decay=0.2, decay_at=[0.5, 0.75], select_by="final_grad_norm")
    if args.quick:
        return dict(common, runs=args.runs or 1, epochs=3,
                    lr_grid={m: [1e-2] for m in grids})
    return dict(common, runs=args.runs or 5, epochs=100, lr_grid=grids)


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def run(args) -> Dict:
    t0 = C.start(args)
    cfg = config(args)
    total = sum(len(g) for g in cfg["lr_grid"].values() if len(g) > 1) * cfg["epochs"] + \
        len(METHODS) * cfg["runs"] * cfg["epochs"]
    bar = C.progress(total, NAME, args.no_progress)
    selection, chosen = {}, {}
    for m in METHODS:  # learning rate: lowest final training loss on the first run's data
        scores = {}
        for lr in cfg["lr_grid"][m] if len(cfg["lr_grid"][m]) > 1 else []:  # one value: no choice
            bar.set_postfix_str(f"select {m} lr={lr:g}")
            C.seed_everything(args.seed)
            with warnings.catch_warnings():  # a diverging candidate warns about non-finite steps
                warnings.simplefilter("ignore", RuntimeWarning)
                scores[lr] = train(m, lr, cfg, args.seed, bar)[cfg["select_by"]]
        selection[m] = {str(k): (v if _finite(v) else None) for k, v in scores.items()}
        ok = {k: v for k, v in scores.items() if _finite(v)}
        chosen[m] = min(ok, key=ok.get) if ok else min(cfg["lr_grid"][m])
        if len(cfg["lr_grid"][m]) == 1:
            chosen[m] = cfg["lr_grid"][m][0]
    runs: Dict[str, List[Dict]] = {m: [] for m in METHODS}
    for r in range(cfg["runs"]):
        for m in METHODS:
            bar.set_postfix_str(f"run {r} {m}")
            C.seed_everything(args.seed + r)
            res = train(m, chosen[m], cfg, args.seed + r, bar)
            res["seed"] = args.seed + r
            runs[m].append(res)
    bar.close()
    summary = {m: {"lr": chosen[m],
                   "final_grad_norm": C.mean_std([rr["final_grad_norm"] for rr in runs[m]]),
                   "final_loss": C.mean_std([rr["final_loss"] for rr in runs[m]]),
                   "W2_row_norm_mean": C.mean_std([rr["W2_row_norm_mean"] for rr in runs[m]]),
                   "epochs_to_grad_norm_below": _epochs_below(runs[m], cfg)}
               for m in METHODS}
    result = {"config": cfg, "methods": list(METHODS), "lr_selection": selection,
              "chosen_lr": chosen, "summary": summary, "runs": runs,
              "psi_parameters": "rows of W2 (manifold='psi'); w1 Euclidean"}
    return C.finish(NAME, args, result, t0, plot)


def _epochs_below(runs: List[Dict], cfg: Dict) -> Dict[str, float]:
    """Mean first epoch at which the full-batch gradient norm is below a threshold (None: never)."""
    out = {}
    for thr in (1e-1, 1e-2):
        firsts = []
        for rr in runs:
            hit = [i for i, g in enumerate(rr["grad_norm"]) if _finite(g) and g < thr]
            firsts.append(hit[0] if hit else None)
        out[f"{thr:g}"] = (sum(firsts) / len(firsts)) if all(f is not None for f in firsts) else None
    return out


def plot(result: Dict, args) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    colors = {"SGD": "tab:blue", "Adam": "tab:green", "PSI-SGD": "tab:red", "PSI-SGDM": "tab:purple"}
    for key, ax, label in (("grad_norm", axes[0], "full-batch gradient norm"),
                           ("loss", axes[1], "training MSE")):
        for m in result["methods"]:
            curves = [rr[key] for rr in result["runs"][m]]
            n = min(len(c) for c in curves)
            cols = [[c[i] for c in curves] for i in range(n)]
            ok = [all(_finite(v) for v in col) for col in cols]
            xs = [i for i in range(n) if ok[i]]
            logs = [[math.log(max(v, 1e-30)) for v in cols[i]] for i in xs]
            mean = [math.exp(sum(lv) / len(lv)) for lv in logs]
            ax.plot(xs, mean, color=colors[m], label=f"{m} (lr={result['chosen_lr'][m]:g})")
            ax.fill_between(xs, [min(cols[i]) for i in xs], [max(cols[i]) for i in xs],
                            color=colors[m], alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("PSI paper Fig. 4 (toy): gradient norm")
    axes[1].set_title("training loss")
    fig.tight_layout()
    C.save_figure(fig, args, NAME)


def _ep(x) -> str:
    return "never" if x is None else f"{x:.1f}"


def format_table(res: Dict) -> str:
    lines = []
    lines.append(f"{NAME}: after {res['config']['epochs']} epochs, mean ± std over {res['config']['runs']} runs")
    lines.append("| method | lr | final grad norm | final MSE | epochs to grad norm < 1e-1 / < 1e-2 |")
    lines.append("|---|---|---|---|---|")
    for m in res["methods"]:
        s = res["summary"][m]
        e = s["epochs_to_grad_norm_below"]
        lines.append(f"| {m} | {s['lr']:g} | {s['final_grad_norm']['mean']:.2e} ± {s['final_grad_norm']['std']:.1e} "
              f"| {s['final_loss']['mean']:.4f} ± {s['final_loss']['std']:.4f} | {_ep(e['0.1'])} / {_ep(e['0.01'])} |")
    return "\n".join(lines)
