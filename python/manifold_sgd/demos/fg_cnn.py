"""FG-SGD: a small batch-norm CNN on 8x8 digits; SGD vs UN vs FG-SGD (PI, PO, PIO; Stiefel; gamma/lambda radius).

The FG-SGD paper's experiments are in its supplement (CIFAR / ImageNet CNNs),
which we do not have; this demo exercises its method at a size this machine can
run: three 3x3 conv layers (1->16->32->32 channels, no bias, each followed by
batch norm and ReLU; 2x2 max-pool after the second, global average pool after
the third) and a linear classifier, on scikit-learn's bundled digits as 1x8x8
images scaled to [0, 1].

* SGD: Euclidean SGD on everything.
* UN: ``UNSGD`` on the conv weights: every filter (d_in x 3 x 3) on the unit
  sphere (the oblique manifold of the UN paper), no adaptive step.
* FG-SGD PI / PO / PIO: ``FGSGD`` with ``granularity="kernel"``: every 3x3 kernel
  slice w[o, i] is a component on its own unit sphere (the paper's
  omega^i in R^{A x B}); components are grouped into products of manifolds
  (POMs) over input channels (PI: the kernels of one output filter), over
  output channels (PO: the kernels reading one input channel), or across both
  (PIO: random groups of ``pio_group_size`` kernels drawn without replacement
  from the whole layer), and each group's step is divided by
  r = max(1, R (2 + R)), R the group's Riemannian gradient norm (eq. 6, 7).
  Unit radius, no momentum (Algorithm 1 has none). The demo also counts
  how often that division is active (r > 1, i.e. R > sqrt(2) - 1) per layer.
* FG-SGD PO Stiefel: the paper's second component manifold, St(A, B) for a
  weight omega^i in R^{A x B} (its §1.1 and Table 2): with
  ``manifold="stiefel", granularity="kernel"`` each 3x3 kernel slice w[o, i] is
  one 3 x 3 block with orthonormal rows (a 3x3 orthogonal matrix: spectral norm
  1, Frobenius norm sqrt(3)), the block shape the library gives a conv kernel
  (kh x kw). PO groups of blocks as above, the same adaptive step (eq. 7; with
  curvature bound 1, which bounds the curvature of these blocks too), and the
  polar retraction (the projection onto the manifold, treating the kernel's
  three rows alike, where QR would favour the first).
* FG-SGD PO gamma/lambda: PO on kernel spheres of radius
  rho = gamma / lambda (FG-SGD §4, eq. 2; ``radius="geometric_std"``):
  gamma = 1 / sqrt(b + b_hat) with b the fan-in and b_hat the layer's output
  size (channels x feature map), lambda the standard deviation of the input
  channel the kernel reads, over the previous epoch. ``FeatureStats`` hooks
  collect the moments; as the README prescribes, a no-grad probe pass gives the
  geometry and ``opt.rescale(stats)`` puts the rows on gamma (lambda = 1)
  before the first step, then ``rescale`` runs at every epoch boundary (before
  epochs 2..T: after the last epoch there is no next one, and a rescale there
  would change the function under batch norm's running statistics right
  before testing). The rescale time counts as optimizer time.

Batch-norm parameters and the classifier are Euclidean in every method, and no
method uses momentum or weight decay. Each method's learning rate is the one
of a small grid with the lowest validation loss (first seed, a validation
split of the training set; the loss separates candidates that 300 validation
images score at the same accuracy); then every seed trains on the full training split
and is scored on the fixed test split. The grid is {0.3, 1, 3}, moved for the
two variants whose components are not unit vectors: behind batch norm a
step's effect scales as lr / radius^2, so the Stiefel kernels (norm sqrt(3))
get {1, 3, 10} and the gamma/lambda kernels (norm 0.03-0.08) {0.01, 0.03, 0.1},
the three points around the best of a wider sweep (0.003-1) on the same validation
split. The time of ``optimizer.step()`` is
summed over each epoch (one thread; the machine is shared, so read the times
as rough ratios).
"""
from __future__ import annotations

import time
import warnings
from typing import Dict, List

import torch
from torch import nn
import torch.nn.functional as F

from .. import FGSGD, UNSGD, FeatureStats, grouping, reference
from . import _common as C

