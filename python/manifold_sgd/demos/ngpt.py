"""nGPT: a normalized transformer with ManifoldAdam vs AdamW + renormalise vs a pre-LN GPT, on Python's own source.

Data. Character-level (byte-level) language modelling on the ``.py`` files of
the Python standard library that runs the demo (``os.path.dirname(os.__file__)``):
every Python installation carries them, so nothing is downloaded. The files at
the top of that folder are read in sorted name order and concatenated, whole,
until a size budget (1 MB; 100 KB with ``--quick``), the last file cut to fit.
A token is one byte of the UTF-8 source (the vocabulary is the set of byte
values present, about 100); the first 90 % is the training text, the last
10 % (other files) the validation text. The JSON records the folder, every
file with its byte count, the total and a SHA-256 of the text, so a run on
another Python version (different standard library) shows as such.

Models (same width, depth, heads, context and MLP in both; untied input
embedding and LM head; rotary position embeddings (RoPE) on q and k, no learned
positions; separate q, k, v projections; SwiGLU MLP; no biases):

* ``gpt``: a standard pre-LN GPT: ``h <- h + attn(LN(h))``, ``h <- h + mlp(LN(h))``,
  a final LayerNorm, softmax scale 1/sqrt(d_head); N(0, 0.02) weights (the
  residual output projections N(0, 0.02/sqrt(2 L))).
* ``ngpt``: nGPT (Loshchilov et al. 2024, "nGPT: Normalized Transformer with
  Representation Learning on the Hypersphere"), main choices kept: every matrix
  has its vectors along the embedding dimension on the unit sphere -- rows of
  the token embedding, the LM head, W_q, W_k, W_v and the MLP up and gate
  projections; *columns* of the attention output and MLP down projections;
  hidden states are unit vectors, each block updates them as
  ``h <- norm(h + alpha * (norm(block(h)) - h))`` with learnable per-dimension
  eigen learning rates alpha_A, alpha_M (init 0.05); q and k are normalised
  per head after RoPE and scaled by a learnable s_qk (init 1), softmax scale
  sqrt(d_head); the MLP is ``W_down (u * silu(nu))`` with u = s_u * W_up h and
  nu = s_nu * sqrt(d_model) * W_gate h (s_u, s_nu init 1); logits are s_z * (E_out h)
  (s_z init 1). No LayerNorm, no weight decay, no warm-up. The paper's
  "scaled" parameterisation is kept: alpha, s_qk and s_z are stored at
  1/sqrt(d_model) and multiplied by init/stored-scale in the forward pass, which
  sets the effective Adam step for them. Simplified here: a small model at
  character level, the same cosine schedule for every recipe (no separate
  tuning of the scales' learning rates), no gradient clipping (in any recipe).

Recipes (same seed, initial weights, data order, schedule and step count for
every recipe of one model; the two nGPT recipes start from identical weights):

* ``gpt-adamw``: the GPT with ``torch.optim.AdamW`` (fused=True where torch
  accepts it on CPU), weight decay 0.1 on the matrices, none on LayerNorm.
* ``ngpt-unfused``: nGPT with ``torch.optim.AdamW(fused=True, weight_decay=0)``,
  then, after every step, every constrained matrix renormalised in PyTorch along
  the embedding dimension (rows or columns as listed above): the paper's recipe.
* ``ngpt-fused-row`` / ``ngpt-fused-element``: nGPT with
  ``manifold_sgd.ManifoldAdam`` (SPEC §6; ``second_moment="row"`` or
  ``"element"``, weight_decay 0): the row-normalised matrices in a
  ``manifold="sphere", granularity="filter"`` group, the column-normalised ones
  in a ``manifold="sphere", granularity="column"`` group, the scales and alphas
  in a ``manifold="euclidean"`` group. With ``second_moment="row"`` (one v per
  row) a step moves a unit row by about lr in norm, where Adam's per-element v
  moves it by up to lr * sqrt(row length); every constrained vector here has
  d_model entries, so the row recipe's two sphere groups get lr * sqrt(d_model)
  (``row_moment_sphere_lr_factor`` in the JSON; the Euclidean group keeps lr).

Measured per recipe: validation loss (nats per byte, on a fixed set of
validation windows) every ``eval_every`` steps and at the end; the median
wall time of a training step (zero_grad, forward, backward, optimizer) and of
its optimizer part (``opt.step()``, plus the renormalise pass for
``ngpt-unfused``), and the optimizer's share; for the nGPT recipes the largest
|‖v‖ - 1| over all constrained vectors at the end. Fused and unfused "reach
the same loss" when their final validation losses differ by at most 2 %
relative, or by at most the run-to-run range of either with ``--runs`` > 1.
Timings are one-thread CPU wall times on a shared machine: rough.
"""
from __future__ import annotations

