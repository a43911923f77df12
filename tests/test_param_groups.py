"""manifold_param_groups: what goes on the manifold is exactly what the loss is scale-invariant
in (checked by scaling it), the rest stays Euclidean, and the summary says why."""
import pytest
import torch
from torch import nn

import manifold_sgd as msgd
from conftest import BACKENDS

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-12  # norms with a negligible eps: the invariances are then exact to rounding


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c, eps=EPS)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c, eps=EPS)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, eps=EPS), nn.ReLU(),      # 0: filter rows
        Block(6),                                                        # 3: conv1, conv2 filter rows
        nn.ConvTranspose2d(6, 4, 2), nn.InstanceNorm2d(4, eps=EPS),      # 4: tensor (dim 0 = in)
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 12, bias=False), nn.LayerNorm(12, eps=EPS),  # 7: tensor
        nn.Linear(12, 12), nn.GroupNorm(3, 12, eps=EPS),                  # 9: Euclidean (bias)
        nn.Linear(12, 10), nn.ReLU(),                                     # 11: Euclidean (no norm)
        nn.Linear(10, 4)).double()                                        # 13: head


EXPECTED = {
    "0.weight": "sphere (filter rows)", "3.conv1.weight": "sphere (filter rows)",
    "3.conv2.weight": "sphere (filter rows)", "4.weight": "sphere (tensor)", "7.weight": "sphere (tensor)",
    "9.weight": "euclidean", "11.weight": "euclidean", "13.weight": "euclidean",
}


def _loss(model, x, y):
    model.train()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def test_choices_and_summary_for_a_mixed_model():
    model = _model()
    groups = msgd.manifold_param_groups(model, weight_decay=5e-4)
    got = {c.name: c.group for c in groups.choices}
    for name, group in EXPECTED.items():
        assert got[name] == group, (name, got[name])
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert got[name] == "euclidean (no decay)", name  # biases and norm gains
    assert groups.method == "a torch.fx trace"
    table = groups.table()
    assert "3.conv1.weight" in table and "feeds BatchNorm2d" in table and "classifier head" in table
    by_key = {(g["manifold"], g.get("granularity"), g["weight_decay"]): [n for n, _ in g["params"]]
              for g in groups}
    assert by_key[("sphere", "filter", 0.0)] == ["0.weight", "3.conv1.weight", "3.conv2.weight"]
    assert by_key[("sphere", "tensor", 0.0)] == ["4.weight", "7.weight"]
    assert by_key[("euclidean", None, 5e-4)] == ["9.weight", "11.weight", "13.weight"]


def test_what_it_puts_on_the_manifold_is_scale_invariant_and_the_rest_is_not():
    model = _model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 9, 9, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)
    base = _loss(model, x, y)
    params = dict(model.named_parameters())
    groups = msgd.manifold_param_groups(model)
    for c in groups.choices:
        p = params[c.name]
        if p.dim() < 2:
            continue
        keep = p.detach().clone()
        with torch.no_grad():
            if c.group == "sphere (filter rows)":  # each row on its own
                p.mul_(torch.linspace(0.3, 3.0, p.shape[0], dtype=p.dtype).view(-1, *[1] * (p.dim() - 1)))
            else:
                p.mul_(2.5)
        changed = abs(_loss(model, x, y) - base) / abs(base)
        with torch.no_grad():
            p.copy_(keep)
        if c.group.startswith("sphere"):
            assert changed < 1e-9, (c.name, changed)
        else:
            assert changed > 1e-4, (c.name, changed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,manifold", [(msgd.UNSGD, "sphere"), (msgd.FGSGD, "sphere"),
                                          (msgd.PSISGD, "psi")])
def test_groups_train_with_the_optimizers(backend, cls, manifold):
    model = _model()
    groups = msgd.manifold_param_groups(model, manifold=manifold, weight_decay=1e-3)
    opt = cls(groups, lr=0.05, momentum=0.9, backend=backend)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 9, 9, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)
    first = None
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert nn.functional.cross_entropy(model(x), y).item() < first
    if manifold == "sphere":
        torch.testing.assert_close(model[0].weight.detach().reshape(6, -1).norm(dim=1),
                                   torch.ones(6, dtype=torch.float64))
        torch.testing.assert_close(model[7].weight.detach().norm(), torch.tensor(1.0, dtype=torch.float64))


def test_untraceable_models_fall_back_to_registration_order_and_say_so():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 8)
            self.bn = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.bn(self.fc(x))
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                h = h * 2
            return self.head(h)

    groups = msgd.manifold_param_groups(Branchy())
    assert groups.method.startswith("registration order")
    got = {c.name: c.group for c in groups.choices}
    assert got["fc.weight"] == "sphere (filter rows)" and got["head.weight"] == "euclidean"


def test_frozen_params_are_left_out_and_names_reach_errors():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[2].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight[1] = 0
    groups = msgd.manifold_param_groups(model)
    assert {c.name: c.group for c in groups.choices}["2.weight"] == "frozen"
    assert all(p is not model[2].weight for g in groups for _, p in g["params"])
    with pytest.raises(ValueError, match=r"parameter '0\.weight': row 1 has norm 0"):
        msgd.UNSGD(groups, lr=0.1)


def test_a_residual_use_of_the_raw_output_keeps_the_layer_euclidean():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            h = self.fc(x)
            return self.bn(h) + h  # h is used outside the norm: not scale-invariant

    got = {c.name: c.group for c in msgd.manifold_param_groups(Skip()).choices}
    assert got["fc.weight"] == "euclidean"