NAME = "fg-cnn"
#: the FG-SGD variants: options of the conv weights' param group (all with granularity="kernel")
FG_VARIANTS = {
    "FG-SGD PI": dict(grouping="PI"),
    "FG-SGD PO": dict(grouping="PO"),
    "FG-SGD PIO": dict(grouping="PIO"),
    "FG-SGD PO Stiefel": dict(grouping="PO", manifold="stiefel", retraction="polar"),
    "FG-SGD PO γ/λ": dict(grouping="PO", radius="geometric_std"),
}
METHODS = ("SGD", "UN", *FG_VARIANTS)


class SmallCNN(nn.Module):
    def __init__(self, channels=(16, 32, 32), classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.head = nn.Linear(c3, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean(dim=(2, 3)))

    def conv_weights(self) -> List[nn.Parameter]:
        return [self.conv1.weight, self.conv2.weight, self.conv3.weight]

    def euclidean_params(self) -> List[nn.Parameter]:
        ids = {id(p) for p in self.conv_weights()}
        return [p for p in self.parameters() if id(p) not in ids]


def make_optimizer(method: str, model: SmallCNN, lr: float, cfg: Dict):
    if method == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr)
    rest = {"params": model.euclidean_params(), "manifold": "euclidean"}
    if method == "UN":
        return UNSGD([{"params": model.conv_weights()}, rest], lr=lr)
    spec = FG_VARIANTS[method]
    size = cfg["pio_group_size"] if spec["grouping"] == "PIO" else None
    return FGSGD([{"params": model.conv_weights(), "granularity": "kernel", "group_size": size, **spec},
                  rest], lr=lr, grouping_seed=0)


def is_stiefel(method: str) -> bool:
    return FG_VARIANTS.get(method, {}).get("manifold") == "stiefel"


def is_rescaled(method: str) -> bool:
    return FG_VARIANTS.get(method, {}).get("radius", "unit") != "unit"


def _radius(opt, w, n: int) -> torch.Tensor:
    """The radius of each of the n components of w (float64): the stored rho, or 1."""
    rho = opt.state.get(w, {}).get("radius")
    return torch.ones(n, dtype=torch.float64) if rho is None else rho.double()


@torch.no_grad()
def constraint_deviation(method: str, model: SmallCNN, opt) -> float:
    """How far the conv weights are from their manifolds, relative to the radius rho:
    max |‖row‖ / rho - 1| over the sphere rows (filters for UN, 3x3 kernels for FG-SGD), and
    max |W Wᵀ / rho² - I| over the 3x3 Stiefel blocks."""
    if method == "SGD":
        return float("nan")
    devs = []
    for w in model.conv_weights():
        if method == "UN":
            rows = w.detach().double().reshape(w.shape[0], -1)
            devs.append(float((rows.norm(dim=1) - 1).abs().max()))
            continue
        n = w.shape[0] * w.shape[1]
        rho = _radius(opt, w, n)
        if is_stiefel(method):
            B = w.detach().double().reshape(n, w.shape[2], -1)
            gram = B @ B.transpose(1, 2) / (rho * rho).view(-1, 1, 1)
            devs.append(float((gram - torch.eye(B.shape[1], dtype=torch.float64)).abs().max()))
        else:
            rows = w.detach().double().reshape(n, -1)
            devs.append(float((rows.norm(dim=1) / rho - 1).abs().max()))
    return max(devs)


def radius_report(opt, stats, weights) -> Dict:
    """gamma and the range of rho = gamma / lambda per conv layer, after the last rescale."""
    out = {"gamma": [], "rho_min": [], "rho_mean": [], "rho_max": []}
    for w in weights:
        rho = _radius(opt, w, w.shape[0] * w.shape[1])
        out["gamma"].append(stats.layer(w).gamma())
        out["rho_min"].append(float(rho.min()))
        out["rho_mean"].append(float(rho.mean()))
        out["rho_max"].append(float(rho.max()))
    return out


@torch.no_grad()
def evaluate(model, x, y):
    """(accuracy, cross-entropy) in eval mode."""
    model.eval()
    out = model(x)
    model.train()
    return float((out.argmax(1) == y).float().mean()), float(F.cross_entropy(out, y))


