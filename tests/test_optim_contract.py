"""The torch.optim contract where a new user meets it first: what the constructor and
add_param_group accept (the errors torch.optim raises, before any of ours), named param
groups, and no state for a parameter with nothing to keep."""
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch import nn

import manifold_sgd as msgd
from conftest import BACKENDS


def _ps():
    return nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4))


def _raises_like_sgd(make):
    """make(cls) raises the same exception type (and torch's message) for SGD and ManifoldSGD."""
    with pytest.raises(Exception) as want:
        make(torch.optim.SGD)
    with pytest.raises(want.type) as got:
        make(msgd.ManifoldSGD)
    return str(want.value), str(got.value)


CASES = {
    "named and unnamed": lambda cls, p, q: cls([("w", p), q], lr=0.1),
    "unnamed then named": lambda cls, p, q: cls([q, ("w", p)], lr=0.1),
    "empty": lambda cls, p, q: cls([], lr=0.1),
    "a tensor": lambda cls, p, q: cls(p, lr=0.1),
    "a set in a group": lambda cls, p, q: cls([{"params": {p}}], lr=0.1),
    "not a tensor": lambda cls, p, q: cls([p, 1.0], lr=0.1),
    "None": lambda cls, p, q: cls([None], lr=0.1),
    "a named non-tensor": lambda cls, p, q: cls([("w", 1.0)], lr=0.1),
    "a non-leaf": lambda cls, p, q: cls([p * 2], lr=0.1),
    "groups and a tensor": lambda cls, p, q: cls([{"params": [p]}, q], lr=0.1),
    "a group without params": lambda cls, p, q: cls([{"lr": 0.1}], lr=0.1),
    "add a list": lambda cls, p, q: cls([p], lr=0.1).add_param_group([q]),
    "add unnamed to named": lambda cls, p, q: cls([("w", p)], lr=0.1).add_param_group({"params": [q]}),
    "add named to unnamed": lambda cls, p, q: cls([p], lr=0.1).add_param_group({"params": [("b", q)]}),
    "a parameter twice": lambda cls, p, q: cls([{"params": [p]}, {"params": [p]}], lr=0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_params_raise_what_torch_raises(case):
    def make(cls):
        p, q = _ps()
        CASES[case](cls, p, q)

    want, got = _raises_like_sgd(make)
    if case.startswith(("named", "unnamed", "empty", "a tensor", "a set", "not a", "None", "a named", "a non-leaf",
                        "groups and", "add a list")):
        assert got.startswith(want.split(" (")[0]), (want, got)


def test_mixed_names_is_torch_error_not_our_name_builder():
    p, q = _ps()
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        msgd.UNSGD([("w", p), q], lr=0.1)


def test_a_generator_of_params_is_read_once():
    p, q = _ps()
    opt = msgd.UNSGD((t for t in (p, q)), lr=0.1)
    assert opt.param_groups[0]["params"] == [p, q]
    opt = msgd.UNSGD(((n, t) for n, t in (("p", p), ("q", q))), lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["p", "q"]


def test_add_param_group_to_manifold_param_groups_says_what_to_do():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.Linear(6, 2))
    opt = msgd.UNSGD(msgd.manifold_param_groups(model), lr=0.1, momentum=0.9)
    extra = nn.Linear(2, 3)
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match=r"carry parameter names.*\(name, tensor\) pairs"):
        opt.add_param_group({"params": list(extra.parameters())})
    assert len(opt.param_groups) == n
    opt.add_param_group({"params": list(extra.named_parameters()), "manifold": "euclidean"})  # as the error says
    assert opt.param_groups[-1]["param_names"] == ["weight", "bias"]
    more = nn.Linear(3, 3, bias=False)  # a group carrying its names, as in another optimizer's param_groups
    opt.add_param_group({"params": [more.weight], "param_names": ["more.weight"], "manifold": "euclidean"})
    assert opt.param_groups[-1]["param_names"] == ["more.weight"]
    x = torch.randn(8, 4)
    more(extra(model(x))).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert all("param_names" in g for g in sd["param_groups"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_state_for_a_parameter_with_nothing_to_keep(backend):
    w, b = _ps()
    sgd_w, sgd_b = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    sgd = torch.optim.SGD([sgd_w, sgd_b], lr=0.1)
    opt = msgd.UNSGD([w, b], lr=0.1, backend=backend)  # w on the sphere, b Euclidean
    for _ in range(2):
        for t in (w, b, sgd_w, sgd_b):
            t.grad = torch.randn_like(t)
        sgd.step()
        opt.step()
    assert len(sgd.state) == 0
    assert b not in opt.state  # as torch.optim.SGD: nothing to keep
    assert set(opt.state[w]) == {"grouping", "row_order", "group_sizes"}  # the sphere's grouping
    assert list(opt.state_dict()["state"]) == [0]
    e = msgd.ManifoldSGD([b], lr=0.1, manifold="euclidean", momentum=0.9, backend=backend)
    b.grad = torch.randn_like(b)
    e.step()
    assert set(e.state[b]) == {"momentum_buffer"}


def test_step_hooks_and_profiler_label_as_torch_gives_them():
    """ManifoldSGD wraps its own step (a cheaper profiler label than torch's wrapper): the
    global and per-optimizer pre/post hooks run in torch's order with torch's arguments, a
    pre-hook's (args, kwargs) replace the call's, and the profiler sees the step's label."""
    p = nn.Parameter(torch.randn(3, 4))
    opt = msgd.UNSGD([p], lr=0.1)
    assert getattr(type(opt).step, "hooked", False)  # torch did not wrap it again
    seen = []
    closure_calls = []

    def closure():
        closure_calls.append(1)
        return torch.tensor(7.0)

    def pre(o, args, kwargs):
        seen.append(("pre", o is opt, args[0] is opt, dict(kwargs)))
        return args, {"closure": closure}

    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("gpre",))),
               opt.register_step_pre_hook(pre),
               opt.register_step_post_hook(lambda o, a, k: seen.append(("post", "closure" in k))),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append(("gpost",)))]
    try:
        p.grad = torch.randn(3, 4)
        with torch.profiler.profile() as prof:
            loss = opt.step()
    finally:
        for h in handles:
            h.remove()
    assert seen == [("gpre",), ("pre", True, True, {}), ("post", True), ("gpost",)]
    assert closure_calls == [1] and float(loss) == 7.0  # the pre-hook's kwargs were used
    assert "Optimizer.step#UNSGD.step" in {e.name for e in prof.events()}
    bad = opt.register_step_pre_hook(lambda o, a, k: 3)
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()
    bad.remove()
