"""The paper demos: each ``--quick`` run finishes, writes its JSON and PNG, and says something true.

The quick runs use tiny budgets, so these tests check properties that hold at
any budget (constraints kept, invariances, every field the results page reads),
plus the one qualitative claim that shows after a few epochs: PSI-SGD escapes
an unbalanced initialisation where SGD does not.
"""
from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("sklearn")  # the digits data ships inside scikit-learn

from manifold_sgd import demos  # noqa: E402
from manifold_sgd.demos import report  # noqa: E402

PNG_LIMIT = 150 * 1024


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demos"))


_cache = {}

#: ManifoldAdam (SPEC §6) is what the ngpt demo's fused recipes need; without it the quick run
#: trains the two recipes that exist (and the fused ones are refused, see test_ngpt_fused_*)
EXTRA_ARGS: dict = {}


def quick(name, out_dir, seed=0):
    key = (name, seed)
    if key not in _cache:
        res = demos.run(name, ["--quick", "--seed", str(seed), "--out", out_dir, "--no-progress",
                               *EXTRA_ARGS.get(name, [])])
        with open(os.path.join(out_dir, f"{name}.json")) as f:
            stored = json.load(f)
        _cache[key] = (res, stored)
    return _cache[key]


def _files_ok(name, out_dir):
    js, png = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "png"))
    assert os.path.getsize(js) > 0
    assert 0 < os.path.getsize(png) < PNG_LIMIT
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _common_fields(stored, name):
    for key in ("demo", "quick", "seed", "wall_seconds", "cpu_seconds", "machine", "config"):
        assert key in stored, key
    assert stored["demo"] == name and stored["quick"] is True
    assert {"torch", "cpu_count", "native"} <= set(stored["machine"])


# ---- un-archbn -------------------------------------------------------------------

def test_un_archbn_quick(out_dir):
    res, stored = quick("un-archbn", out_dir)
    _files_ok("un-archbn", out_dir)
    _common_fields(stored, "un-archbn")
    assert stored["methods"] == ["B-SGD", "UN"]
    assert set(stored["table"]) == {"2", "4"}
    for depth, by_method in stored["runs"].items():
        for method, runs in by_method.items():
            assert runs, (depth, method)
            for r in runs:
                assert 0.0 <= r["test_error"] <= 1.0
                assert r["lr"] in stored["config"]["lr_grid"]
                assert len(r["train_loss"]) == r["epochs"] >= stored["config"]["min_epochs"] or \
                    r["stop"] == "diverged"
                if method == "UN":  # the UN update keeps every filter on the unit sphere
                    assert r["filter_row_norm_max_dev"] < 1e-5
                else:  # B-SGD starts there but moves off it
                    assert r["filter_row_norm_max"] > 1.0 + 1e-6
            t = stored["table"][depth][method]
            assert t["n"] == len(runs) and math.isfinite(t["mean"])


# ---- psi-toy ---------------------------------------------------------------------

def test_psi_toy_quick(out_dir):
    res, stored = quick("psi-toy", out_dir)
    _files_ok("psi-toy", out_dir)
    _common_fields(stored, "psi-toy")
    assert stored["methods"] == ["SGD", "Adam", "PSI-SGD", "PSI-SGDM"]
    epochs = stored["config"]["epochs"]
    for m in stored["methods"]:
        runs = stored["runs"][m]
        assert len(runs) == stored["config"]["runs"]
        for r in runs:
            assert len(r["grad_norm"]) == len(r["loss"]) == epochs + 1
            # every method leaves the large gradient of the He-initialised start behind
            assert r["grad_norm"][-1] < 0.5 * r["grad_norm"][0]
            assert r["loss"][-1] < r["loss"][0]
        s = stored["summary"][m]
        assert {"lr", "final_grad_norm", "final_loss", "epochs_to_grad_norm_below"} <= set(s)


def test_psi_toy_deterministic(out_dir, tmp_path):
    _, first = quick("psi-toy", out_dir)
    again = demos.run("psi-toy", ["--quick", "--seed", "0", "--out", str(tmp_path), "--no-progress"])
    for m in first["methods"]:
        assert [r["grad_norm"] for r in again["runs"][m]] == [r["grad_norm"] for r in first["runs"][m]]


# ---- psi-unbalanced --------------------------------------------------------------

