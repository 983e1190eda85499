"""APGD against SPECS §1 on hand-checked cases: the checkpoint schedule, the step-halving conditions on a
scripted loss sequence, DLR's class-count errors, and restarts that never make a result worse."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.attacks import APGD, APGDT, PGD, apgd_checkpoints

EPS = 8 / 255


def test_checkpoints_for_100_iterations_match_the_hand_computed_schedule():
    # p: 0, .22, .22+.19=.41, .41+.16=.57, .57+.13=.70, .70+.10=.80, .80+.07=.87, .87+.06=.93, .93+.06=.99
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


def test_checkpoints_round_up_and_drop_duplicates():
    # ceil(50 p): 0, 11, 20.5→21, 28.5→29, 35, 40, 43.5→44, 46.5→47, 49.5→50
    assert apgd_checkpoints(50) == [0, 11, 21, 29, 35, 40, 44, 47, 50]
    # ceil(5 p): 0, 1.1→2, 2.05→3, 2.85→3, 3.5→4, 4, 4.35→5, 4.65→5, 4.95→5
    assert apgd_checkpoints(5) == [0, 2, 3, 4, 5]


class ScriptedLoss(nn.Module):
    """A 'model' whose k-th forward returns a scripted loss per sample as logit 0 (logit 1 is far below, so
    nothing is ever misclassified) and whose input gradient is exactly zero: APGD's iterate never moves
    and only its step-size bookkeeping is exercised."""

    def __init__(self, script):
        super().__init__()
        self.script = script
        self.calls = 0

    def forward(self, x):
        row = self.script[self.calls].to(x.dtype)
        self.calls += 1
        z = row + 0.0 * x.flatten(1).sum(1)
        return torch.stack([z, z - 1e4], dim=1)


def scripted_losses(n=100):
    """f(x⁽ᵏ⁾), k = 0..n, for six samples (checkpoints 22, 41, 57, 70, 80, 87, 93, 99):

    0. constant: no increase ever → condition 1 at every checkpoint;
    1. strictly increasing: never halved;
    2. first interval 17 of 22 increases (≥ 16.5: no halving), then a drop and 18 of 19 increases that stay
       below the best → condition 2 (no halving last time, best not improved) at 41; increasing afterwards;
    3. first interval 16 of 22 increases (< 16.5) → condition 1 at 22; increasing afterwards;
    4. increasing to 41, then exactly 12 of 16 increases with a new best (12 = 75 %, not fewer) → no halving
       at 57; increasing afterwards;
    5. as 3 up to 22 (halved), then like 2's second interval: the best does not improve, but the step was
       halved at the last checkpoint, so condition 2 does not apply → no halving at 41.
    """
    k = torch.arange(n + 1, dtype=torch.float64)
    f = torch.zeros(n + 1, 6, dtype=torch.float64)
    f[:, 1] = k
    # sample 2
    s2 = torch.empty(n + 1, dtype=torch.float64)
    s2[0] = 0
    s2[1:6] = -torch.arange(1, 6)                      # 5 decreases
    s2[6:23] = -5 + 2 * torch.arange(1, 18)            # 17 increases, best 29 at k = 22
    s2[23] = 29 - 100                                  # a drop
    s2[24:42] = s2[23] + torch.arange(1, 19)           # 18 increases, still below 29
    s2[42:] = 1000 + k[42:]                            # new bests from here on
    f[:, 2] = s2
    # sample 3
    s3 = torch.empty(n + 1, dtype=torch.float64)
    s3[0] = 0
    s3[1:7] = -torch.arange(1, 7)                      # 6 decreases
    s3[7:23] = -6 + 2 * torch.arange(1, 17)            # 16 increases
    s3[23:] = 26 + (k[23:] - 22)
    f[:, 3] = s3
    # sample 4
    s4 = k.clone()
    s4[42:46] = 41 - torch.arange(1, 5)                # 4 decreases after 41
    s4[46:58] = 37 + 5 * torch.arange(1, 13)           # 12 increases, best 97
    s4[58:] = 200 + k[58:]
    f[:, 4] = s4
    # sample 5
    s5 = s3.clone()
    s5[23] = 26 - 100
    s5[24:42] = s5[23] + torch.arange(1, 19)           # 18 increases, still below 26
    s5[42:] = 1000 + k[42:]
    f[:, 5] = s5
    return f


def expected_step_sizes(n=100):
    """Row k: the step size used from x⁽ᵏ⁾ (after the check at k), per sample."""
    cps = [22, 41, 57, 70, 80, 87, 93, 99]
    eta = torch.full((n + 1, 6), 2 * EPS, dtype=torch.float64)
    for k in range(n + 1):
        eta[k, 0] = 2 * EPS / 2 ** sum(c <= k for c in cps)
        if k >= 41:
            eta[k, 2] = EPS
        if k >= 22:
            eta[k, 3] = EPS
            eta[k, 5] = EPS
    return eta


def test_step_halving_happens_exactly_where_specs_say():
    script = scripted_losses()
    model = ScriptedLoss(script)
    x = torch.rand(6, 3, 4, 4)
    y = torch.zeros(6, dtype=torch.long)
    attack = APGD(model, eps=EPS, steps=100, loss=lambda logits, labels: logits[:, 0], record_history=True,
                  generator=0)
    attack(x, y)
    assert model.calls == 101                          # N + 1 gradient evaluations, nothing more
    torch.testing.assert_close(attack.history["loss"].double(), script, rtol=0, atol=1e-4)
    torch.testing.assert_close(attack.history["step_size"].double(), expected_step_sizes(), rtol=1e-6, atol=0)


class ScriptedWalk(nn.Module):
    """A few pixels; the k-th forward returns the scripted loss ``f[k]`` and has input gradient signs ``s[k]``
    (one per pixel, a 1e-6 slope, far below the loss gaps). Records every input it sees."""

    def __init__(self, f, s):
        super().__init__()
        self.f, self.s = f, s
        self.inputs = []

    def forward(self, x):
        k = len(self.inputs)
        self.inputs.append(x.detach().flatten().tolist())
        z = self.f[k] + 1e-6 * (x.flatten(1) * self.s[k]).sum(1)
        return torch.stack([z, z - 1e4], dim=1)


def simulate_apgd(f, s, x0, eps, n, checkpoints):
    """SPECS §1 APGD in plain Python, pixel by pixel (the ball stays inside the box here): the iterates
    x⁽⁰⁾…x⁽ⁿ⁾ the model is evaluated at, and the returned (best) point."""
    def clip(u):
        return [min(max(ui, x0i - eps), x0i + eps) for ui, x0i in zip(u, x0)]

    eta, x, prev, g = 2 * eps, list(x0), list(x0), s[0]
    best_f, best_x, best_g = f[0], list(x0), s[0]
    seen, n_inc, last, reduced_last, best_at_check = [list(x0)], 0, 0, False, f[0]
    for k in range(1, n + 1):
        z = clip([xi + eta * gi for xi, gi in zip(x, g)])
        if k == 1:
            new = z
        else:
            new = clip([xi + 0.75 * (zi - xi) + 0.25 * (xi - pi) for xi, zi, pi in zip(x, z, prev)])
        prev, x = x, new
        seen.append(x)
        g = s[k]
        n_inc += f[k] > f[k - 1]
        if f[k] > best_f:
            best_f, best_x, best_g = f[k], x, g
        if k in checkpoints and k < n:
            reduce = n_inc < 0.75 * (k - last) or (not reduced_last and best_at_check >= best_f)
            if reduce:
                eta, x, g = eta / 2, best_x, best_g
            reduced_last, best_at_check, n_inc, last = reduce, best_f, 0, k
    return seen, best_x


@pytest.mark.parametrize("seed,p_up", [(0, 0.8), (1, 0.45), (2, 0.45)])
def test_iterates_momentum_and_resets_match_a_plain_python_simulation_of_the_spec(seed, p_up):
    """A loss walk that mostly climbs (few halvings) or wanders (halvings with resets to a best point in the
    past) and scripted gradient signs; every iterate must be the one the spec gives."""
    g = torch.Generator().manual_seed(seed)
    n, pixels = 100, 4
    up = torch.rand(n + 1, generator=g) < p_up
    steps = torch.where(up, 1, -1) * torch.randint(1, 4, (n + 1,), generator=g)
    walk = steps.cumsum(0).double() + 1e-3 * torch.arange(n + 1)      # distinct values: no ties
    signs = torch.randint(0, 2, (n + 1, pixels), generator=g) * 2.0 - 1
    model = ScriptedWalk(walk.tolist(), signs)
    x0 = [0.3, 0.4, 0.5, 0.6]
    x = torch.tensor(x0).view(1, 1, 2, 2)
    adv = APGD(model, eps=0.25, steps=n, loss=lambda z, y: z[:, 0], random_start=False)(
        x, torch.zeros(1, dtype=torch.long))
    seen, best = simulate_apgd(walk.tolist(), signs.tolist(), x0, 0.25, n, {22, 41, 57, 70, 80, 87, 93, 99})
    assert len(model.inputs) == n + 1
    for got, want in zip(model.inputs, seen):
        assert got == pytest.approx(want, abs=1e-6)
    assert adv.flatten().tolist() == pytest.approx(best, abs=1e-6)
    assert len({tuple(round(v, 6) for v in p) for p in seen}) > 10      # the iterate really moves


def test_dlr_needs_enough_classes():
    def linear(classes):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(12, classes))

    x = torch.rand(4, 3, 2, 2)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="at least 3 classes"):
        APGD(linear(2), loss="dlr", steps=2)(x, y)
    with pytest.raises(ValueError, match="at least 3 classes"):
        PGD(linear(2), loss="dlr", steps=2)(x, y)
    with pytest.raises(ValueError, match="at least 4 classes"):
        APGDT(linear(3), steps=2)(x, y)
    with pytest.raises(ValueError, match="at least 4 classes"):
        PGD(linear(3), loss="dlr", targeted=True, steps=2)(x, y)
    APGD(linear(3), loss="dlr", steps=2)(x, y)        # 3 classes are enough untargeted
    APGDT(linear(4), steps=2, n_target_classes=2)(x, y)


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def ce(model, adv, y):
    with torch.no_grad():
        return F.cross_entropy(model(adv), y, reduction="none"), model(adv).argmax(1) != y


@pytest.mark.parametrize("make", [
    lambda m, r: PGD(m, eps=2 / 255, alpha=0.5 / 255, steps=5, restarts=r, generator=11),
    lambda m, r: PGD(m, eps=2 / 255, alpha=0.5 / 255, steps=5, restarts=r, early_stop=True, generator=11),
    lambda m, r: APGD(m, eps=2 / 255, steps=8, restarts=r, generator=11),
])
def test_restarts_never_make_results_worse(make):
    model = small_mlp()
    x = torch.rand(40, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    loss1, fooled1 = ce(model, make(model, 1)(x, y), y)
    loss4, fooled4 = ce(model, make(model, 4)(x, y), y)
    assert (fooled4 | ~fooled1).all()                       # a fooled sample stays fooled
    assert fooled1.any() and not fooled1.all()               # both kinds of samples are present
    keep = ~fooled4
    assert (loss4[keep] >= loss1[keep] - 1e-6).all()         # the others keep their highest loss
    assert fooled4.sum() > fooled1.sum() or (loss4[keep] > loss1[keep] + 1e-6).any()   # and restarts help


def test_apgd_is_at_least_as_strong_as_pgd_on_an_mlp():
    model = small_mlp()
    x = torch.rand(64, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    _, pgd_fooled = ce(model, PGD(model, eps=2 / 255, alpha=0.5 / 255, steps=20, generator=0)(x, y), y)
    _, apgd_fooled = ce(model, APGD(model, eps=2 / 255, steps=20, generator=0)(x, y), y)
    assert apgd_fooled.sum() >= pgd_fooled.sum()


def test_apgd_returns_the_first_adversarial_point_when_found():
    model = small_mlp()
    x = torch.rand(64, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    adv = APGD(model, eps=4 / 255, steps=10, loss="dlr", generator=0)(x, y)
    _, fooled = ce(model, adv, y)
    _, fooled_pgd = ce(model, PGD(model, eps=4 / 255, alpha=1 / 255, steps=10, loss="dlr", generator=0)(x, y), y)
    assert fooled.sum() >= fooled_pgd.sum() and fooled.any()


def test_early_stop_freezes_each_sample_at_its_first_adversarial_iterate():
    """With ``early_stop`` a sample keeps the first iterate that fools the model. The iterates themselves come
    from plain PGD runs of 0, 1, ..., N steps (no random start, so run t ends at iterate t)."""
    model = small_mlp()
    x = torch.rand(40, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    n = 6
    kw = dict(eps=3 / 255, alpha=1 / 255, random_start=False)
    iterates = [x] + [PGD(model, steps=t, **kw)(x, y) for t in range(1, n + 1)]
    with torch.no_grad():
        fooled = torch.stack([model(it).argmax(1) != y for it in iterates[:n]])      # (n, B) for t < n
    first = torch.where(fooled.any(0), fooled.float().argmax(0), torch.full_like(y, n))
    expected = torch.stack(iterates)[first, torch.arange(len(y))]
    got = PGD(model, steps=n, early_stop=True, **kw)(x, y)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert ((first > 0) & (first < n)).any()          # some samples froze before the end
    assert not torch.equal(got, iterates[n])
