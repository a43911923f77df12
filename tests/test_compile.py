"""torch.compile: a compiled model trains with these optimizers exactly as far as its own
numerics allow, and ``torch.compile(opt.step)`` runs the step eagerly (a graph break by
design: the native call on raw addresses and the plan cache cannot be traced)."""
import warnings

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # raised inside torch's inductor, not by this package
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def _data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def _run(model, opt, step_fn, steps=3):
    for i in range(steps):
        x, y = _data(i)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        step_fn()


def test_compiled_model_trains_like_the_eager_one():
    """Inductor (the default backend): one test, since compiling costs seconds on 2 cores."""
    eager, compiled = _net(), _net()
    o1 = msgd.FGSGD(eager.parameters(), lr=0.1, momentum=0.9, grouping="PO", group_size=4)
    o2 = msgd.FGSGD(compiled.parameters(), lr=0.1, momentum=0.9, grouping="PO", group_size=4)
    cmodel = torch.compile(compiled)
    _run(eager, o1, o1.step)
    _run(cmodel, o2, torch.compile(o2.step))  # model and step both under torch.compile
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # inductor reorders float sums
    torch.testing.assert_close(compiled[0].weight.norm(dim=1), torch.ones(16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", [(msgd.FGSGD, dict(momentum=0.9)), (msgd.PSISGD, dict(momentum=0.9))],
                         ids=["fg", "psim"])
def test_compiled_step_falls_back_to_eager_and_matches(backend, cls, kw):
    m1, m2 = _net(), _net()
    o1 = cls(m1.parameters(), lr=0.1, backend=backend, **kw)
    o2 = cls(m2.parameters(), lr=0.1, backend=backend, **kw)
    step = torch.compile(o2.step)
    _run(m1, o1, o1.step)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "Dynamo does not know how to trace" noise
        _run(m2, o2, step)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_compiled_model_with_aot_eager_and_a_closure():
    # aot_eager compiles forward and backward graphs without codegen: fast, and the grads the
    # optimizer sees come from a compiled backward
    eager, compiled = _net(), _net()
    o1 = msgd.UNSGD(eager.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    o2 = msgd.UNSGD(compiled.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    cmodel = torch.compile(compiled, backend="aot_eager")
    for i in range(3):
        x, y = _data(i)
        for model, opt in ((eager, o1), (cmodel, o2)):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_fullgraph_step_is_a_clear_error():
    w = torch.randn(4, 3, requires_grad=True)
    opt = msgd.UNSGD([w], lr=0.1)
    w.grad = torch.randn(4, 3)
    w0 = w.detach().clone()
    with pytest.raises(Exception, match="skipped|should not be traced"):
        torch.compile(opt.step, fullgraph=True)()
    assert torch.equal(w.detach(), w0)