class AdaptiveProbe:
    """How often FG-SGD's adaptive scale is active: recomputes each group's Riemannian gradient
    norm R (SPEC §3, eq. 6) from the gradients and the optimizer's stored grouping, and counts
    the (group, step) pairs with r = max(1, R (2 + R)) > 1, i.e. a step actually shortened."""

    def __init__(self, opt, weights, stiefel: bool = False):
        self.opt, self.weights, self.stiefel = opt, weights, stiefel
        self.active = [0] * len(weights)
        self.total = [0] * len(weights)
        self.max_R = [0.0] * len(weights)

    @torch.no_grad()
    def before_step(self) -> None:
        for i, w in enumerate(self.weights):
            st = self.opt.state.get(w, {})
            if "row_order" not in st or w.grad is None:
                continue  # the grouping is drawn at the first step
            rows = w.shape[0] * w.shape[1]
            if self.stiefel:  # 3x3 blocks: Z - sym(Z Wᵀ) W (SPEC §2), at radius rho
                W, G = w.reshape(rows, w.shape[2], -1), w.grad.reshape(rows, w.shape[2], -1)
                rho = _radius(self.opt, w, rows).to(W.dtype).view(-1, 1, 1)
                rg = reference.stiefel_project(W, G, rho).reshape(rows, -1)
            else:  # sphere rows of any radius
                W, G = w.reshape(rows, -1), w.grad.reshape(rows, -1)
                rg = G - (W * G).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True) * W
            sizes = st["group_sizes"]
            gid = grouping.group_of_row(st["row_order"], sizes)
            R = torch.zeros(sizes.numel(), dtype=rg.dtype).index_add_(0, gid, (rg * rg).sum(1)).sqrt()
            self.active[i] += int((R * (2 + R) > 1).sum())
            self.total[i] += int(sizes.numel())
            self.max_R[i] = max(self.max_R[i], float(R.max()))

    def report(self) -> Dict:
        return {"active_fraction": [a / t if t else None for a, t in zip(self.active, self.total)],
                "max_group_grad_norm": self.max_R}


def train(method, lr, cfg, data, seed, bar) -> Dict:
    xtr, ytr, xev, yev = data
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = make_optimizer(method, model, lr, cfg)
    gen = torch.Generator().manual_seed(seed + 3)
    probe = AdaptiveProbe(opt, model.conv_weights(), is_stiefel(method)) if method in FG_VARIANTS else None
    stats = None
    if is_rescaled(method):  # FG-SGD §4: rows onto gamma (lambda = 1 at the first epoch)
        stats = FeatureStats(model)
        model.eval()
        with torch.no_grad():  # geometry probe: output sizes only, no moments, BN stats untouched
            model(xtr[:1])
        model.train()
        opt.rescale(stats)
    step_times, epoch_times, losses = [], [], []
    for epoch in range(cfg["epochs"]):
        t_epoch, t_step, tot, n = time.perf_counter(), 0.0, 0.0, 0
        if stats is not None and epoch > 0:  # onto gamma / lambda, lambda from the last epoch's passes
            t = time.perf_counter()
            opt.rescale(stats)
            t_step += time.perf_counter() - t
        for idx in C.batches(len(ytr), cfg["batch_size"], gen):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            if probe is not None:  # not timed; sees every step after the first
                probe.before_step()
            t = time.perf_counter()
            opt.step()
            t_step += time.perf_counter() - t
            tot += float(loss.detach()) * len(idx)
            n += len(idx)
        epoch_times.append(time.perf_counter() - t_epoch)
        step_times.append(t_step)
        losses.append(tot / n)
        bar.update(1)
    acc, eval_loss = evaluate(model, xev, yev)
    res = {"accuracy": acc, "eval_loss": eval_loss, "train_loss": losses,
           "step_seconds_per_epoch": step_times, "epoch_seconds": epoch_times,
           "constraint_max_dev": constraint_deviation(method, model, opt),
           "adaptive": probe.report() if probe is not None else None,
           "radius": radius_report(opt, stats, model.conv_weights()) if stats is not None else None}
    if stats is not None:
        stats.remove()
    return res