import hashlib
import math
import os
import statistics
import time
from typing import Dict, List, Tuple

import torch
from torch import nn
import torch.nn.functional as F

import manifold_sgd
from . import _common as C

NAME = "ngpt"
RECIPES = ("gpt-adamw", "ngpt-unfused", "ngpt-fused-row", "ngpt-fused-element")
FUSED = {"ngpt-fused-row": "row", "ngpt-fused-element": "element"}
#: fused and unfused reach "the same" final validation loss within this relative gap (one run)
SAME_LOSS_REL = 0.02


def add_arguments(p) -> None:
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES), metavar="RECIPE",
                   help="which recipes to train (default: all four: " + ", ".join(RECIPES) + ")")


# ---- data ---------------------------------------------------------------------------

def stdlib_dir() -> str:
    """The folder of the running Python's standard library (where ``os.py`` lives)."""
    return os.path.dirname(os.path.abspath(os.__file__))


def load_text(budget: int) -> Tuple[bytes, List[Dict]]:
    """The top-level ``.py`` files of the standard library, sorted by name, concatenated
    until ``budget`` bytes (the last file cut to fit); returns (text, [{name, bytes}])."""
    root = stdlib_dir()
    names = sorted(n for n in os.listdir(root) if n.endswith(".py") and os.path.isfile(os.path.join(root, n)))
    parts, files, total = [], [], 0
    for n in names:
        if total >= budget:
            break
        with open(os.path.join(root, n), "rb") as f:
            b = f.read()
        take = b[:budget - total]
        parts.append(take)
        files.append({"name": n, "bytes": len(take), "file_bytes": len(b)})
        total += len(take)
    if total < budget // 2:
        raise RuntimeError(f"the standard library at {root} has only {total} bytes of top-level .py files")
    return b"".join(parts), files


def make_data(cfg: Dict) -> Dict:
    text, files = load_text(cfg["data_bytes"])
    vocab = sorted(set(text))
    lut = torch.full((256,), -1, dtype=torch.int64)
    lut[torch.tensor(vocab)] = torch.arange(len(vocab))
    ids = lut[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]
    n_train = int(len(ids) * cfg["train_fraction"])
    return {"train": ids[:n_train], "val": ids[n_train:], "vocab": vocab,
            "description": {
                "source": "the Python standard library's own .py source files (top level of "
                          "os.path.dirname(os.__file__), sorted by name, concatenated whole until the "
                          "budget, the last one cut); ships with every Python installation, nothing downloaded",
                "folder": stdlib_dir(), "python_files": len(files), "files": files,
                "characters": len(text), "unit": "byte of the UTF-8 source (one token per byte)",
                "vocab_size": len(vocab), "sha256": hashlib.sha256(text).hexdigest(),
                "train_characters": n_train, "val_characters": len(ids) - n_train,
                "split": f"first {cfg['train_fraction']:.0%} train, the rest validation (contiguous)"}}


def batch_starts(n_tokens: int, cfg: Dict, seed: int) -> torch.Tensor:
    """The training windows' start offsets for every step: (steps, batch), one seeded draw,
    shared by every recipe of a run."""
    gen = torch.Generator().manual_seed(10_007 * seed + 1)
    return torch.randint(0, n_tokens - cfg["context"] - 1, (cfg["steps"], cfg["batch_size"]), generator=gen)


