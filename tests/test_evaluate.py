"""fastadv.evaluate: robust accuracy over tensors and DataLoaders, Wilson intervals against scipy, and the
sanity flags."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastadv.attacks import FGSM, PGD, Attack, AutoAttack
from fastadv.evaluate import SanityWarning, robust_accuracy, run_sanity_checks, wilson_interval


class Centered(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x):
        return 10 * self.net(x - 0.5)


def dataset(n=70, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 4, generator=g)
    with torch.no_grad():
        y = Centered()(x).argmax(1)
    flip = torch.rand(n, generator=g) < 0.2
    y = torch.where(flip, (y + 1) % 5, y)
    return x, y


@pytest.mark.parametrize("k,n", [(0, 10), (8, 10), (10, 10), (37, 120), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    assert lo <= k / n <= hi
    ref90 = binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert wilson_interval(k, n, 0.9) == pytest.approx((ref90.low, ref90.high), abs=1e-12)


def independent_accuracy(model, x, y, attack):
    """Counted here without fastadv.evaluate: correct on the clean input and on the attack's output."""
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        adv = model(attack(x, y)).argmax(1) == y
    return clean, clean & adv


def test_robust_accuracy_on_tensors_and_dataloaders_agrees_with_an_independent_count():
    model = Centered()
    x, y = dataset()
    # deterministic attacks (no random start), so batching cannot change their outputs
    attacks = {"fgsm": FGSM(model, eps=8 / 255), "pgd": PGD(model, eps=8 / 255, steps=5, random_start=False),
               "cw": PGD(model, eps=4 / 255, steps=5, loss="cw", random_start=False)}
    res = robust_accuracy(model, (x, y), attacks, batch_size=32, progress=False, sanity_checks=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    res_dl = robust_accuracy(model, loader, attacks, progress=False, sanity_checks=False)
    worst = None
    for name, attack in attacks.items():
        clean, robust = independent_accuracy(model, x, y, attack)
        assert res.per_attack[name].correct == int(robust.sum()) == res_dl.per_attack[name].correct
        assert res.clean.correct == int(clean.sum()) == res_dl.clean.correct
        assert torch.equal(res.robust[name], robust)
        worst = robust if worst is None else worst & robust
    assert res.n == len(y) == res_dl.n
    assert res.worst_case.correct == int(worst.sum()) == res_dl.worst_case.correct
    # worst case (per sample AND over attacks) is at most every attack, and here strictly below one
    assert all(res.worst_case.accuracy <= e.accuracy for e in res.per_attack.values())
    assert res.worst_case.accuracy < max(e.accuracy for e in res.per_attack.values())
    for est in [res.clean, res.worst_case, *res.per_attack.values()]:
        lo, hi = est.interval
        assert lo <= est.accuracy <= hi and 0 <= lo < hi <= 1
    assert res.worst_attack in attacks
    d = res.as_dict()
    assert d["per_attack"]["pgd"]["correct"] == res.per_attack["pgd"].correct
    assert "worst case" in str(res)


def test_autoattack_breakdown_is_reported_per_sub_attack():
    model = Centered()
    x, y = dataset(40)
    aa = AutoAttack(model, eps=8 / 255, apgd_steps=4, n_target_classes=2, fab_steps=4, square_queries=10,
                    generator=0)
    res = robust_accuracy(model, (x, y), {"aa": aa}, batch_size=16, progress=False, sanity_checks=False)
    sub = res.breakdown["aa"]
    assert list(sub) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    counts = [res.clean.correct] + [e.correct for e in sub.values()]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sub["square"].correct == res.per_attack["aa"].correct


def test_progress_bar_runs():
    model = Centered()
    x, y = dataset(20)
    res = robust_accuracy(model, (x, y), [FGSM(model), FGSM(model, eps=2 / 255)], batch_size=8, progress=True,
                          sanity_checks=False)
    assert set(res.per_attack) == {"FGSM", "FGSM_2"}


def test_no_sanity_warning_on_a_clean_setup():
    model = Centered()
    x, y = dataset(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SanityWarning)
        res = robust_accuracy(model, (x, y), PGD(model, steps=2, generator=0), progress=False)
    assert res.flags == []


def test_sanity_warning_on_softmax_outputs():
    model = nn.Sequential(Centered(), nn.Softmax(dim=1))
    x, y = dataset(20)
    with pytest.warns(SanityWarning, match="probabilities"):
        res = robust_accuracy(model, (x, y), PGD(model, steps=2, generator=0), progress=False)
    assert any("probabilities" in f for f in res.flags)


class AlwaysDropout(nn.Module):
    """Dropout that stays on in eval mode (``F.dropout(training=True)``): a randomised model."""

    def __init__(self):
        super().__init__()
        self.body = Centered()

    def forward(self, x):
        return F.dropout(self.body(x), p=0.5, training=True)


def test_sanity_warning_on_a_randomised_model():
    model = AlwaysDropout()
    x, y = dataset(20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = robust_accuracy(model, (x, y), PGD(model, steps=2, generator=0), progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, SanityWarning)]
    assert any("randomised" in m for m in messages)
    assert any("randomised" in f for f in res.flags)


def test_sanity_warning_on_zero_gradients():
    class Quantised(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Centered()

        def forward(self, x):
            return self.body(torch.round(x * 4) / 4)      # round() has a zero gradient everywhere

    model = Quantised()
    x, y = dataset(10)
    flags = run_sanity_checks(model, x, y, warn=False)
    assert any("zero input gradient" in f for f in flags)


def test_sanity_flags_an_attack_that_ignores_eps_zero():
    class Noisy(Attack):
        """A broken attack: it adds noise whatever its budget."""

        def __init__(self, model):
            super().__init__(model, eps=0.5)

        def _perturb(self, x, y, target):
            g = self._generator_for(x.device)
            return (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0, 1)

    model = Centered()
    x, y = dataset(32)
    flags = run_sanity_checks(model, x, y, {"noisy": Noisy(model), "pgd": PGD(model, steps=2)}, warn=False)
    assert any("'noisy' with eps=0" in f for f in flags)
    assert not any("'pgd' with eps=0" in f for f in flags)


def test_robust_accuracy_argument_errors():
    model = Centered()
    x, y = dataset(10)
    with pytest.raises(ValueError, match="`batch_size`"):
        robust_accuracy(model, (x, y), FGSM(model), batch_size=0)
    with pytest.raises(ValueError, match="`attacks`"):
        robust_accuracy(model, (x, y), {})
    with pytest.raises(ValueError, match="`data`"):
        robust_accuracy(model, (x, y[:5]), FGSM(model))
    with pytest.raises(ValueError, match="`confidence`"):
        robust_accuracy(model, (x, y), FGSM(model), confidence=1.5)


def test_model_state_is_restored_after_evaluation():
    model = Centered().train()
    x, y = dataset(10)
    robust_accuracy(model, (x, y), FGSM(model), progress=False)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