#: learning-rate grids. A 3x3 Stiefel kernel has norm sqrt(3) and a gamma/lambda kernel about
#: 0.03-0.08 where a unit-sphere kernel has 1; behind batch norm the step's effect goes as
#: lr / radius^2, so those two variants get grids moved accordingly (see the module docstring)
LR_GRID = {m: [0.3, 1.0, 3.0] for m in METHODS}
LR_GRID["FG-SGD PO Stiefel"] = [1.0, 3.0, 10.0]
LR_GRID["FG-SGD PO γ/λ"] = [0.01, 0.03, 0.1]


def config(args) -> Dict:
    if args.quick:
        return dict(runs=args.runs or 1, epochs=2, batch_size=32, val=200, pio_group_size=16,
                    lr_grid={m: [LR_GRID[m][1]] for m in METHODS})
    return dict(runs=args.runs or 4, epochs=10, batch_size=32, val=300, pio_group_size=16,
                lr_grid=dict(LR_GRID))


def run(args) -> Dict:
    t0 = C.start(args)
    cfg = config(args)
    x, y = C.load_digits_tensors()
    x = x.view(-1, 1, 8, 8)
    tr, te = C.stratified_split(y, 0.2, seed=12345)
    gen = torch.Generator().manual_seed(args.seed)
    val, sub = C.split_indices(len(tr), [cfg["val"], len(tr) - cfg["val"]], gen)
    select_data = (x[tr[sub]], y[tr[sub]], x[tr[val]], y[tr[val]])
    full_data = (x[tr], y[tr], x[te], y[te])
    total = (sum(len(g) for g in cfg["lr_grid"].values() if len(g) > 1) + len(METHODS) * cfg["runs"]) * cfg["epochs"]
    bar = C.progress(total, NAME, args.no_progress)
    selection, chosen = {}, {}
    for m in METHODS:
        selection[m] = {}
        for lr in cfg["lr_grid"][m] if len(cfg["lr_grid"][m]) > 1 else []:
            bar.set_postfix_str(f"select {m} lr={lr:g}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res = train(m, lr, cfg, select_data, args.seed, bar)
                selection[m][lr] = {"val_loss": res["eval_loss"], "val_accuracy": res["accuracy"]}
        ok = {k: v["val_loss"] for k, v in selection[m].items() if v["val_loss"] == v["val_loss"]}
        chosen[m] = min(ok, key=ok.get) if ok else cfg["lr_grid"][m][0]
    runs: Dict[str, List[Dict]] = {m: [] for m in METHODS}
    for r in range(cfg["runs"]):
        for m in METHODS:
            bar.set_postfix_str(f"run {r} {m}")
            C.seed_everything(args.seed + r)
            res = train(m, chosen[m], cfg, full_data, args.seed + r, bar)
            res["seed"] = args.seed + r
            runs[m].append(res)
    bar.close()

    def per_epoch(key, m):  # skip the first epoch (warm-up: plans, allocations)
        return C.mean_std([t for rr in runs[m] for t in rr[key][1:] or rr[key]])

    summary = {m: {"lr": chosen[m], "accuracy": C.mean_std([rr["accuracy"] for rr in runs[m]]),
                   "step_seconds_per_epoch": per_epoch("step_seconds_per_epoch", m),
                   "epoch_seconds": per_epoch("epoch_seconds", m),
                   "constraint_max_dev": max((rr["constraint_max_dev"] for rr in runs[m]),
                                             key=lambda v: -1 if v != v else v),
                   "adaptive_active_fraction_per_layer": _mean_lists(
                       [rr["adaptive"]["active_fraction"] for rr in runs[m] if rr["adaptive"]]),
                   "max_group_grad_norm_per_layer": _max_lists(
                       [rr["adaptive"]["max_group_grad_norm"] for rr in runs[m] if rr["adaptive"]]),
                   "radius_per_layer": _radius_summary([rr["radius"] for rr in runs[m] if rr["radius"]])}
               for m in METHODS}
    model = SmallCNN()
    result = {"config": cfg, "methods": list(METHODS), "fg_variants": FG_VARIANTS, "chosen_lr": chosen,
              "lr_selection": {m: {str(k): v for k, v in s.items()} for m, s in selection.items()},
              "summary": summary, "runs": runs,
              "model": {"conv_shapes": [list(w.shape) for w in model.conv_weights()],
                        "parameters": sum(p.numel() for p in model.parameters())},
              "data": {"train": len(tr), "test": len(te), "val_for_lr": cfg["val"]}}
    return C.finish(NAME, args, result, t0, plot)


def _mean_lists(lists):
    if not lists:
        return None
    return [sum(v) / len(v) if all(x is not None for x in v) else None for v in zip(*lists)]


def _max_lists(lists):
    return [max(v) for v in zip(*lists)] if lists else None


def _radius_summary(reports):
    """gamma and the range of rho per conv layer over all runs (None without rescaling)."""
    if not reports:
        return None
    return {"gamma": reports[0]["gamma"], "rho_min": [min(v) for v in zip(*(r["rho_min"] for r in reports))],
            "rho_mean": _mean_lists([r["rho_mean"] for r in reports]),
            "rho_max": _max_lists([r["rho_max"] for r in reports])}


def _short(m: str) -> str:
    return m.replace("FG-SGD ", "FG ").replace("Stiefel", "St")


def plot(result: Dict, args) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    methods = result["methods"]
    colors = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:cyan"]
    colors = colors[:len(methods)]
    s = result["summary"]
    axes[0].bar(range(len(methods)), [100 * s[m]["accuracy"]["mean"] for m in methods],
                yerr=[100 * s[m]["accuracy"]["std"] for m in methods], capsize=3, color=colors)
    lo = min(100 * (s[m]["accuracy"]["mean"] - s[m]["accuracy"]["std"]) for m in methods)
    axes[0].set_ylim(max(0, lo - 2), 100)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("accuracy, mean ± std")
    axes[1].bar(range(len(methods)), [1e3 * s[m]["step_seconds_per_epoch"]["mean"] for m in methods],
                yerr=[1e3 * s[m]["step_seconds_per_epoch"]["std"] for m in methods], capsize=3,
                color=colors)
    axes[1].set_ylabel("ms of optimizer.step() per epoch")
    axes[1].set_title("optimizer time per epoch")
    for ax in axes[:2]:
        ax.set_xticks(range(len(methods)), [_short(m) for m in methods], fontsize=7, rotation=30, ha="right")
    for m, c in zip(methods, colors):
        curves = [rr["train_loss"] for rr in result["runs"][m]]
        mean = [sum(v) / len(v) for v in zip(*curves)]
        axes[2].plot(range(1, len(mean) + 1), mean, color=c, label=f"{m} (lr={result['chosen_lr'][m]:g})")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("training loss (mean over seeds)")
    axes[2].legend(fontsize=7)
    fig.suptitle("FG-SGD on a BN CNN, 8x8 digits", fontsize=10)
    fig.tight_layout()
    C.save_figure(fig, args, NAME)


def format_table(res: Dict) -> str:
    lines = []
    lines.append(f"{NAME}: {res['config']['epochs']} epochs, mean ± std over {res['config']['runs']} seeds")
    lines.append("| method | lr | test accuracy | optimizer.step() s/epoch | epoch s | adaptive step active "
                 "(conv1/2/3) | off the manifold |")
    lines.append("|---|---|---|---|---|---|---|")
    for m in res["methods"]:
        s = res["summary"][m]
        dev = s["constraint_max_dev"]
        lines.append(f"| {m} | {s['lr']:g} | {s['accuracy']['mean']:.4f} ± {s['accuracy']['std']:.4f} "
                     f"| {s['step_seconds_per_epoch']['mean']:.4f} ± {s['step_seconds_per_epoch']['std']:.4f} "
                     f"| {s['epoch_seconds']['mean']:.3f} ± {s['epoch_seconds']['std']:.3f} "
                     f"| {_fractions(s['adaptive_active_fraction_per_layer'])} "
                     f"| {'n/a' if dev is None or dev != dev else f'{dev:.1e}'} |")
    for m in res["methods"]:
        r = res["summary"][m]["radius_per_layer"]
        if r:
            lines.append(f"{m}: gamma (conv1/2/3) " + " / ".join(f"{g:.4f}" for g in r["gamma"]) +
                         "; rho = gamma/lambda after the last rescale, min-max over kernels and seeds: " +
                         " / ".join(f"{a:.4f}-{b:.4f}" for a, b in zip(r["rho_min"], r["rho_max"])))
    return "\n".join(lines)


def _fractions(xs) -> str:
    if not xs:
        return "n/a"
    return " / ".join("n/a" if x is None else f"{100 * x:.1f}%" for x in xs)
