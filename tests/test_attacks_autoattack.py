"""AutoAttack: the standard protocol's composition, per-attack robust accuracy, and its defaults."""

import pytest
import torch
from torch import nn

from fastadv.attacks import APGD, AutoAttack


class Centered(nn.Module):
    """A random small CNN on centred inputs with a scaled head, so that its predictions vary with the input."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x):
        return 20 * self.net(x - 0.5)


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return Centered()


def data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    return x


def quick(model, norm="linf", eps=None, **kw):
    eps = eps if eps is not None else (8 / 255 if norm == "linf" else 0.5)
    return AutoAttack(model, norm=norm, eps=eps, apgd_steps=8, n_target_classes=3, fab_steps=8,
                      square_queries=40, generator=0, **kw)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_attack_accuracies_are_non_increasing_and_match_the_final_batch(norm):
    model = small_cnn()
    x = data()
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:6] = (y[:6] + 1) % 10                       # a few clean mistakes
    aa = quick(model, norm)
    res = aa.run(x, y)
    accs = [res.clean_accuracy, *res.robust_accuracy.values()]
    assert list(res.robust_accuracy) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    assert res.clean_accuracy == pytest.approx(42 / 48)
    assert accs[-1] < accs[0]                      # the attacks do something
    # The reported final accuracy is what the model does on the returned batch (independent recount).
    with torch.no_grad():
        robust = model(res.x_adv).argmax(1) == y
    assert res.final_accuracy == pytest.approx(robust.float().mean().item())
    assert torch.equal(res.robust, robust)
    # each attack's mask shrinks the previous one
    masks = list(res.robust_after.values())
    for a, b in zip(masks, masks[1:]):
        assert (a | ~b).all()
    d = (res.x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert size.max() <= aa.eps + 1e-6 and res.max_perturbation <= aa.eps + 1e-6


def test_each_attack_only_runs_on_points_still_robust():
    model = small_cnn()
    x = data(32)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 10
    aa = quick(model)
    seen = {}
    for name, attack in aa.attacks.items():
        aa.attacks[name] = _Counted(attack, seen, name)
    res = aa.run(x, y)
    robust_before = [int(res.clean_accuracy * 32)] + [int(round(a * 32)) for a in res.robust_accuracy.values()]
    for i, name in enumerate(aa.attacks):
        assert seen.get(name, 0) == robust_before[i], name


class _Counted:
    def __init__(self, attack, seen, name):
        self.attack, self.seen, self.name = attack, seen, name

    def __call__(self, x, y, target=None):
        self.seen[self.name] = x.shape[0]
        return self.attack(x, y, target)


def test_standard_version_uses_the_paper_defaults():
    aa = AutoAttack(small_cnn())
    apgd, apgdt, fab, square = (aa.attacks[k] for k in ("apgd-ce", "apgd-t", "fab-t", "square"))
    assert isinstance(apgd, APGD) and apgd.steps == 100 and apgd.restarts == 1 and apgd.loss == "ce"
    assert apgdt.steps == 100 and apgdt.n_target_classes == 9 and apgdt.loss == "dlr"
    assert fab.steps == 100 and fab.n_target_classes == 9 and fab.restarts == 1
    assert square.n_queries == 5000 and square.p_init == 0.8
    assert aa.eps == pytest.approx(8 / 255) and aa.norm == "linf"


def test_custom_version_runs_the_named_attacks_in_order():
    model = small_cnn()
    x = data(16)
    with torch.no_grad():
        y = model(x).argmax(1)
    aa = AutoAttack(model, eps=2 / 255, version="custom", attacks=["apgd-dlr", "square"], apgd_steps=5,
                    square_queries=10, generator=0)
    res = aa.run(x, y)
    assert list(res.robust_accuracy) == ["apgd-dlr", "square"]


def test_autoattack_is_deterministic_given_the_generator():
    model = small_cnn()
    x = data(16)
    with torch.no_grad():
        y = model(x).argmax(1)
    a = quick(model)(x, y)
    b = quick(model)(x, y)
    assert torch.equal(a, b)
