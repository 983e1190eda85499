"""Attacks against independent references: closed-form optima on linear models, targeted attacks on a
separable problem, MMA against separately run targeted PGDs, FAB's projection against scipy's solvers and
its minimal distortion against the closed form, Square's schedule against the paper's table."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linprog, minimize
from torch import nn

from fastadv.attacks import APGD, APGDT, FAB, FGSM, MMA, PGD, Square, project_to_hyperplane, square_fraction
from fastadv.attacks.square import pseudo_gaussian

EPS = 8 / 255


class Logistic(nn.Module):
    """Binary logistic regression as two logits ``[0, w·x + b]``."""

    def __init__(self, w, b=0.0):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        s = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


def logistic_problem(n=10, seed=0, edge=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 4, 4, generator=g) * 0.05
    x = 0.2 + 0.6 * torch.rand(n, 3, 4, 4, generator=g)
    if edge:                                       # some pixels where the box clips the optimum
        x[:, 0, 0, :] = 0.995
        x[:, 1, 0, :] = 0.002
    y = torch.randint(0, 2, (n,), generator=g)
    return Logistic(w, 0.1), x, y


def linf_optimum(model, x, y):
    """Maximising CE (or the margin) of logistic regression in the L∞ ball ∩ box is separable per
    coordinate: move by ε in the direction of sign(w) for y = 0 (raise w·x), of −sign(w) for y = 1."""
    direction = torch.where(y == 0, 1.0, -1.0).view(-1, 1, 1, 1) * model.w.detach().sign()
    return (x + EPS * direction).clamp(0, 1)


def l2_optimum(model, x, y, eps):
    """In the L2 ball (no clipping in play) the optimum is x ± eps·w/‖w‖."""
    w = model.w.detach()
    direction = torch.where(y == 0, 1.0, -1.0).view(-1, 1, 1, 1) * w / w.norm()
    return x + eps * direction


@pytest.mark.parametrize("edge", [False, True])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_linf_attacks_reach_the_closed_form_optimum_of_a_linear_model(loss, edge):
    model, x, y = logistic_problem(edge=edge)
    expected = linf_optimum(model, x, y)
    attacks = [
        PGD(model, eps=EPS, alpha=2 / 255, steps=10, loss=loss, generator=0),   # from a random start
        PGD(model, eps=EPS, alpha=2 / 255, steps=10, loss=loss, restarts=2, generator=0),
        FGSM(model, eps=EPS, loss=loss),
        APGD(model, eps=EPS, steps=10, loss=loss, generator=0),
    ]
    check_against_optimum(model, x, y, expected, attacks)


def check_against_optimum(model, x, y, expected, attacks):
    """PGD/FGSM return their last iterate, which must be the optimum. APGD returns the first adversarial
    point it meets: where the optimum is not adversarial no point of the ball is (for a linear model the
    optimum minimises the margin), so there the result must be the optimum; elsewhere it must be fooled."""
    with torch.no_grad():
        fooled_at_optimum = model(expected).argmax(1) != y
    assert fooled_at_optimum.any() and not fooled_at_optimum.all()   # both branches are exercised
    for attack in attacks:
        adv = attack(x, y)
        if isinstance(attack, APGD):
            with torch.no_grad():
                assert (model(adv[fooled_at_optimum]).argmax(1) != y[fooled_at_optimum]).all(), attack
            adv, want = adv[~fooled_at_optimum], expected[~fooled_at_optimum]
        else:
            want = expected
        torch.testing.assert_close(adv, want, atol=1e-6, rtol=0, msg=repr(attack))


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_l2_attacks_reach_the_closed_form_optimum_of_a_linear_model(loss):
    model, x, y = logistic_problem()
    eps = 0.3
    expected = l2_optimum(model, x, y, eps)
    assert expected.min() > 0 and expected.max() < 1
    check_against_optimum(model, x, y, expected, [
        PGD(model, eps=eps, alpha=eps / 4, steps=6, norm="l2", loss=loss, random_start=False),
        APGD(model, eps=eps, steps=10, norm="l2", loss=loss, random_start=False)])
    # From a random start PGD converges to the same point.
    far = PGD(model, eps=eps, alpha=eps, steps=40, norm="l2", loss=loss, generator=0)(x, y)
    torch.testing.assert_close(far, expected, atol=1e-5, rtol=0)


def separable_problem(classes=4, n=24, seed=0):
    """Linear classes with random ±1 prototypes; each input is its class prototype at 2 % contrast."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 2, (classes, 3 * 8 * 8), generator=g).float() * 2 - 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes))
    with torch.no_grad():                          # logits = ⟨prototype, x − 0.5⟩
        model[1].weight.copy_(protos)
        model[1].bias.copy_(-0.5 * protos.sum(1))
    y = torch.arange(n) % classes
    x = (0.5 + 0.02 * protos[y]).view(n, 3, 8, 8)
    target = (y + 1 + torch.randint(0, classes - 1, (n,), generator=g)) % classes
    assert (target != y).all()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    return model, x, y, target