def test_psi_unbalanced_quick(out_dir):
    res, stored = quick("psi-unbalanced", out_dir)
    _files_ok("psi-unbalanced", out_dir)
    _common_fields(stored, "psi-unbalanced")
    s = stored["summary"]
    # PSI paper Fig. 1: from the unbalanced start PSI-SGD trains, SGD stalls
    sgd = s["SGD, unbalanced"]["final_train_loss"]["mean"]
    psi = s["PSI-SGD, unbalanced"]["final_train_loss"]["mean"]
    assert psi < 0.7 * sgd
    # and SGD's trouble is the initialisation: from the balanced start it trains too
    assert s["SGD, balanced"]["final_train_loss"]["mean"] < 0.7 * sgd
    # Theorem 1: PSI-SGD from W and from T_a(W) computes the same losses (float64, to rounding)
    assert stored["psi_equivariance_max_loss_gap"] < 1e-6
    for r in stored["runs"]["PSI-SGD, unbalanced"]:
        assert r["row_norm_range"]["fc1"][1] <= 1e4 * (1 + 1e-9)  # the 1e4 renormalisation guard


# ---- fg-cnn ----------------------------------------------------------------------

FG_METHODS = ["SGD", "UN", "FG-SGD PI", "FG-SGD PO", "FG-SGD PIO", "FG-SGD PO Stiefel", "FG-SGD PO γ/λ"]


def test_fg_cnn_quick(out_dir):
    res, stored = quick("fg-cnn", out_dir)
    _files_ok("fg-cnn", out_dir)
    _common_fields(stored, "fg-cnn")
    assert stored["methods"] == FG_METHODS
    assert stored["fg_variants"]["FG-SGD PO Stiefel"] == {"grouping": "PO", "manifold": "stiefel",
                                                          "retraction": "polar"}
    assert stored["fg_variants"]["FG-SGD PO γ/λ"] == {"grouping": "PO", "radius": "geometric_std"}
    for m in stored["methods"]:
        s = stored["summary"][m]
        # every field the results page and the plot read
        assert {"lr", "accuracy", "step_seconds_per_epoch", "epoch_seconds", "constraint_max_dev",
                "adaptive_active_fraction_per_layer", "max_group_grad_norm_per_layer",
                "radius_per_layer"} <= set(s), m
        assert s["lr"] == stored["chosen_lr"][m] == stored["config"]["lr_grid"][m][0]
        assert s["accuracy"]["mean"] > 0.2  # ten classes: chance is 0.1
        assert s["step_seconds_per_epoch"]["mean"] > 0
        for r in stored["runs"][m]:
            assert len(r["train_loss"]) == stored["config"]["epochs"]
        if m == "SGD":
            assert s["constraint_max_dev"] is None  # nan: nothing is constrained
        else:
            # filters (UN), 3x3 kernels (FG-SGD) stay on their spheres (radius 1, or gamma/lambda,
            # relative), and the Stiefel kernels stay orthonormal: |W W^T - I| at the library's fp32
            # tolerance (SPEC §5, tests/test_stiefel.py)
            assert s["constraint_max_dev"] < 1e-5, m
        if m.startswith("FG"):
            fr = s["adaptive_active_fraction_per_layer"]
            assert len(fr) == 3 and all(f is None or 0.0 <= f <= 1.0 for f in fr)
        if m != "FG-SGD PO γ/λ":
            assert s["radius_per_layer"] is None
    # the gamma/lambda rows: gamma = 1/sqrt(b + b_hat) from the layer shapes (FG-SGD eq. 2), and the
    # radius moved off 1 onto gamma/lambda; conv1 reads one input channel, so its kernels share one lambda
    r = stored["summary"]["FG-SGD PO γ/λ"]["radius_per_layer"]
    shapes, size = stored["model"]["conv_shapes"], [8 * 8, 8 * 8, 4 * 4]
    for k, (shape, hw) in enumerate(zip(shapes, size)):
        fan_in, out = shape[1] * shape[2] * shape[3], shape[0] * hw
        assert r["gamma"][k] == pytest.approx(1 / math.sqrt(fan_in + out), rel=1e-6)
        assert 0 < r["rho_min"][k] <= r["rho_mean"][k] <= r["rho_max"][k] < 1
    assert r["rho_min"][0] == pytest.approx(r["rho_max"][0], rel=1e-6)
    assert r["rho_min"][1] < r["rho_max"][1]  # conv2's input channels differ in spread
    assert r["rho_mean"][0] > r["gamma"][0]  # the digits' pixels have std < 1: lambda < 1


