"""Stochastic rounding of bfloat16 weights (``stochastic_rounding=True``) on the reference path
and the native CPU kernel: the same counter-based bits (csrc/core/stochastic_round.h) on both,
unbiased, deterministic in (rounding_seed, the parameter's step, its position, the element),
independent of buckets and backends, continued across checkpoints.
"""
import copy
import io
import math
import random
import warnings

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS
from manifold_sgd import _native, reference

M64 = (1 << 64) - 1
BF16_STEP_BELOW_1 = 2.0 ** -8  # spacing of bfloat16 values just below 1


# ---- the bits --------------------------------------------------------------------------

def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _bits16(key, index):
    """sr_bits16 of stochastic_round.h in Python ints."""
    return _mix64((key + (index + 1) * 0x9E3779B97F4A7C15) & M64) >> 48


def test_torch_bits_equal_integer_bits():
    """The int64 torch arithmetic (wrapping products, masked shifts) gives uint64 results."""
    rng = random.Random(3)
    keys = [0, 1, M64, 1 << 63, (1 << 63) - 1] + [rng.getrandbits(64) for _ in range(20)]
    idx = [0, 1, 2, 1000, (1 << 40) + 7, (1 << 62) - 1] + [rng.getrandbits(48) for _ in range(30)]
    index = torch.tensor(idx, dtype=torch.int64)
    for key in keys:
        got = reference.rounding_bits16(key, index).tolist()
        assert got == [_bits16(key, i) for i in idx]
        assert all(0 <= b < 1 << 16 for b in got)


def test_key_folds_the_element_offset_and_spreads_its_inputs():
    idx = torch.arange(0, 5000, dtype=torch.int64)
    k0 = reference.rounding_key(5, 2, 7)
    k_shift = reference.rounding_key(5, 2, 7, first_element=1234)
    assert torch.equal(reference.rounding_bits16(k_shift, idx), reference.rounding_bits16(k0, idx + 1234))
    keys = {reference.rounding_key(s, t, i) for s in range(3) for t in range(3) for i in range(3)}
    assert len(keys) == 27
    assert reference.rounding_key(-1, 0, 0) == reference.rounding_key(M64, 0, 0)  # uint64 like C++
    assert all(0 <= k <= M64 for k in keys)


def test_rounding_is_to_a_neighbour_and_keeps_exact_and_special_values():
    x = torch.tensor([1.0 - 1e-4, -(1.0 - 1e-4), 3.0, 0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                      3.3895314e38, 1e-40], dtype=torch.float32)
    lo = x.to(torch.bfloat16)
    for key in range(50):
        r = reference.round_bf16_stochastic(x, reference.rounding_key(1, key, 0))
        assert r[2] == 3.0 and r[3] == 0.0 and r[4] == 0.0 and torch.signbit(r[4].float())
        assert r[5] == float("inf") and r[6] == float("-inf") and torch.isnan(r[7])
        for i in (0, 1, 9):  # one of the two bf16 neighbours of x
            a = int(r[i].view(torch.int16)) & 0xFFFF
            b = int(lo[i].view(torch.int16)) & 0xFFFF
            assert abs(a - b) <= 1
            assert float(r[i]) * float(x[i]) >= 0
    # just below the largest bf16: rounds to it or to inf, as round-to-nearest would from above
    assert set(float(reference.round_bf16_stochastic(x[8:9], reference.rounding_key(0, k, 0)))
               for k in range(64)) <= {float(torch.finfo(torch.bfloat16).max), float("inf")}