@pytest.mark.parametrize("loss", ["ce", "cw", "dlr"])
def test_targeted_pgd_hits_its_targets(loss):
    model, x, y, target = separable_problem()
    adv = PGD(model, steps=10, loss=loss, targeted=True, generator=0)(x, y, target=target)
    assert_hit(model, adv, y, target, loss)
    # Untargeted with the same budget need not land on the target (the test is not trivial).
    untargeted = PGD(model, steps=10, generator=0)(x, y)
    with torch.no_grad():
        assert not (model(untargeted).argmax(1) == target).all()


def assert_hit(model, adv, y, target, loss):
    """CE and CW push the target to the top. Targeted DLR (APGD-T's loss) only compares the target with the
    true class, ``−(z_y − z_t)/…``: it must put ``z_t`` above ``z_y`` (and so fool the model)."""
    with torch.no_grad():
        z = model(adv)
    rows = torch.arange(len(y))
    if loss == "dlr":
        assert (z[rows, target] > z[rows, y]).all()
        assert (z.argmax(1) != y).all()
    else:
        assert (z.argmax(1) == target).all()


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_targeted_apgdt_hits_given_targets(loss):
    model, x, y, target = separable_problem()
    adv = APGDT(model, steps=20, loss=loss, generator=0)(x, y, target=target)
    assert_hit(model, adv, y, target, loss)


def test_fab_hits_given_targets():
    """FAB-T crosses the linearised boundary between y and t; on this linear problem that lands on t."""
    model, x, y, target = separable_problem()
    adv = FAB(model, steps=20, generator=0)(x, y, target=target)
    with torch.no_grad():
        assert (model(adv).argmax(1) == target).all()


@pytest.mark.parametrize("rule", ["least_likely", "most_likely"])
def test_target_rules_pick_the_documented_class(rule):
    model, x, y, _ = separable_problem(seed=1)
    with torch.no_grad():
        logits = model(x)
    if rule == "least_likely":
        expected = logits.argmin(1)
    else:
        masked = logits.clone()
        masked[torch.arange(len(y)), y] = -1e9
        expected = masked.argmax(1)
    adv = PGD(model, steps=10, targeted=True, target_rule=rule, generator=0)(x, y)
    with torch.no_grad():
        assert (model(adv).argmax(1) == expected).all()


def test_random_target_rule_never_picks_the_true_class():
    model, x, y, _ = separable_problem()
    adv = PGD(model, steps=10, targeted=True, generator=0)(x, y)
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).all()