def test_fg_cnn_variants_build_what_they_say():
    """The demo's Stiefel and gamma/lambda optimizers, checked on the library's state rather than on
    the demo's own report: 3x3 orthonormal blocks in PO groups; kernel rows on gamma/lambda after a
    rescale, with lambda the std of each input channel measured independently here."""
    import torch
    import torch.nn.functional as F
    from manifold_sgd import FeatureStats
    from manifold_sgd.demos import _common as C, fg_cnn

    x, y = C.load_digits_tensors()
    x = x.view(-1, 1, 8, 8)[:256]
    y = y[:256]
    cfg = {"pio_group_size": 16}
    torch.manual_seed(0)
    model = fg_cnn.SmallCNN()
    opt = fg_cnn.make_optimizer("FG-SGD PO Stiefel", model, 3.0, cfg)
    for i in range(0, 256, 64):
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
        opt.step()
    for w in model.conv_weights():
        B = w.detach().double().reshape(-1, 3, 3)
        assert float((B @ B.transpose(1, 2) - torch.eye(3, dtype=torch.float64)).abs().max()) < 1e-5
        sizes = opt.state[w]["group_sizes"]  # PO: one group per input channel, all output channels
        assert sizes.tolist() == [w.shape[0]] * w.shape[1]

    torch.manual_seed(0)
    model = fg_cnn.SmallCNN()
    opt = fg_cnn.make_optimizer("FG-SGD PO γ/λ", model, 0.03, cfg)
    stats = FeatureStats(model)
    model.eval()
    with torch.no_grad():
        model(x[:1])
    model.train()
    opt.rescale(stats)
    seen = []
    h = model.conv2.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    for i in range(0, 256, 64):
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
        opt.step()
    h.remove()
    opt.rescale(stats)
    feats = torch.cat(seen).double().transpose(0, 1).reshape(16, -1)  # conv2's 16 input channels
    lam = feats.std(dim=1, unbiased=False)
    gamma = 1 / math.sqrt(16 * 9 + 32 * 8 * 8)
    w = model.conv2.weight.detach().double()
    norms = w.reshape(32, 16, 9).norm(dim=2)  # kernel (o, i) reads input channel i
    torch.testing.assert_close(norms, (gamma / lam).expand(32, 16), rtol=1e-5, atol=0)


# ---- ngpt ------------------------------------------------------------------------

def _ngpt_unit_dev(model):
    """max |‖v‖ - 1| over the vectors along the embedding dimension of every matrix of an nGPT
    model, found here by parameter name: rows of the embedding, head, q, k, v, up and gate;
    columns of the attention output (o) and MLP down projections."""
    devs, seen = [], 0
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        seen += 1
        leaf = name.split(".")[-2]
        assert leaf in {"embed", "head", "q", "k", "v", "up", "gate", "o", "down"}, name
        dim = 0 if leaf in {"o", "down"} else 1
        devs.append(float((p.detach().double().norm(dim=dim) - 1).abs().max()))
    assert seen == 2 + 7 * len(model.attn)
    return max(devs)


def _ngpt_quick_setup():
    import argparse
    from manifold_sgd.demos import ngpt
    cfg = ngpt.config(argparse.Namespace(quick=True, runs=None))
    data = ngpt.make_data(cfg)
    data["val_x"], data["val_y"] = ngpt.val_windows(data["val"], cfg)
    return ngpt, cfg, data


def _null_bar():
    from manifold_sgd.demos import _common as C
    return C.progress(0, "", True)


