"""PSI paper, Figure 1: SGD vs PSI-SGD on a two-layer batch-norm network with unbalanced initialisation.

Network (PSI paper eq. 1 with L = 2): x (64) -> Linear(64, 64, no bias) -> BN ->
ReLU -> Linear(64, 10, no bias) -> BN -> soft-max cross-entropy. Both weight
matrices are positively scale-invariant per row (every neuron feeds a batch
norm), so the loss satisfies L(W) = L(T_a(W)) for any per-row scales a_i > 0.

Balanced initialisation W: PyTorch's default Linear initialisation.
Unbalanced initialisation T_a(W): in each layer, the even-numbered neurons
(rows) are multiplied by 1e4 and the odd-numbered ones by 1e-4, the two scales
of the paper's Figure 1. Both start from the same function.

* SGD: Euclidean SGD on everything.
* PSI-SGD: ``PSISGD`` (momentum 0); the weight rows take the PSI step
  w <- w - lr ||w||^2 g, the batch-norm scales and shifts Euclidean SGD.

Each optimiser's learning rate is the one of a small grid with the lowest final
training loss from the balanced start (so SGD gets its own best setting, chosen
where it works well; PSI-SGD's choice is the same from either start). The
batch norms use eps = 1e-20 instead of PyTorch's 1e-5: a row scaled by 1e-4
produces features of variance ~1e-10, far below the default eps, which would
break the scale invariance that both the paper and this experiment rely on. The
network runs in float64 so that such variances are resolved and PSI-SGD's
trajectories from W and T_a(W) can be compared (the paper's Theorem 1).

MNIST cannot be downloaded here: the data is scikit-learn's bundled 8x8 digits.
"""
from __future__ import annotations

import warnings
from typing import Dict, List

import torch
from torch import nn
import torch.nn.functional as F

from .. import PSISGD
from . import _common as C

NAME = "psi-unbalanced"
SCALES = (1e4, 1e-4)
CURVES = ("SGD, unbalanced", "PSI-SGD, unbalanced", "SGD, balanced", "PSI-SGD, balanced")


class TwoLayerBN(nn.Module):
    def __init__(self, d: int = 64, hidden: int = 64, classes: int = 10, eps: float = 1e-20):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, classes, bias=False)
        self.bn2 = nn.BatchNorm1d(classes, eps=eps)

    def forward(self, x):
        return self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))

    def weights(self) -> List[nn.Parameter]:
        return [self.fc1.weight, self.fc2.weight]

    @torch.no_grad()
    def unbalance(self) -> None:
        """T_a: rows 0, 2, 4, ... times 1e4; rows 1, 3, 5, ... times 1e-4."""
        for w in self.weights():
            a = torch.tensor([SCALES[i % 2] for i in range(w.shape[0])], dtype=w.dtype)
            w.mul_(a.view(-1, 1))


def make_model(seed: int, unbalanced: bool) -> TwoLayerBN:
    torch.manual_seed(seed)
    model = TwoLayerBN().double()
    if unbalanced:
        model.unbalance()
    return model


def make_optimizer(method: str, model: TwoLayerBN, lr: float):
    if method == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if method == "PSI-SGD":
        return PSISGD(model.parameters(), lr=lr)  # auto: 2-D weights psi, BN params Euclidean
    raise ValueError(method)


@torch.no_grad()
def evaluate(model, x, y, xtr):
    """Test loss and error in eval mode, after re-estimating the batch-norm statistics on the
    training set (the running averages lag far behind the 1e-4-scaled rows otherwise)."""
    for bn in (model.bn1, model.bn2):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    model(xtr)
    model.eval()
    out = model(x)
    model.train()
    return float(F.cross_entropy(out, y)), float((out.argmax(1) != y).double().mean())


def train(method: str, unbalanced: bool, lr: float, cfg: Dict, data, seed: int, bar) -> Dict:
    xtr, ytr, xte, yte = data
    model = make_model(seed, unbalanced)
    opt = make_optimizer(method, model, lr)
    gen = torch.Generator().manual_seed(seed + 7)
    step_losses, epoch_losses = [], []
    for _ in range(cfg["epochs"]):
        tot, n = 0.0, 0
        for idx in C.batches(len(ytr), cfg["batch_size"], gen):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            step_losses.append(float(loss.detach()))
            tot += step_losses[-1] * len(idx)
            n += len(idx)
        epoch_losses.append(tot / n)
        bar.update(1)
    test_loss, test_err = evaluate(model, xte, yte, xtr)
    norms = {name: C.tensor_rows_norm(w).tolist() for name, w in
             (("fc1", model.fc1.weight), ("fc2", model.fc2.weight))}
    return {"step_loss": step_losses, "epoch_loss": epoch_losses, "final_train_loss": epoch_losses[-1],
            "test_error": test_err, "test_loss": test_loss,
            "row_norm_range": {k: [min(v), max(v)] for k, v in norms.items()}}


def config(args) -> Dict:
    if args.quick:
        return dict(runs=args.runs or 1, epochs=3, batch_size=64, lr_grid=[0.1])
    return dict(runs=args.runs or 5, epochs=30, batch_size=64, lr_grid=[0.01, 0.1, 1.0, 3.0])