def test_mma_keeps_the_smallest_margin_of_separately_run_targeted_pgds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 6))
    x = torch.rand(10, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    mma = MMA(model, eps=4 / 255, alpha=1 / 255, steps=20, k=3, random_start=False)
    adv = mma(x, y)

    def true_margin(z):
        other = z.clone()
        other[torch.arange(len(y)), y] = -float("inf")
        return z[torch.arange(len(y)), y] - other.amax(1)

    with torch.no_grad():
        logits = model(x)
        wrong = logits.clone()
        wrong[torch.arange(len(y)), y] = -float("inf")
        top3 = wrong.topk(3, dim=1).indices
    margins = []
    for j in range(3):
        cand = PGD(model, eps=4 / 255, alpha=1 / 255, steps=20, loss="cw", targeted=True, random_start=False)(
            x, y, target=top3[:, j])
        with torch.no_grad():
            margins.append(true_margin(model(cand)))
    expected = torch.stack(margins).amin(0)
    with torch.no_grad():
        got = true_margin(model(adv))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and the smallest candidate is smaller than the first candidate somewhere (k > 1 matters)
    assert (expected < margins[0] - 1e-6).any()


def _reference_projection(p, w, c, norm, lo=0.0, hi=1.0):
    """min ‖d‖ s.t. ⟨w, d⟩ = c, lo ≤ p + d ≤ hi with scipy (LP for L∞, SLSQP for L2)."""
    n = p.size
    bounds = [(lo - pi, hi - pi) for pi in p]
    if norm == "linf":
        # variables (d, r): minimise r, −r ≤ d ≤ r
        cost = np.r_[np.zeros(n), 1.0]
        a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.r_[w, 0.0][None], b_eq=[c],
                      bounds=bounds + [(0, None)], method="highs")
        assert res.status == 0
        return res.x[-1]
    res = minimize(lambda d: d @ d, np.zeros(n), jac=lambda d: 2 * d, bounds=bounds,
                   constraints=[{"type": "eq", "fun": lambda d: w @ d - c, "jac": lambda d: w}],
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    assert res.success
    return float(np.sqrt(res.x @ res.x))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_matches_scipy(norm):
    g = torch.Generator().manual_seed(0)
    n, d = 12, 9
    p = torch.rand(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[0, :4] = 0.0                                  # zero weights must not break the search
    c = torch.randn(n, generator=g, dtype=torch.float64) * 0.6
    out = project_to_hyperplane(p, w, c, norm, 0.0, 1.0)
    assert ((p + out) >= -1e-12).all() and ((p + out) <= 1 + 1e-12).all()
    for i in range(n):
        reachable = (w[i].clamp(min=0) * (1 - p[i]) + (-w[i]).clamp(min=0) * p[i]).sum() >= abs(c[i]) if c[i] > 0 \
            else (w[i].clamp(min=0) * p[i] + (-w[i]).clamp(min=0) * (1 - p[i])).sum() >= abs(c[i])
        if not reachable:
            continue
        assert float(w[i] @ out[i]) == pytest.approx(float(c[i]), abs=1e-9)
        size = out[i].abs().max() if norm == "linf" else out[i].norm()
        assert float(size) == pytest.approx(_reference_projection(p[i].numpy(), w[i].numpy(), float(c[i]), norm),
                                            rel=1e-5, abs=1e-7)


def test_fab_finds_the_minimal_linf_perturbation_of_a_linear_model():
    """For ``[0, w·x + b]`` without box effects the smallest L∞ change of class is |w·x + b| / ‖w‖₁."""
    model, x, _ = logistic_problem(n=8, seed=3)
    with torch.no_grad():
        model.b.fill_(-0.5 * float(model.w.sum()))      # boundary through the middle of the box
        s = model(x)[:, 1]
        y = (s > 0).long()
    minimal = s.abs() / model.w.detach().abs().sum()
    assert minimal.max() < 0.15                         # x ± minimal stays inside [0, 1]: no box effect
    fab = FAB(model, eps=None, steps=50, n_target_classes=1)
    adv = fab(x, y)
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).all()
    found = (adv - x).flatten(1).abs().amax(1)
    assert (found >= minimal * (1 - 1e-4)).all()
    assert (found <= minimal * 1.02).all(), (found / minimal)
    torch.testing.assert_close(fab.last_min_norm, found, atol=1e-6, rtol=1e-5)
    # With a budget below the minimum nothing can be found, and the clean input comes back.
    tight = FAB(model, eps=float(minimal.min()) * 0.9, steps=30, n_target_classes=1)(x, y)
    assert torch.equal(tight, x)


def test_square_schedule_follows_the_paper():
    halvings = {10: 1, 11: 2, 50: 2, 51: 4, 200: 4, 201: 8, 500: 8, 501: 16, 1001: 32, 2001: 64, 4001: 128,
                6001: 256, 8001: 512, 9999: 512, 0: 1}
    for it, div in halvings.items():
        assert square_fraction(0.8, it) == pytest.approx(0.8 / div), it
    # rescaled to 1000 queries, iteration 100 acts as 1000
    assert square_fraction(0.8, 100, 1000, rescale=True) == pytest.approx(0.8 / 16)


def test_pseudo_gaussian_pattern():
    p = pseudo_gaussian(5, "cpu")
    assert p.shape == (5, 5)
    assert float(p.norm()) == pytest.approx(1.0)
    assert (p[:2] > 0).all() and (p[2:] < 0).all()
    # each half peaks at its centre column and decays outwards (3×5 lower half centred at row 3)
    assert p[3, 2] == p[2:].min() and p[1, 2] == p[:2].max()


@pytest.mark.parametrize("norm,eps,reach", [("linf", 0.05, 0.5), ("l2", 0.6, 0.2)])
def test_square_fools_a_linear_model_with_queries_only(norm, eps, reach):
    """Square only queries the model. On the points that the optimal perturbation fools by a clear margin
    (their margin is below ``reach`` times the optimal gain; L2 random search is slower) it must succeed."""
    torch.manual_seed(0)
    # one sign per channel: the structure Square's windows (one sign per channel) can exploit
    w = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1) * torch.rand(3, 8, 8) * 0.2
    model = Logistic(w, b=-0.5 * float(w.sum()))
    x = 0.3 + 0.4 * torch.rand(20, 3, 8, 8)
    with torch.no_grad():
        s = model(x)[:, 1]
    y = (s > 0).long()
    gain = eps * (w.abs().sum() if norm == "linf" else w.norm())
    keep = s.abs() < reach * gain
    x, y = x[keep], y[keep]
    assert len(y) >= 5
    adv = Square(model, eps=eps, norm=norm, n_queries=300, generator=0)(x, y)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert fooled.float().mean() >= 0.9
    d = (adv - x).flatten(1)
    assert (d.abs().amax(1) if norm == "linf" else d.norm(dim=1)).max() <= eps + 1e-6