def test_ngpt_quick(out_dir):
    res, stored = quick("ngpt", out_dir)
    _files_ok("ngpt", out_dir)
    _common_fields(stored, "ngpt")
    expected = ["gpt-adamw", "ngpt-unfused", "ngpt-fused-row", "ngpt-fused-element"]
    assert stored["recipes"] == expected
    cfg = stored["config"]
    for r in stored["recipes"]:
        s = stored["summary"][r]
        assert {"model", "optimizer", "lr", "final_val_loss", "step_ms_median", "optimizer_ms_median",
                "optimizer_share", "constraint_max_dev"} <= set(s), r
        assert 0 < s["optimizer_share"]["mean"] < 1
        for run in stored["runs"][r]:
            assert run["steps_done"] == cfg["steps"]
            assert run["val_steps"][0] == 0 and run["val_steps"][-1] == cfg["steps"]
            assert len(run["val_steps"]) == len(run["val_loss"])
            # the loss decreases: validation from the initial weights to the end, and training
            assert run["final_val_loss"] < run["val_loss"][0] - 0.1, r
            n = len(run["train_loss"]) // 4
            assert sum(run["train_loss"][-n:]) < sum(run["train_loss"][:n]), r
        if r == "gpt-adamw":
            assert s["constraint_max_dev"] is None
        else:
            assert s["constraint_max_dev"] < 1e-5
    # the data: the running Python's standard library sources, byte for byte
    import hashlib
    d = stored["data"]
    assert d["folder"] == os.path.dirname(os.path.abspath(os.__file__))
    names = [f["name"] for f in d["files"]]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert "os.py" in os.listdir(d["folder"])
    text = b""
    for f in d["files"]:
        with open(os.path.join(d["folder"], f["name"]), "rb") as fh:
            whole = fh.read()
        assert len(whole) == f["file_bytes"]
        text += whole[:f["bytes"]]
    assert len(text) == d["characters"] == cfg["data_bytes"]
    assert hashlib.sha256(text).hexdigest() == d["sha256"]
    assert d["train_characters"] + d["val_characters"] == d["characters"]
    assert d["vocab_size"] == len(set(text))
    text_out = report.table(out_dir, "ngpt")
    assert "not compared" not in text_out


def test_ngpt_unfused_keeps_unit_vectors():
    """The unfused recipe's model, checked on its weights (not the demo's report): after AdamW steps
    and the renormalise pass every constrained vector has norm 1, and the weights did move."""
    ngpt, cfg, data = _ngpt_quick_setup()
    cfg = dict(cfg, steps=10, eval_every=10)
    init = ngpt.build_model("ngpt-unfused", len(data["vocab"]), cfg, 0)
    assert _ngpt_unit_dev(init) < 1e-6
    res = ngpt.train("ngpt-unfused", cfg, data, 0, _null_bar(), keep_model=True)
    model = res["_model"]
    assert _ngpt_unit_dev(model) < 1e-5
    assert float((model.attn[0].o.weight - init.attn[0].o.weight).detach().abs().max()) > 1e-3
    assert res["final_val_loss"] < res["val_loss"][0]


def test_ngpt_fused_recipes_match_unfused(out_dir):
    """With ManifoldAdam: the fused recipes keep every constrained vector on the sphere (checked on
    the weights) and reach about the loss of AdamW + renormalise from the same start."""
    res, stored = quick("ngpt", out_dir)  # all four recipes when ManifoldAdam exists
    unfused = stored["summary"]["ngpt-unfused"]["final_val_loss"]["mean"]
    for r in ("ngpt-fused-row", "ngpt-fused-element"):
        fused = stored["summary"][r]["final_val_loss"]["mean"]
        assert abs(fused - unfused) < 0.05 * unfused, (r, fused, unfused)
        assert stored["fused_vs_unfused"][r]["unfused_mean"] == unfused
        assert "ManifoldAdam" in stored["summary"][r]["optimizer"]
    ngpt, cfg, data = _ngpt_quick_setup()
    cfg = dict(cfg, steps=10, eval_every=10)
    for r in ("ngpt-fused-row", "ngpt-fused-element"):
        out = ngpt.train(r, cfg, data, 0, _null_bar(), keep_model=True)
        assert _ngpt_unit_dev(out["_model"]) < 1e-5, r
        assert out["final_val_loss"] < out["val_loss"][0], r


# ---- the command line and the results page ---------------------------------------

def test_cli_dispatch(capsys):
    from manifold_sgd.__main__ import main
    assert main(["demo", "--help"]) == 0
    assert "un-archbn" in capsys.readouterr().out
    assert main(["demo", "no-such-demo"]) == 2


@pytest.mark.parametrize("name", list(demos.DEMOS))
def test_report_reads_every_field(out_dir, name):
    quick(name, out_dir)
    text = report.table(out_dir, name)
    assert text.count("\n|") >= 3 and "nan" not in text.lower().replace("n/a", "")