def run(args) -> Dict:
    t0 = C.start(args)
    cfg = config(args)
    x, y = C.load_digits_tensors(torch.float64)
    tr, te = C.stratified_split(y, 0.2, seed=12345)
    data = (x[tr], y[tr], x[te], y[te])
    methods = ("SGD", "PSI-SGD")
    total = (len(methods) * len(cfg["lr_grid"]) * (len(cfg["lr_grid"]) > 1) + 4 * cfg["runs"]) * cfg["epochs"]
    bar = C.progress(total, NAME, args.no_progress)
    selection, lrs = {}, {}
    for m in methods:  # each optimiser's best rate from the balanced start
        selection[m] = {}
        for lr in cfg["lr_grid"] if len(cfg["lr_grid"]) > 1 else []:  # one value: no choice
            bar.set_postfix_str(f"select {m} lr={lr:g}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                selection[m][lr] = train(m, False, lr, cfg, data, args.seed, bar)["final_train_loss"]
        ok = {k: v for k, v in selection[m].items() if v == v}
        lrs[m] = min(ok, key=ok.get) if ok else min(cfg["lr_grid"])
    runs: Dict[str, List[Dict]] = {c: [] for c in CURVES}
    for r in range(cfg["runs"]):
        seed = args.seed + r
        C.seed_everything(seed)
        for curve in CURVES:
            method, init = curve.split(", ")
            bar.set_postfix_str(f"run {r} {curve}")
            res = train(method, init == "unbalanced", lrs[method], cfg, data, seed, bar)
            res["seed"] = seed
            runs[curve].append(res)
    bar.close()
    # Theorem 1: PSI-SGD from W and from T_a(W) gives the same functions, hence the same losses
    gaps = [max(abs(a - b) for a, b in zip(runs["PSI-SGD, unbalanced"][r]["step_loss"],
                                           runs["PSI-SGD, balanced"][r]["step_loss"]))
            for r in range(cfg["runs"])]
    equiv = max(gaps)
    for c in CURVES:  # keep the JSON small: per-iteration losses of the first run only
        for rr in runs[c][1:]:
            del rr["step_loss"]
    summary = {c: {"final_train_loss": C.mean_std([rr["final_train_loss"] for rr in runs[c]]),
                   "test_error": C.mean_std([rr["test_error"] for rr in runs[c]])} for c in CURVES}
    result = {"config": cfg, "lr": lrs,
              "lr_selection_balanced": {m: {str(k): v for k, v in sel.items()} for m, sel in selection.items()},
              "curves": list(CURVES), "summary": summary,
              "psi_equivariance_max_loss_gap": equiv, "psi_equivariance_gap_per_run": gaps,
              "runs": runs,
              "init": {"balanced": "torch default Linear init",
                       "unbalanced": "rows alternately x1e4 / x1e-4 in both layers"}}
    return C.finish(NAME, args, result, t0, plot)


def plot(result: Dict, args) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    style = {"SGD, unbalanced": ("tab:blue", "-"), "PSI-SGD, unbalanced": ("tab:red", "-"),
             "SGD, balanced": ("tab:blue", ":"), "PSI-SGD, balanced": ("tab:red", ":")}
    for c in result["curves"]:
        color, ls = style[c]
        rr = result["runs"][c][0]
        k = max(1, len(rr["step_loss"]) // 300)  # thin to keep the PNG small
        axes[0].plot(range(0, len(rr["step_loss"]), k), rr["step_loss"][::k], color=color, ls=ls,
                     lw=1, label=c)
        curves = [r["epoch_loss"] for r in result["runs"][c]]
        mean = [sum(v) / len(v) for v in zip(*curves)]
        axes[1].plot(range(1, len(mean) + 1), mean, color=color, ls=ls, label=c)
    lr = ", ".join(f"{m} lr={v:g}" for m, v in result["lr"].items())
    axes[0].set_title(f"mini-batch loss (seed {result['seed']}; {lr})", fontsize=9)
    axes[0].set_xlabel("iteration")
    axes[1].set_title(f"epoch training loss, mean over {result['config']['runs']} runs")
    axes[1].set_xlabel("epoch")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("cross-entropy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    C.save_figure(fig, args, NAME)


def format_table(res: Dict) -> str:
    lines = []
    lr = ", ".join(f"{m} lr={v:g}" for m, v in res["lr"].items())
    lines.append(f"{NAME}: {lr}, {res['config']['epochs']} epochs, mean ± std over "
          f"{res['config']['runs']} runs")
    lines.append("| optimizer, init | final training loss | test error |")
    lines.append("|---|---|---|")
    for c in res["curves"]:
        s = res["summary"][c]
        lines.append(f"| {c} | {s['final_train_loss']['mean']:.4f} ± {s['final_train_loss']['std']:.4f} "
              f"| {s['test_error']['mean']:.4f} ± {s['test_error']['std']:.4f} |")
    lines.append(f"PSI-SGD balanced vs unbalanced, largest gap between mini-batch losses: "
          f"{res['psi_equivariance_max_loss_gap']:.2e}")
    return "\n".join(lines)