def test_square_margin_never_increases_with_more_queries():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(16, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)

    def margins(adv):
        with torch.no_grad():
            z = model(adv)
        other = z.clone()
        other[torch.arange(len(y)), y] = -float("inf")
        return z[torch.arange(len(y)), y] - other.amax(1)

    short = margins(Square(model, eps=2 / 255, n_queries=20, generator=3)(x, y))
    long = margins(Square(model, eps=2 / 255, n_queries=80, generator=3)(x, y))
    assert (long <= short + 1e-6).all()
    assert (long < short - 1e-6).any()


def test_ce_and_dlr_losses_against_hand_computed_values():
    from fastadv.attacks import cw_loss, dlr_loss, targeted_dlr_loss
    z = torch.tensor([[3.0, 1.0, 0.5, -1.0], [0.0, 2.0, 1.0, 4.0]])
    y = torch.tensor([0, 1])
    t = torch.tensor([2, 3])
    # sample 0: z_y=3, best other 1, sorted 3,1,0.5,-1 ; sample 1: z_y=2, best other 4, sorted 4,2,1,0
    torch.testing.assert_close(dlr_loss(z, y), torch.tensor([-(3 - 1) / (3 - 0.5), -(2 - 4) / (4 - 1)]))
    torch.testing.assert_close(targeted_dlr_loss(z, y, t),
                               torch.tensor([-(3 - 0.5) / (3 - (0.5 - 1) / 2), -(2 - 4) / (4 - (1 + 0) / 2)]))
    # CW: margins 2 and -2; -clamp(margin, min=-1.5)
    torch.testing.assert_close(cw_loss(z, y, kappa=1.5), torch.tensor([-2.0, 1.5]))
    torch.testing.assert_close(F.cross_entropy(z, y, reduction="none"),
                               -torch.log_softmax(z, 1)[torch.arange(2), y])