# ---- the optimizer: unbiased, and lost without it ----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_updates_are_kept_on_average(backend):
    """40 steps of 1e-4 on bf16 weights at 1 (spacing 2^-8 below 1): round-to-nearest loses
    every one; stochastic rounding moves the mean by the float32 amount within a few
    standard errors."""
    steps, lr = 40, 1e-4
    out = {}
    for sr in (False, True):
        w = torch.ones(64, 1024, dtype=torch.bfloat16, requires_grad=True)
        opt = msgd.ManifoldSGD([w], lr=lr, manifold="euclidean", stochastic_rounding=sr, backend=backend)
        for k in range(steps):
            w.grad = torch.ones_like(w)
            opt.step()
            if k == 0 and sr:
                assert set(torch.unique(w.detach().float()).tolist()) == {1.0, 1.0 - BF16_STEP_BELOW_1}
        out[sr] = 1.0 - w.detach().double()
    assert torch.all(out[False] == 0)  # round to nearest: every update lost
    moved = out[True]
    # the float32 expectation: 40 subtractions of float32(1e-4)
    expect = steps * float(torch.tensor(lr, dtype=torch.float32))
    se = float(moved.std()) / math.sqrt(moved.numel())
    assert 0 < se < 1e-4
    assert abs(float(moved.mean()) - expect) < 4 * se, (float(moved.mean()), expect, se)