def windows(ids: torch.Tensor, starts: torch.Tensor, ctx: int):
    offs = starts.view(-1, 1) + torch.arange(ctx + 1).view(1, -1)
    w = ids[offs]
    return w[:, :-1], w[:, 1:]


def val_windows(ids: torch.Tensor, cfg: Dict):
    ctx = cfg["context"]
    n = min(cfg["val_windows"], (len(ids) - 1) // ctx)
    return windows(ids, torch.arange(n) * ctx, ctx)


# ---- models -------------------------------------------------------------------------

def rope_tables(ctx: int, head_dim: int, base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(ctx, dtype=torch.float64).view(-1, 1) * inv.view(1, -1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); rotate the pairs (x[..., :hd/2], x[..., hd/2:])."""
    T, half = x.shape[2], x.shape[3] // 2
    c, s = cos[:T], sin[:T]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def qkv(self, h):
        B, T, d = h.shape
        return [f(h).view(B, T, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v)]

    def out(self, y):
        B, H, T, hd = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, H * hd))


class _SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d, hidden, bias=False)
        self.gate = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)


class GPT(nn.Module):
    """Pre-LN GPT: LayerNorm, RoPE attention, SwiGLU MLP, untied head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, hidden: int, ctx: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.ModuleList(_Attention(d, heads) for _ in range(layers))
        self.mlp = nn.ModuleList(_SwiGLU(d, hidden) for _ in range(layers))
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        cos, sin = rope_tables(ctx, d // heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, x):
        h = self.embed(x)
        for attn, mlp, ln1, ln2 in zip(self.attn, self.mlp, self.ln1, self.ln2):
            q, k, v = attn.qkv(ln1(h))
            q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
            h = h + attn.out(F.scaled_dot_product_attention(q, k, v, is_causal=True))
            a = ln2(h)
            h = h + mlp.down(mlp.up(a) * F.silu(mlp.gate(a)))
        return self.head(self.ln_f(h))

    def decay_and_rest(self):
        decay = [p for p in self.parameters() if p.dim() == 2]
        ids = {id(p) for p in decay}
        return decay, [p for p in self.parameters() if id(p) not in ids]


def _norm(x):
    return F.normalize(x, dim=-1)


class NGPT(nn.Module):
    """nGPT (see the module docstring). ``row_matrices()`` have unit rows, ``column_matrices()``
    unit columns (both: vectors along the embedding dimension); ``scales()`` are Euclidean."""

    ALPHA_INIT = 0.05

    def __init__(self, vocab: int, d: int, layers: int, heads: int, hidden: int, ctx: int):
        super().__init__()
        self.d, self.heads = d, heads
        hd = d // heads
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.ModuleList(_Attention(d, heads) for _ in range(layers))
        self.mlp = nn.ModuleList(_SwiGLU(d, hidden) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)
        scale = 1.0 / math.sqrt(d)  # the stored value of the "scaled" parameters
        self.store_scale = scale
        self.alpha_a = nn.ParameterList(nn.Parameter(torch.full((d,), scale)) for _ in range(layers))
        self.alpha_m = nn.ParameterList(nn.Parameter(torch.full((d,), scale)) for _ in range(layers))
        self.s_qk = nn.ParameterList(nn.Parameter(torch.full((heads, 1, hd), scale)) for _ in range(layers))
        self.s_u = nn.ParameterList(nn.Parameter(torch.ones(hidden)) for _ in range(layers))
        self.s_nu = nn.ParameterList(nn.Parameter(torch.ones(hidden)) for _ in range(layers))
        self.s_z = nn.Parameter(torch.full((vocab,), scale))
        cos, sin = rope_tables(ctx, hd)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for p in self.row_matrices() + self.column_matrices():
            nn.init.normal_(p, std=scale)
        self.renormalize()

    def row_matrices(self) -> List[nn.Parameter]:
        out = [self.embed.weight, self.head.weight]
        for a, m in zip(self.attn, self.mlp):
            out += [a.q.weight, a.k.weight, a.v.weight, m.up.weight, m.gate.weight]
        return out

    def column_matrices(self) -> List[nn.Parameter]:
        out = []
        for a, m in zip(self.attn, self.mlp):
            out += [a.o.weight, m.down.weight]
        return out

    def scales(self) -> List[nn.Parameter]:
        ids = {id(p) for p in self.row_matrices() + self.column_matrices()}
        return [p for p in self.parameters() if id(p) not in ids]

    @torch.no_grad()
    def renormalize(self) -> None:
        """The unfused recipe's second half: rows (dim=1) and columns (dim=0) back onto the sphere."""
        for w in self.row_matrices():
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))
        for w in self.column_matrices():
            w.div_(w.norm(dim=0, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def constraint_deviation(self) -> float:
        """max |‖v‖ - 1| over all constrained rows and columns, in float64."""
        devs = [float((w.double().norm(dim=1) - 1).abs().max()) for w in self.row_matrices()]
        devs += [float((w.double().norm(dim=0) - 1).abs().max()) for w in self.column_matrices()]
        return max(devs)

    def forward(self, x):
        restore = 1.0 / self.store_scale  # init / stored scale for alpha (x0.05), s_qk and s_z (x1)
        hd = self.d // self.heads
        h = self.embed(x)
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            q, k, v = attn.qkv(h)
            s_qk = self.s_qk[i] * restore
            q = _norm(apply_rope(q, self.cos, self.sin)) * s_qk
            k = _norm(apply_rope(k, self.cos, self.sin)) * s_qk
            y = attn.out(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=math.sqrt(hd)))
            alpha = self.alpha_a[i] * (self.ALPHA_INIT * restore)
            h = _norm(h + alpha * (_norm(y) - h))
            u = mlp.up(h) * self.s_u[i]
            nu = mlp.gate(h) * (self.s_nu[i] * math.sqrt(self.d))
            y = mlp.down(u * F.silu(nu))
            alpha = self.alpha_m[i] * (self.ALPHA_INIT * restore)
            h = _norm(h + alpha * (_norm(y) - h))
        return self.head(h) * (self.s_z * restore)


# ---- recipes --------------------------------------------------------------------------

def _adamw(params, lr, betas, weight_decay=0.0):
    """torch.optim.AdamW, fused where this torch accepts it (else the default, and said so)."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True), True
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - a torch without CPU fused AdamW
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay), False


def build_model(recipe: str, vocab: int, cfg: Dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cls = GPT if recipe == "gpt-adamw" else NGPT
    return cls(vocab, cfg["d_model"], cfg["layers"], cfg["heads"], cfg["mlp_hidden"], cfg["context"])


def make_optimizer(recipe: str, model: nn.Module, cfg: Dict):
    """(optimizer, after_step or None, description)."""
    betas = tuple(cfg["betas"])
    if recipe == "gpt-adamw":
        decay, rest = model.decay_and_rest()
        lr = cfg["lr"]["gpt"]
        opt, fused = _adamw([{"params": decay, "weight_decay": cfg["gpt_weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr, betas)
        return opt, None, f"torch.optim.AdamW(fused={fused}), weight decay {cfg['gpt_weight_decay']} on matrices"
    lr = cfg["lr"]["ngpt"]
    if recipe == "ngpt-unfused":
        opt, fused = _adamw(model.parameters(), lr, betas, 0.0)
        return opt, model.renormalize, f"torch.optim.AdamW(fused={fused}, weight_decay=0), then renormalise"
    cls = manifold_sgd.ManifoldAdam
    moment = FUSED[recipe]
    # one second moment per row moves a row by about lr (in norm) per step where Adam's per-element
    # one moves it by up to lr * sqrt(row length); every constrained vector here has d_model entries
    sphere_lr = lr * (cfg["row_moment_sphere_lr_factor"] if moment == "row" else 1.0)
    groups = [{"params": model.row_matrices(), "manifold": "sphere", "granularity": "filter", "lr": sphere_lr},
              {"params": model.column_matrices(), "manifold": "sphere", "granularity": "column", "lr": sphere_lr},
              {"params": model.scales(), "manifold": "euclidean"}]
    opt = cls(groups, lr=lr, betas=betas, weight_decay=0.0, second_moment=moment)
    extra = f", sphere groups at lr x {cfg['row_moment_sphere_lr_factor']:.3g}" if moment == "row" else ""
    return opt, None, f"manifold_sgd.ManifoldAdam(second_moment={moment!r}, weight_decay=0){extra}"


def lr_factor(step: int, cfg: Dict) -> float:
    """Cosine from 1 to ``lr_final_fraction`` over the run, no warm-up."""
    t = step / max(1, cfg["steps"] - 1)
    lo = cfg["lr_final_fraction"]
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model, xv, yv, batch_size: int) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(xv), batch_size):
        logits = model(xv[i:i + batch_size])
        tot += float(F.cross_entropy(logits.flatten(0, 1), yv[i:i + batch_size].flatten(), reduction="sum"))
        n += yv[i:i + batch_size].numel()
    model.train()
    return tot / n


def train(recipe: str, cfg: Dict, data: Dict, seed: int, bar, keep_model: bool = False) -> Dict:
    vocab = len(data["vocab"])
    model = build_model(recipe, vocab, cfg, seed)
    opt, after, desc = make_optimizer(recipe, model, cfg)
    base_lr = [g["lr"] for g in opt.param_groups]
    starts = batch_starts(len(data["train"]), cfg, seed)
    xv, yv = data["val_x"], data["val_y"]
    curve_steps, curve = [0], [evaluate(model, xv, yv, cfg["batch_size"])]
    train_loss, step_s, opt_s = [], [], []
    for step in range(cfg["steps"]):
        f = lr_factor(step, cfg)
        for g, lr in zip(opt.param_groups, base_lr):
            g["lr"] = lr * f
        x, y = windows(data["train"], starts[step], cfg["context"])
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        if after is not None:
            after()
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        train_loss.append(float(loss.detach()))
        if not math.isfinite(train_loss[-1]):
            break
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            curve_steps.append(step + 1)
            curve.append(evaluate(model, xv, yv, cfg["batch_size"]))
        bar.update(1)
    med_step, med_opt = statistics.median(step_s), statistics.median(opt_s)
    res = {"seed": seed, "optimizer": desc, "val_steps": curve_steps, "val_loss": curve,
           "final_val_loss": curve[-1], "train_loss": train_loss, "steps_done": len(train_loss),
           "step_ms_median": 1e3 * med_step, "optimizer_ms_median": 1e3 * med_opt,
           "optimizer_share": med_opt / med_step if med_step > 0 else None,
           "optimizer_share_of_total": sum(opt_s) / sum(step_s) if sum(step_s) > 0 else None,
           "constraint_max_dev": model.constraint_deviation() if isinstance(model, NGPT) else None,
           "parameters": sum(p.numel() for p in model.parameters())}
    if keep_model:
        res["_model"] = model
    return res


# ---- the demo -------------------------------------------------------------------------

def config(args) -> Dict:
    cfg = _config(args)
    cfg["row_moment_sphere_lr_factor"] = math.sqrt(cfg["d_model"])
    return cfg


def _config(args) -> Dict:
    common = dict(betas=[0.9, 0.95], gpt_weight_decay=0.1, lr_final_fraction=0.1, train_fraction=0.9,
                  lr={"gpt": 3e-3, "ngpt": 2e-2})
    if args.quick:
        return dict(common, runs=args.runs or 1, data_bytes=100_000, d_model=32, layers=2, heads=2,
                    mlp_hidden=64, context=32, batch_size=16, steps=40, eval_every=10, val_windows=32)
    return dict(common, runs=args.runs or 1, data_bytes=1_000_000, d_model=128, layers=4, heads=4,
                mlp_hidden=384, context=64, batch_size=16, steps=400, eval_every=50, val_windows=128)


def same_loss(fused: List[float], unfused: List[float]) -> Dict:
    """Do two recipes reach the same final validation loss? Within 2 % relative of the unfused
    mean, or within the run-to-run range of either recipe when there are several runs."""
    a, b = C.mean_std(fused), C.mean_std(unfused)
    tol = SAME_LOSS_REL * abs(b["mean"])
    spread = max([max(x) - min(x) for x in (fused, unfused) if len(x) > 1] or [0.0])
    tol = max(tol, spread)
    gap = a["mean"] - b["mean"]
    return {"fused_mean": a["mean"], "unfused_mean": b["mean"], "gap": gap,
            "relative_gap": gap / b["mean"] if b["mean"] else None, "tolerance": tol,
            "same": bool(abs(gap) <= tol)}


def run(args) -> Dict:
    t0 = C.start(args)
    cfg = config(args)
    recipes = [r for r in RECIPES if r in (getattr(args, "recipes", None) or RECIPES)]
    data = make_data(cfg)
    data["val_x"], data["val_y"] = val_windows(data["val"], cfg)
    if any(r in FUSED for r in recipes):  # and the groups are accepted (granularity="column" too)
        make_optimizer(recipes[[r in FUSED for r in recipes].index(True)],
                       build_model("ngpt-unfused", len(data["vocab"]), cfg, args.seed), cfg)
    bar = C.progress(len(recipes) * cfg["runs"] * cfg["steps"], NAME, args.no_progress)
    runs: Dict[str, List[Dict]] = {r: [] for r in recipes}
    for k in range(cfg["runs"]):
        for r in recipes:
            bar.set_postfix_str(f"run {k} {r}")
            C.seed_everything(args.seed + k)
            runs[r].append(train(r, cfg, data, args.seed + k, bar))
    bar.close()
    summary = {}
    for r in recipes:
        rs = runs[r]
        devs = [x["constraint_max_dev"] for x in rs if x["constraint_max_dev"] is not None]
        summary[r] = {"model": "gpt" if r == "gpt-adamw" else "ngpt", "optimizer": rs[0]["optimizer"],
                      "lr": cfg["lr"][("gpt" if r == "gpt-adamw" else "ngpt")],
                      "final_val_loss": C.mean_std([x["final_val_loss"] for x in rs]),
                      "step_ms_median": C.mean_std([x["step_ms_median"] for x in rs]),
                      "optimizer_ms_median": C.mean_std([x["optimizer_ms_median"] for x in rs]),
                      "optimizer_share": C.mean_std([x["optimizer_share"] for x in rs]),
                      "constraint_max_dev": max(devs) if devs else None,
                      "parameters": rs[0]["parameters"]}
    comparisons = {}
    if "ngpt-unfused" in recipes:
        for r in recipes:
            if r in FUSED:
                comparisons[r] = same_loss([x["final_val_loss"] for x in runs[r]],
                                           [x["final_val_loss"] for x in runs["ngpt-unfused"]])
    desc = dict(data["description"])
    result = {"config": cfg, "recipes": recipes, "data": desc, "runs": runs, "summary": summary,
              "fused_vs_unfused": comparisons, "same_loss_rule": (
                  f"|fused - unfused| final validation loss <= max({SAME_LOSS_REL:.0%} of unfused, "
                  "run-to-run range of either recipe)"),
              "manifold_adam_available": hasattr(manifold_sgd, "ManifoldAdam")}
    return C.finish(NAME, args, result, t0, plot)


# ---- output ---------------------------------------------------------------------------

COLORS = {"gpt-adamw": "tab:gray", "ngpt-unfused": "tab:blue", "ngpt-fused-row": "tab:red",
          "ngpt-fused-element": "tab:green"}


def _mean_curve(rs: List[Dict]) -> Tuple[List[int], List[float]]:
    n = min(len(x["val_loss"]) for x in rs)
    return rs[0]["val_steps"][:n], [statistics.fmean(x["val_loss"][i] for x in rs) for i in range(n)]


def plot(result: Dict, args) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    recipes = result["recipes"]
    for r in recipes:
        steps, curve = _mean_curve(result["runs"][r])
        axes[0].plot(steps, curve, marker=".", color=COLORS[r], label=r)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("validation loss (nats/byte)")
    axes[0].set_title("validation loss (mean over runs)")
    axes[0].legend(fontsize=8)
    s = result["summary"]
    opt = [s[r]["optimizer_ms_median"]["mean"] for r in recipes]
    rest = [s[r]["step_ms_median"]["mean"] - o for r, o in zip(recipes, opt)]
    xs = range(len(recipes))
    axes[1].bar(xs, rest, color="lightgray", label="forward + backward")
    axes[1].bar(xs, opt, bottom=rest, color=[COLORS[r] for r in recipes], label="optimizer (recipe colour)")
    for x, o, t in zip(xs, opt, rest):
        axes[1].text(x, o + t, f"{100 * o / (o + t):.0f}%", ha="center", va="bottom", fontsize=8)
    axes[1].set_xticks(list(xs), recipes, fontsize=8, rotation=20, ha="right")
    axes[1].set_ylabel("median ms per training step")
    axes[1].set_title("step time: optimizer share")
    axes[1].legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"nGPT vs GPT, byte-level, Python stdlib source ({result['data']['characters']:,} bytes); "
                 f"d={cfg['d_model']}, {cfg['layers']} layers, {cfg['steps']} steps", fontsize=10)
    fig.tight_layout()
    C.save_figure(fig, args, NAME)


def _fmt(s: Dict, fmt: str) -> str:
    if s["n"] == 0:
        return "n/a"
    return format(s["mean"], fmt) + (f" ± {format(s['std'], fmt)}" if s["n"] > 1 else "")


def format_table(res: Dict) -> str:
    cfg, d = res["config"], res["data"]
    lines = [f"{NAME}: byte-level LM on {d['python_files']} Python stdlib files ({d['characters']:,} bytes, "
             f"vocab {d['vocab_size']}); d_model {cfg['d_model']}, {cfg['layers']} layers, {cfg['heads']} heads, "
             f"context {cfg['context']}, batch {cfg['batch_size']}, {cfg['steps']} steps, "
             f"{cfg['runs']} run(s)",
             "| recipe | optimizer | lr | final val loss (nats/byte) | bits/byte | step ms (median) "
             "| optimizer ms | optimizer share | off the sphere |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["recipes"]:
        s = res["summary"][r]
        loss = s["final_val_loss"]
        bits = {k: (v / math.log(2) if k in ("mean", "std") else v) for k, v in loss.items()}
        dev = s["constraint_max_dev"]
        share = s["optimizer_share"]
        lines.append(f"| {r} | {s['optimizer']} | {s['lr']:g} | {_fmt(loss, '.4f')} | {_fmt(bits, '.4f')} "
                     f"| {_fmt(s['step_ms_median'], '.1f')} | {_fmt(s['optimizer_ms_median'], '.2f')} "
                     f"| {100 * share['mean']:.1f}% | {'n/a' if dev is None else f'{dev:.1e}'} |")
    comps = res.get("fused_vs_unfused") or {}
    if comps:
        for r, c in comps.items():
            verdict = "the same final loss" if c["same"] else "different final losses"
            lines.append(f"{r} vs ngpt-unfused: {c['fused_mean']:.4f} vs {c['unfused_mean']:.4f} "
                         f"(gap {c['gap']:+.4f}, {100 * c['relative_gap']:+.2f}%; tolerance {c['tolerance']:.4f}): "
                         f"{verdict}")
    else:
        lines.append("fused vs unfused: not compared (this run did not train both ngpt-unfused and an "
                     "ngpt-fused recipe)")
    return "\n".join(lines)
