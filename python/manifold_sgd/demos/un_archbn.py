"""UN paper, Table 2: two- and four-layer ArchBN, balanced SGD (B-SGD) vs the UN update.

ArchBN (UN paper §2, Fig. 1): every layer is a bias-free fully connected layer
with 64 filters, batch normalisation (trainable scale and shift), ReLU and 2x1
max-pooling with stride 2 (64 -> 32 features); a 10-way soft-max classifier
theta (10 x 32, no bias) on top; cross-entropy loss. Filters and class vectors
are drawn from a standard Gaussian and unit-normalised (§4).

* B-SGD: Euclidean SGD on everything, started from those unit-normalised rows.
* UN: ``UNSGD`` on the filters W_l (unit-norm rows, oblique manifold, eq. 2);
  theta and the batch-norm parameters by Euclidean SGD (Table 1).

Protocol (§4), scaled to the digits: for every run, the base learning rate is
chosen from a grid by training with a fixed rate on a random subset and reading
the validation loss ("error per training sample"); diverged candidates are
ignored. The chosen rate then trains on the training split with the bold-driver
schedule (x1.05 after an epoch whose training loss fell, x0.5 otherwise), at
least ``min_epochs`` and at most ``max_epochs`` epochs, stopping early when the
training loss is below 1e-5, the validation loss is above the one five epochs
before, or two successive validation losses differ by less than 1e-5. The test
error after the last epoch is reported.

MNIST cannot be downloaded here: the data is scikit-learn's bundled 8x8 digits,
flattened to 64 dimensions and scaled to [0, 1].
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn
import torch.nn.functional as F

from .. import UNSGD
from . import _common as C

NAME = "un-archbn"


class ArchBN(nn.Module):
    """``depth`` x [Linear(no bias) -> BatchNorm -> ReLU -> 2x1 max-pool] -> theta."""

    def __init__(self, depth: int, in_dim: int = 64, features: int = 64, classes: int = 10):
        super().__init__()
        self.filters = nn.ModuleList()
        self.norms = nn.ModuleList()
        d = in_dim
        for _ in range(depth):
            self.filters.append(nn.Linear(d, features, bias=False))
            self.norms.append(nn.BatchNorm1d(features))
            d = features // 2
        self.theta = nn.Linear(d, classes, bias=False)
        with torch.no_grad():  # standard Gaussian, each filter / class vector unit-normalised
            for lin in list(self.filters) + [self.theta]:
                w = torch.randn_like(lin.weight)
                lin.weight.copy_(w / w.norm(dim=1, keepdim=True))

    def forward(self, x):
        for lin, bn in zip(self.filters, self.norms):
            x = F.relu(bn(lin(x)))
            x = F.max_pool1d(x.unsqueeze(1), kernel_size=2, stride=2).squeeze(1)
        return self.theta(x)

    def filter_params(self) -> List[nn.Parameter]:
        return [lin.weight for lin in self.filters]

    def other_params(self) -> List[nn.Parameter]:
        return [self.theta.weight] + [p for bn in self.norms for p in bn.parameters()]


def make_optimizer(method: str, model: ArchBN, lr: float):
    if method == "B-SGD":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if method == "UN":
        return UNSGD([{"params": model.filter_params()},
                      {"params": model.other_params(), "manifold": "euclidean"}], lr=lr)
    raise ValueError(method)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.eval()
    out = model(x)
    model.train()
    loss = float(F.cross_entropy(out, y))
    err = float((out.argmax(1) != y).float().mean())
    return loss, err


def train_epoch(model, opt, x, y, batch_size, gen) -> float:
    total, n = 0.0, 0
    for idx in C.batches(len(y), batch_size, gen):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        n += len(idx)
    return total / n


def select_lr(method, depth, cfg, xs, seed, bar) -> Dict:
    """Train with each candidate rate on the selection subset; lowest validation loss wins."""
    xtr, ytr, xva, yva = xs
    scores = {}
    for lr in cfg["lr_grid"]:
        torch.manual_seed(seed)
        model = ArchBN(depth)
        opt = make_optimizer(method, model, lr)
        gen = torch.Generator().manual_seed(seed + 17)
        val = float("nan")
        for _ in range(cfg["select_epochs"]):
            tr = train_epoch(model, opt, xtr, ytr, cfg["batch_size"], gen)
            if not math.isfinite(tr):
                break
            bar.update(1)
        else:
            val, _ = evaluate(model, xva, yva)
        scores[lr] = val if math.isfinite(val) else None
    finite = {k: v for k, v in scores.items() if v is not None}
    best = min(finite, key=finite.get) if finite else min(cfg["lr_grid"])
    return {"lr": best, "val_loss": {str(k): v for k, v in scores.items()}}


def full_run(method, depth, lr, cfg, data, seed, bar) -> Dict:
    xtr, ytr, xva, yva, xte, yte = data
    torch.manual_seed(seed)
    model = ArchBN(depth)
    opt = make_optimizer(method, model, lr)
    gen = torch.Generator().manual_seed(seed + 29)
    train_curve, val_curve, lrs = [], [], []
    prev_train = float("inf")
    stop = "max_epochs"
    for epoch in range(cfg["max_epochs"]):
        for g in opt.param_groups:
            g["lr"] = lr
        lrs.append(lr)
        tr = train_epoch(model, opt, xtr, ytr, cfg["batch_size"], gen)
        bar.update(1)
        va, _ = evaluate(model, xva, yva)
        train_curve.append(tr)
        val_curve.append(va)
        if not (math.isfinite(tr) and math.isfinite(va)):
            stop = "diverged"
            break
        lr = lr * 1.05 if tr < prev_train else lr * 0.5  # bold driver
        prev_train = tr
        if epoch + 1 >= cfg["min_epochs"]:
            if tr < 1e-5:
                stop = "train_loss<1e-5"
                break
            if len(val_curve) > 5 and va > val_curve[-6]:
                stop = "val_loss_up_vs_5_epochs_before"
                break
            if len(val_curve) > 1 and abs(va - val_curve[-2]) < 1e-5:
                stop = "val_loss_flat"
                break
    test_loss, test_err = evaluate(model, xte, yte)
    norms = torch.cat([C.tensor_rows_norm(w) for w in model.filter_params()])
    return {"test_error": test_err, "test_loss": test_loss, "epochs": len(train_curve),
            "stop": stop, "train_loss": train_curve, "val_loss": val_curve, "lr_schedule": lrs,
            "filter_row_norm_min": float(norms.min()), "filter_row_norm_max": float(norms.max()),
            "filter_row_norm_max_dev": float((norms - 1).abs().max())}


def config(args) -> Dict:
    if args.quick:
        return dict(runs=args.runs or 1, depths=[2, 4], lr_grid=[1e-1, 1e-2], select_epochs=1,
                    select_train=200, val=150, min_epochs=2, max_epochs=2, batch_size=64)
    return dict(runs=args.runs or 10, depths=[2, 4], lr_grid=[10.0, 1.0, 1e-1, 1e-2],
                select_epochs=10, select_train=600, val=300, min_epochs=10, max_epochs=25,
                batch_size=32)


METHODS = ("B-SGD", "UN")


def run(args) -> Dict:
    t0 = C.start(args)
    cfg = config(args)
    x, y = C.load_digits_tensors()
    tr_pool, te = C.stratified_split(y, 0.2, seed=12345)  # fixed test set
    xte, yte = x[te], y[te]
    n_epochs = len(cfg["depths"]) * len(METHODS) * cfg["runs"] * (
        len(cfg["lr_grid"]) * cfg["select_epochs"] + cfg["max_epochs"])
    bar = C.progress(n_epochs, NAME, args.no_progress)
    runs: Dict[str, Dict[str, List[Dict]]] = {str(d): {m: [] for m in METHODS} for d in cfg["depths"]}
    for r in range(cfg["runs"]):
        seed = args.seed + r
        gen = C.seed_everything(seed)
        n_pool = len(tr_pool)
        # selection: a validation set and a random training subset; full run: train/val split
        sel_val, sel_tr = C.split_indices(n_pool, [cfg["val"], cfg["select_train"]], gen)
        full_val, full_tr = C.split_indices(n_pool, [cfg["val"], n_pool - cfg["val"]], gen)
        sel = (x[tr_pool[sel_tr]], y[tr_pool[sel_tr]], x[tr_pool[sel_val]], y[tr_pool[sel_val]])
        data = (x[tr_pool[full_tr]], y[tr_pool[full_tr]], x[tr_pool[full_val]], y[tr_pool[full_val]],
                xte, yte)
        for depth in cfg["depths"]:
            for method in METHODS:
                bar.set_postfix_str(f"run {r} depth {depth} {method}")
                chosen = select_lr(method, depth, cfg, sel, seed, bar)
                res = full_run(method, depth, chosen["lr"], cfg, data, seed, bar)
                res.update({"seed": seed, "lr": chosen["lr"], "selection_val_loss": chosen["val_loss"]})
                runs[str(depth)][method].append(res)
    bar.close()
    table = {d: {m: C.mean_std([rr["test_error"] for rr in runs[d][m]
                                if rr["stop"] != "diverged"]) for m in METHODS} for d in runs}
    result = {"config": cfg, "methods": list(METHODS), "table": table, "runs": runs,
              "data": {"dataset": "sklearn load_digits (8x8, flattened to 64, /16)",
                       "train_pool": len(tr_pool), "test": len(te)}}
    return C.finish(NAME, args, result, t0, plot)


def plot(result: Dict, args) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    depths = list(result["table"].keys())
    colors = {"B-SGD": "tab:blue", "UN": "tab:red"}
    ax = axes[0]
    for i, m in enumerate(result["methods"]):
        means = [100 * result["table"][d][m]["mean"] for d in depths]
        stds = [100 * result["table"][d][m]["std"] for d in depths]
        ax.bar([j + 0.38 * i for j in range(len(depths))], means, 0.38, yerr=stds, capsize=3,
               label=m, color=colors[m])
    ax.set_xticks([j + 0.19 for j in range(len(depths))], [f"{d} layers" for d in depths])
    ax.set_ylabel("test error (%)")
    ax.set_title("test error, mean ± std")
    ax.legend()
    for ax, d in zip(axes[1:], depths):
        for m in result["methods"]:
            for k, rr in enumerate(result["runs"][d][m]):
                ax.plot(range(1, len(rr["train_loss"]) + 1), rr["train_loss"], color=colors[m],
                        alpha=0.5, lw=1, label=m if k == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.set_title(f"ArchBN, {d} layers (all runs)")
        ax.legend()
    fig.suptitle("UN paper Table 2 on 8x8 digits: B-SGD vs UN", fontsize=10)
    fig.tight_layout()
    C.save_figure(fig, args, NAME)


def format_table(res: Dict) -> str:
    lines = [f"{NAME}: test error after the last epoch, mean ± std over runs "
             f"(chosen learning rates: count of runs; mean epochs trained)"]
    lines.append("| depth | " + " | ".join(res["methods"]) + " | " +
                 " | ".join(f"{m} lr / epochs" for m in res["methods"]) + " |")
    lines.append("|---|" + "---|" * (2 * len(res["methods"])))
    for d, row in res["table"].items():
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in res["methods"]]
        extra = []
        for m in res["methods"]:
            rr = res["runs"][d][m]
            lrs = sorted({r["lr"] for r in rr}, reverse=True)
            counts = ", ".join(f"{lr:g}: {sum(r['lr'] == lr for r in rr)}" for lr in lrs)
            epochs = sum(r["epochs"] for r in rr) / len(rr)
            extra.append(f"{counts}; {epochs:.1f}")
        lines.append(f"| {d} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)