@pytest.mark.parametrize("backend", BACKENDS)
def test_psi_rows_unbiased_per_element(backend):
    """Many draws of one step on PSI rows: the mean stored weight is the float32 result."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(4, 16, generator=gen).to(torch.bfloat16)
    g = (torch.randn(4, 16, generator=gen) * 1e-3).to(torch.bfloat16)
    w_exact = w0.float().clone()  # the float32 step
    skipped = reference.step_rows(w_exact, g.float(), None, kind="psi", fresh=False, group_ids=None,
                                  n_groups=0, radius=None, opt=reference.StepOptions(lr=0.1))
    assert not skipped.any()
    draws = []
    for seed in range(400):
        w = w0.clone().requires_grad_()
        opt = msgd.PSISGD([w], lr=0.1, stochastic_rounding=True, rounding_seed=seed, backend=backend)
        w.grad = g.clone()
        opt.step()
        draws.append(w.detach().double())
    d = torch.stack(draws)
    ulp = (w_exact.abs() * 2.0 ** -7).double()  # at most the bf16 spacing at this magnitude
    assert torch.all((d - w_exact.double()).abs() <= ulp)  # always a neighbour
    err = (d.mean(0) - w_exact.double()).abs()
    se = d.std(0) / math.sqrt(len(draws))
    moved = se > 0  # elements whose float32 result is not a bf16 value
    assert moved.sum() > 40
    assert torch.all(err[moved] < 5 * se[moved] + 1e-9)


# ---- native == reference -----------------------------------------------------------------

CONV = [(6, 4, 3, 3), (5, 3, 1, 3), (10,)]
CASES = [
    ("un", msgd.UNSGD, dict(), CONV + [(13, 9)]),
    ("un-momentum", msgd.UNSGD, dict(momentum=0.9), CONV + [(13, 9), (2, 4097)]),
    ("fg-po", msgd.FGSGD, dict(grouping="PO", group_size=2, momentum=0.5), CONV),
    ("psim", msgd.PSISGD, dict(momentum=0.9), CONV + [(13, 9)]),
    ("euclidean-wd", msgd.ManifoldSGD, dict(manifold="euclidean", momentum=0.9, weight_decay=0.1), CONV),
    ("stiefel", msgd.ManifoldSGD, dict(manifold="stiefel", granularity="kernel", momentum=0.9),
     [(4, 3, 3, 3), (2, 2, 2, 5)]),
]


def _params(shapes, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(torch.bfloat16).requires_grad_()
            for s in shapes]


def _grads(shapes, steps, seed=8):
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=gen) * 0.3).to(torch.bfloat16) for s in shapes] for _ in range(steps)]


def _ulps(a, b):
    """|a - b| in bf16 steps (same sign assumed), as int tensors of the bit patterns."""
    return (a.view(torch.int16).to(torch.int32) - b.view(torch.int16).to(torch.int32)).abs()


@pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_native_equals_reference_with_stochastic_rounding(case):
    """One step from the same state: the same bits, but where the two float32 results differ
    across a rounding threshold (then one bf16 step apart, rarely)."""
    _, cls, opts, shapes = case
    grads = _grads(shapes, 3)
    runs = {}
    for backend in ("native", "reference"):
        params = _params(shapes)
        opt = cls(params, lr=0.05, backend=backend, stochastic_rounding=True, rounding_seed=11, **opts)
        for k, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
            if k == 0:
                first = [p.detach().clone() for p in params]
        runs[backend] = (first, [p.detach().clone() for p in params], opt)
    total = differ = 0
    for a, b in zip(runs["native"][0], runs["reference"][0]):
        u = _ulps(a, b)
        assert int(u.max()) <= 1
        total += u.numel()
        differ += int((u > 0).sum())
    assert differ <= max(2, total // 200), (differ, total)
    for a, b in zip(runs["native"][1], runs["reference"][1]):  # three steps: bf16 tolerance
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    # rounding was stochastic: round-to-nearest from the same start gives other bits
    params = _params(shapes)
    opt = cls(params, lr=0.05, backend="native", **opts)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    assert any(not torch.equal(p.detach(), a) for p, a in zip(params, runs["native"][0]))
    assert all(runs["native"][2].state[p]["rounding_step"] == 3 for p in runs["native"][2].param_groups[0]["params"])


@pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")
def test_native_bits_do_not_depend_on_threads():
    shapes = [(64, 2048), (33, 1000)]
    grads = _grads(shapes, 2)
    out = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params = _params(shapes)
            opt = msgd.UNSGD(params, lr=0.05, momentum=0.9, stochastic_rounding=True, backend="native")
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
            out.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")
def test_channels_last_weight_rounds_like_the_reference():
    w0 = _params([(8, 4, 3, 3)])[0].detach()
    g = _grads([(8, 4, 3, 3)], 1)[0][0]
    got = {}
    for backend in ("native", "reference"):
        w = w0.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
        opt = msgd.UNSGD([w], lr=0.1, stochastic_rounding=True, backend=backend)
        w.grad = g.clone().contiguous(memory_format=torch.channels_last)
        opt.step()
        got[backend] = w.detach().contiguous()
    assert int(_ulps(got["native"], got["reference"]).max()) <= 1


# ---- determinism and keys ------------------------------------------------------------------

def _one_step(backend, shapes, seed=0, rounding_step=None, sr=True, **kw):
    params = _params(shapes)
    opt = msgd.UNSGD(params, lr=0.1, stochastic_rounding=sr, rounding_seed=seed, backend=backend, **kw)
    if rounding_step is not None:
        for p in params:
            opt.state[p]["rounding_step"] = rounding_step
    for p, g in zip(params, _grads(shapes, 1)[0]):
        p.grad = g
    opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_bits_and_other_seed_or_step_other_bits(backend):
    shapes = [(16, 300), (7, 50)]
    a = _one_step(backend, shapes, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, _one_step(backend, shapes, seed=3)))
    assert all(torch.equal(x, y) for x, y in zip(a, _one_step(backend, shapes, seed=3, rounding_step=0)))
    for other in (_one_step(backend, shapes, seed=4), _one_step(backend, shapes, seed=3, rounding_step=1)):
        for x, y in zip(a, other):
            assert not torch.equal(x, y)
            assert int(_ulps(x, y).max()) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bits_do_not_depend_on_buckets(backend):
    """A parameter's bits come from its own position and step count: leaving another parameter
    out of a step (a new plan and bucket), or moving it to another param group, changes
    nothing for it."""
    shapes = [(12, 40), (9, 40), (6, 5)]
    grads = _grads(shapes, 3)

    def run(skip_b_at=None, split_groups=False):
        gen = torch.Generator().manual_seed(7)
        a, b = (torch.randn(s, generator=gen).to(torch.bfloat16).requires_grad_() for s in shapes[:2])
        c = torch.randn(shapes[2], generator=gen).requires_grad_()  # float32: another bucket
        groups = ([{"params": [a]}, {"params": [b, c]}] if split_groups else [{"params": [a, b, c]}])
        opt = msgd.UNSGD(groups, lr=0.1, momentum=0.9, stochastic_rounding=True, backend=backend)
        for k, (ga, gb, gc) in enumerate(grads):
            a.grad, c.grad = ga.clone(), gc.float()
            b.grad = None if k == skip_b_at else gb.clone()
            opt.step()
        return a.detach().clone(), opt.state[a]["rounding_step"], opt.state[b]["rounding_step"]

    base = run()
    assert base[1:] == (3, 3)
    skipped = run(skip_b_at=1)
    assert torch.equal(base[0], skipped[0]) and skipped[1:] == (3, 2)
    assert torch.equal(base[0], run(split_groups=True)[0])


# ---- checkpoints -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_continues_the_stream(backend):
    shapes = [(8, 4, 3, 3), (10,), (13, 9)]
    grads = _grads(shapes, 6)
    params = _params(shapes)
    opt = msgd.UNSGD(params, lr=0.05, momentum=0.9, stochastic_rounding=True, rounding_seed=5, backend=backend)

    def steps(opt, params, gs):
        for step_grads in gs:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()

    steps(opt, params, grads[:3])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    assert [opt.state_dict()["state"][i]["rounding_step"] for i in range(3)] == [3, 3, 3]
    steps(opt, params, grads[3:])
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    params2 = [w.clone().requires_grad_() for w in ck["params"]]
    opt2 = msgd.UNSGD(params2, lr=0.05, momentum=0.9, stochastic_rounding=True, rounding_seed=5, backend=backend)
    opt2.load_state_dict(ck["opt"])
    steps(opt2, params2, grads[3:])
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(params, params2))
    # a fresh optimizer without the loaded state would restart the stream: other bits
    params3 = [w.clone().requires_grad_() for w in ck["params"]]
    opt3 = msgd.UNSGD(params3, lr=0.05, momentum=0.9, stochastic_rounding=True, rounding_seed=5, backend=backend)
    sd = copy.deepcopy(ck["opt"])
    for st in sd["state"].values():
        st.pop("rounding_step")
    opt3.load_state_dict(sd)
    steps(opt3, params3, grads[3:])
    assert any(not torch.equal(p.detach(), q.detach()) for p, q in zip(params, params3))


def test_checkpoint_from_before_the_option_loads():
    params = _params([(4, 9)])
    opt = msgd.UNSGD(params, lr=0.1)
    params[0].grad = _grads([(4, 9)], 1)[0][0]
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g["stochastic_rounding"], g["rounding_seed"]
    opt2 = msgd.UNSGD(params, lr=0.1, stochastic_rounding=True)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["stochastic_rounding"] is False and opt2.param_groups[0]["rounding_seed"] == 0
    opt2.step()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_loaded_rounding_step_must_be_a_count(bad):
    params = _params([(4, 9)])
    opt = msgd.UNSGD(list(zip(["w"], params)), lr=0.1, stochastic_rounding=True)
    params[0].grad = _grads([(4, 9)], 1)[0][0]
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["rounding_step"] = bad
    with pytest.raises(ValueError, match="parameter 'w'.*rounding_step"):
        opt.load_state_dict(sd)


# ---- per-group semantics and bad input ---------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_option_is_per_group_and_leaves_other_dtypes_alone(backend):
    gen = torch.Generator().manual_seed(2)
    a0 = torch.randn(6, 20, generator=gen).to(torch.bfloat16)
    b0 = torch.randn(6, 20, generator=gen).to(torch.bfloat16)
    c0 = torch.randn(6, 20, generator=gen)
    grads = [torch.randn(6, 20, generator=gen) * 0.1 for _ in range(3)]

    def run(sr_group0):
        a, b, c = (x.clone().requires_grad_() for x in (a0, b0, c0))
        opt = msgd.UNSGD([{"params": [a, c], "stochastic_rounding": sr_group0}, {"params": [b]}], lr=0.1,
                         backend=backend)
        for g in grads:
            a.grad, b.grad, c.grad = g.to(torch.bfloat16), g.to(torch.bfloat16), g.clone()
            opt.step()
        return opt, a, b, c

    opt, a, b, c = run(True)
    _, a_rn, b_rn, c_rn = run(False)
    assert not torch.equal(a, a_rn)  # group 0's bf16 weight rounds stochastically
    assert torch.equal(b, b_rn) and torch.equal(c, c_rn)  # group 1, and a float32 weight: unchanged
    assert opt.state[a]["rounding_step"] == 3
    assert "rounding_step" not in opt.state[b] and "rounding_step" not in opt.state[c]


def test_float16_parameter_in_a_rounding_group_is_an_error():
    w16 = torch.randn(4, 9).half().requires_grad_()
    with pytest.raises(ValueError, match="parameter 'enc.w'.*stochastic_rounding=True.*float16"):
        msgd.UNSGD([("enc.w", w16)], lr=0.1, stochastic_rounding=True)
    # switched on after construction: raised at the step, before any weight moves
    w = _params([(4, 9)])[0]
    opt = msgd.UNSGD([{"params": [("enc.w", w16)]}, {"params": [("dec.w", w)]}], lr=0.1)
    before = [w16.detach().clone(), w.detach().clone()]
    w16.grad, w.grad = torch.randn(4, 9).half(), _grads([(4, 9)], 1)[0][0]
    opt.param_groups[0]["stochastic_rounding"] = True
    with pytest.raises(ValueError, match="parameter 'enc.w'.*float16"):
        opt.step()
    assert torch.equal(w16.detach(), before[0]) and torch.equal(w.detach(), before[1])


@pytest.mark.parametrize("opt_name, value", [("stochastic_rounding", 1), ("stochastic_rounding", "yes"),
                                             ("rounding_seed", 1.5), ("rounding_seed", True)])
def test_bad_option_values(opt_name, value):
    with pytest.raises(ValueError, match=f"param_groups\\[0\\]: {opt_name}="):
        msgd.UNSGD(_params([(4, 9)]), lr=0.1, **{opt_name: value})


@pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")
def test_native_bucket_checks_rounding_keys():
    def bucket(dtype):
        return _native.NativeBucket([4], [9], ["sphere"], [torch.arange(4)], [torch.ones(4, dtype=torch.int64)],
                                    [None], dtype, names=["parameter 'w'"])

    opt = reference.StepOptions(lr=0.1)
    w = torch.nn.functional.normalize(torch.randn(4, 9), dim=1)
    g = torch.randn(4, 9)
    with pytest.raises(ValueError, match="parameter 'w': stochastic rounding applies to bfloat16"):
        bucket(torch.float32).run([w], [g], [None], [False], opt, rounding_keys=[5])
    b = bucket(torch.bfloat16)
    wb, gb = w.to(torch.bfloat16), g.to(torch.bfloat16)
    before = wb.clone()
    for keys, match in (([1 << 64], "rounding key"), ([-1], "rounding key"), ([2.0], "rounding key"),
                        ([1, 2], "2 rounding keys for 1 tensors")):
        with pytest.raises(ValueError, match=match):
            b.run([wb], [gb], [None], [False], opt, rounding_keys=keys)
    assert torch.equal(wb, before)
    # the largest key is fine (stored as the int64 with the same bits), and matches the reference
    b.run([wb], [gb], [None], [False], opt, rounding_keys=[M64])
    wr = before.clone()
    reference.step_rows(wr, gb, None, kind="sphere", fresh=False, group_ids=None, n_groups=0, radius=None,
                        opt=opt, rounding_key=M64)
    assert int(_ulps(wb, wr).max()) <= 1


def test_reference_refuses_keys_for_other_dtypes():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="bfloat16"):
        reference.step_rows(w, torch.randn(3, 4), None, kind="euclidean", fresh=False, group_ids=None,
                            n_groups=0, radius=None, opt=reference.StepOptions(lr=0.1), rounding_key=1)


def test_warnings_module_quiet():  # the option itself emits nothing on a clean step
    params = _params([(4, 9)])
    opt = msgd.UNSGD(params, lr=0.1, stochastic_rounding=True)
    params[0].grad = _grads([(4, 9)], 1)[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
