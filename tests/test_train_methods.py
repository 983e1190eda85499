"""fastadv.train methods against independent computations on tiny models: every outer loss written out by hand
(TRADES' KL term, MART's formula per the paper, RRM's cosine term), the inner maximisations step by step
(TRADES' KL objective with clean logits computed once, MART's Gaussian start, Fast AT's FGSM-RS, Free AT's
replays with one backward each), PART's per-pixel budget inside a real training run, and the registry/config
errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.cam import part_masks
from fastadv.data import get_dataset
from fastadv.data.augment import crop_flip
from fastadv.models import create_model
from fastadv.models.base import FeatureModel
from fastadv.train import METHODS, TrainConfig, Trainer, get_method
from fastadv.train.data import Batch
from fastadv.train.methods import PART, rrm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255


class Tiny(FeatureModel):
    """A conv feature extractor (no BatchNorm, so train/eval mode give the same outputs) and a linear head."""

    cam_layer_name = "conv"

    def __init__(self, num_classes: int = 10, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.feature_dim = 4 * width
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x):
        return torch.flatten(self.pool(self.conv(x)), 1)


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():  # larger logits so that the probabilities are far from uniform
        model.conv[0].weight.mul_(3)
        model.head.weight.mul_(6)
    return model


def _batch(n: int = 6, seed: int = 1, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _stub(model, seed=5, **config):
    """What a method's inner maximisation reads from the trainer."""
    return SimpleNamespace(model=model, attack_generator=torch.Generator().manual_seed(seed), amp=None,
                           config=TrainConfig(**config))


def _cfg(**kw):
    base = dict(model="small_cnn", dataset="digits", out_dir=None, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def digits16():
    return get_dataset("digits", size=16), get_dataset("digits", split="test", size=16)


# --------------------------------------------------------------------------------------------------
# outer losses


def test_standard_and_pgd_at_losses_are_cross_entropy():
    model = _tiny()
    x, y = _batch()
    x_adv = (x + 0.02).clamp(0, 1)
    logits = model(x)
    ref = -(logits.log_softmax(1).gather(1, y[:, None])).mean()
    loss, out = get_method("standard")(_cfg(method="standard")).loss(model, Batch(x, y), None)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(out, logits)
    adv_logits = model(x_adv)
    ref_adv = -(adv_logits.log_softmax(1).gather(1, y[:, None])).mean()
    for name in ("pgd_at", "fast_at", "free_at", "part"):
        loss, _ = get_method(name)(_cfg(method=name)).loss(model, Batch(x, y), x_adv)
        torch.testing.assert_close(loss, ref_adv)


@pytest.mark.parametrize("name", ["trades", "part_trades"])
@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_trades_loss_matches_explicit_kl(beta, name):
    model = _tiny()
    x, y = _batch()
    x_adv = _batch(seed=7)[0]  # the formula does not need a nearby point; a far one makes the KL term large
    method = get_method(name)(_cfg(method=name, trades_beta=beta))
    loss, _ = method.loss(model, Batch(x, y), x_adv)

    z_nat, z_adv = model(x).double(), model(x_adv).double()
    p = torch.exp(z_nat) / torch.exp(z_nat).sum(1, keepdim=True)
    q = torch.exp(z_adv) / torch.exp(z_adv).sum(1, keepdim=True)
    kl = (p * (torch.log(p) - torch.log(q))).sum(1).mean()  # KL(p_nat || p_adv), batch mean
    ce = -torch.log(p[torch.arange(len(y)), y]).mean()
    torch.testing.assert_close(loss.double(), ce + beta * kl, rtol=1e-5, atol=1e-6)
    # The KL term is not trivially zero here, so a wrong direction or reduction would show.
    assert kl.item() > 1e-3
    kl_reverse = (q * (torch.log(q) - torch.log(p))).sum(1).mean()
    assert not torch.isclose(ce + beta * kl, ce + beta * kl_reverse, rtol=1e-4)


@pytest.mark.parametrize("name", ["mart", "part_mart"])
@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_mart_loss_matches_paper_formula(beta, name):
    model = _tiny(3)
    x, y = _batch(8, seed=4)
    x_adv = _batch(8, seed=12)[0]
    method = get_method(name)(_cfg(method=name, mart_beta=beta))
    loss, _ = method.loss(model, Batch(x, y), x_adv)

    p_adv = torch.softmax(model(x_adv).double(), 1)
    p_nat = torch.softmax(model(x).double(), 1)
    rows = torch.arange(len(y))
    wrong = p_adv.clone()
    wrong[rows, y] = -1.0
    max_wrong = wrong.max(1).values  # max_{k != y} p_adv[k]
    bce = -torch.log(p_adv[rows, y]) - torch.log(1 - max_wrong)
    kl = (p_nat * torch.log(p_nat / p_adv)).sum(1)
    ref = (bce + beta * kl * (1 - p_nat[rows, y])).mean()
    # The reference code's log guards (1.0001, 1e-12) move the value by ~1e-4 at most here.
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=1e-3)
    assert beta == 0 or (kl * (1 - p_nat[rows, y])).mean().item() > 1e-2


# --------------------------------------------------------------------------------------------------
# inner maximisations, step by step


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, handle


def test_trades_inner_max_is_signed_ascent_on_kl_with_clean_logits_once():
    model = _tiny()
    x, y = _batch()
    alpha, steps, std = 2 / 255, 3, 0.001
    method = get_method("trades")(_cfg(method="trades", steps=steps, alpha=alpha, start_std=std))
    calls, handle = _count_forwards(model)
    x_adv = method.perturb(_stub(model, seed=11), Batch(x, y))
    handle.remove()
    assert len(calls) == 1 + steps  # the clean probabilities once, then one forward per step

    g = torch.Generator().manual_seed(11)
    delta = ((x + std * torch.randn(x.shape, generator=g)).clamp(0, 1) - x)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    for _ in range(steps):
        xa = (x + delta).requires_grad_(True)
        log_q = torch.log_softmax(model(xa), 1)
        kl_sum = (p * (torch.log(p) - log_q)).sum()
        (grad,) = torch.autograd.grad(kl_sum, xa)
        delta = (delta + alpha * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    torch.testing.assert_close(x_adv, (x + delta).clamp(0, 1), rtol=0, atol=1e-6)
    assert (x_adv - x).abs().max() <= EPS + 1e-6


def test_mart_inner_max_uses_gaussian_start_and_cross_entropy():
    model = _tiny(2)
    x, y = _batch(5, seed=9)
    alpha, steps = 2 / 255, 2
    method = get_method("mart")(_cfg(method="mart", steps=steps, alpha=alpha))
    x_adv = method.perturb(_stub(model, seed=3), Batch(x, y))

    g = torch.Generator().manual_seed(3)
    delta = (x + 0.001 * torch.randn(x.shape, generator=g)).clamp(0, 1) - x
    for _ in range(steps):
        xa = (x + delta).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
        delta = (delta + alpha * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    torch.testing.assert_close(x_adv, x + delta, rtol=0, atol=1e-6)


def test_fast_at_inner_max_is_fgsm_rs_with_alpha_1_25_eps(digits16):
    train_set, test_set = digits16
    trainer = Trainer(_cfg(method="fast_at", model_kwargs={"width": 4}, train_subset=32, eval_subset=16,
                           batch_size=16, epochs=1, seed=3), train_set=train_set, eval_set=test_set)
    model = trainer.model
    x, y = test_set.x[:8], test_set.y[:8]
    state = trainer.attack_generator.get_state()
    x_adv = trainer.method.perturb(trainer, Batch(x, y))

    g = torch.Generator()
    g.set_state(state)
    u = torch.rand(x.shape, generator=g)
    delta = (x + (2 * u - 1) * EPS).clamp(0, 1) - x
    model.eval()
    xa = (x + delta).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
    model.train()
    delta = (delta + 1.25 * EPS * grad.sign()).clamp(-EPS, EPS)
    torch.testing.assert_close(x_adv, (x + delta).clamp(0, 1), rtol=0, atol=1e-6)
    assert trainer.method.alpha == pytest.approx(1.25 * EPS)


def test_free_at_replays_batch_m_times_with_one_backward_each(digits16):
    train_set, test_set = digits16
    m = 3
    cfg = _cfg(method="free_at", model_kwargs={"width": 4}, train_subset=32, eval_subset=16, batch_size=8,
               epochs=6, free_replays=m, momentum=0.0, weight_decay=0.0, schedule="constant", lr=0.05,
               augment=False)
    trainer = Trainer(cfg, train_set=train_set, eval_set=test_set)
    assert trainer.num_epochs == 2  # 6 nominal epochs / 3 replays
    reference = create_model("small_cnn", 10, width=4)
    reference.load_state_dict(trainer.model.state_dict())
    x, y = train_set.x[:8], train_set.y[:8]

    trainer.method.train_batch(trainer, Batch(x, y))
    assert trainer.scheduler.last_epoch == m  # one optimiser step per replay

    delta = torch.zeros_like(x)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    reference.train()
    for _ in range(m):
        d = delta.clone().requires_grad_(True)
        loss = F.cross_entropy(reference((x + d).clamp(0, 1)), y)
        opt.zero_grad()
        loss.backward()  # one backward: weight gradients and d.grad together
        opt.step()
        delta = (delta + EPS * d.grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    for (name, a), b in zip(trainer.model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(trainer.method.delta[:8], delta, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# RRM


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(42)
    teacher = create_model("small_cnn", 10, width=4)  # feature width 16
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    return path, teacher


def test_rrm_loss_is_lambda_ce_minus_mean_cosine_and_teacher_is_frozen(digits16, teacher_file):
    train_set, test_set = digits16
    path, teacher_ref = teacher_file
    lam = 0.005
    cfg = _cfg(method="rrm", model_kwargs={"width": 2}, rrm_teacher=str(path), rrm_teacher_model="small_cnn",
               rrm_teacher_kwargs={"width": 4}, rrm_lambda=lam, train_subset=32, eval_subset=16, batch_size=16,
               epochs=1, eval_steps=0)
    trainer = Trainer(cfg, train_set=train_set, eval_set=test_set)
    method = trainer.method
    assert method.student_dim == 8 and method.teacher_dim == 16
    assert isinstance(method.projection, nn.Linear)

    x, y = train_set.x[:10], train_set.y[:10]
    student = trainer.model
    student.eval()
    teacher_ref.eval()
    loss, _ = method.loss(trainer.net, Batch(x, y), None)
    g_s = method.projection(student.features(x))
    g_t = teacher_ref.features(x)  # the teacher as saved, computed independently
    cos = (g_s * g_t).sum(1) / (g_s.norm(dim=1) * g_t.norm(dim=1))
    logits = student(x)
    ce = -logits.log_softmax(1)[torch.arange(10), y].mean()
    torch.testing.assert_close(loss, lam * ce - cos.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rrm_loss(logits, g_s, g_t, y, lam), lam * ce - cos.mean(), rtol=1e-5, atol=1e-6)

    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    proj_before = method.projection.weight.detach().clone()
    trainer.fit()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not method.teacher.training
    assert not torch.equal(method.projection.weight, proj_before)  # the projection trains with the student


def test_rrm_unmatched_features_and_bad_teacher_are_clear_errors(digits16, teacher_file, tmp_path):
    train_set, test_set = digits16
    path, _ = teacher_file
    common = dict(method="rrm", model_kwargs={"width": 2}, rrm_teacher=str(path), rrm_teacher_model="small_cnn",
                  rrm_teacher_kwargs={"width": 4}, train_subset=16, eval_subset=8, batch_size=8, epochs=1)
    with pytest.raises(ValueError, match="width 8 but the teacher's have 16"):
        Trainer(_cfg(**common, rrm_projection=False), train_set=train_set, eval_set=test_set)
    with pytest.raises(ValueError, match="does not match the model"):
        Trainer(_cfg(**{**common, "rrm_teacher_kwargs": {"width": 6}}), train_set=train_set, eval_set=test_set)
    with pytest.raises(FileNotFoundError, match="teacher checkpoint"):
        Trainer(_cfg(**{**common, "rrm_teacher": str(tmp_path / "missing.pt")}), train_set=train_set,
                eval_set=test_set)
    with pytest.raises(ValueError, match="rrm_teacher"):
        _cfg(method="rrm")


# --------------------------------------------------------------------------------------------------
# PART inside a training run


def _record_part(trainer):
    """Wrap the PART method of ``trainer`` to record, per reweighted batch, the mask it used, the mask expected
    from an independent CAM pass on the un-augmented images (moved by the batch's crop/flip), and the
    adversarial images."""
    method = trainer.method
    records = []
    masks_for, perturb_with = method.masks_for, method.base.perturb_with

    def recording_masks_for(tr, batch):
        cam_amp = method.config.cam_amp if method.config.cam_amp is not None else tr.amp
        fresh = part_masks(tr.model, batch.raw, method.config.cam_layer, method.config.cam_method,
                           method.config.cam_recipe, amp=cam_amp).to(torch.uint8)
        if batch.crop is not None:
            offsets, flips, padding = batch.crop
            fresh = crop_flip(fresh, offsets, flips, padding=padding)
        mask = masks_for(tr, batch)
        records.append({"epoch": tr.epoch, "mask": mask, "expected_now": fresh.bool(), "index": batch.index.clone(),
                        "crop": batch.crop})
        return mask

    def recording_perturb_with(tr, batch, step):
        adv = perturb_with(tr, batch, step)
        if records and "adv" not in records[-1]:  # warm-up batches of TRADES/MART bases come here without a mask
            records[-1].update(x=batch.x.clone(), adv=adv.clone())
        return adv

    method.masks_for = recording_masks_for
    method.base.perturb_with = recording_perturb_with
    return records


@pytest.mark.parametrize("name, cam_amp", [("part", None), ("part_trades", None), ("part_mart", None),
                                           ("part", "bf16")])
def test_part_masked_budget_respected_during_training(digits16, name, cam_amp):
    train_set, test_set = digits16
    eps_low = 4 / 255
    cfg = _cfg(method=name, model_kwargs={"width": 4}, train_subset=48, eval_subset=16, batch_size=16, epochs=3,
               warmup_epochs=1, cam_every=2, eps_low=eps_low, steps=5, alpha=2 / 255, eval_steps=0, augment=True,
               cam_amp=cam_amp)
    trainer = Trainer(cfg, train_set=train_set, eval_set=test_set)
    records = _record_part(trainer)
    result = trainer.fit()
    assert [r["part_phase"] for r in result.history] == ["warmup", "reweighted", "reweighted"]
    assert {r["epoch"] for r in records} == {1, 2}  # no masks during the warm-up epoch
    high_used = 0
    for r in records:
        mask = r["mask"].expand_as(r["x"])
        delta = (r["adv"] - r["x"]).abs()
        assert delta[mask].max() <= EPS + 1e-6
        assert delta[~mask].max() <= eps_low + 1e-6
        high_used += int((delta[mask] > eps_low + 1e-4).sum())
        assert mask.any() and (~mask).any()
    assert high_used > 0  # important pixels do get the larger budget

    # Refresh epoch (epoch index 1): the masks are those of the current model on the current batch, moved with
    # the batch's crop/flip. Cached epoch (index 2): the refreshed mask of the same example, moved by the new crop.
    refreshed = {}
    for r in (r for r in records if r["epoch"] == 1):
        assert torch.equal(r["mask"], r["expected_now"])
        for i, idx in enumerate(r["index"].tolist()):
            refreshed[idx] = r
    cache = trainer.method.cache
    for r in (r for r in records if r["epoch"] == 2):
        offsets, flips, padding = r["crop"]
        expected = crop_flip(cache[r["index"]], offsets, flips, padding=padding).bool()
        assert torch.equal(r["mask"], expected)
        assert set(r["index"].tolist()) <= set(refreshed)


def test_part_misaligned_reproduction_mode_uses_other_images_masks(digits16):
    train_set, test_set = digits16
    cfg = _cfg(method="part", model_kwargs={"width": 4}, train_subset=32, eval_subset=16, batch_size=16, epochs=2,
               warmup_epochs=1, cam_every=1, eval_steps=0, augment=False, steps=2,
               reproduce_misaligned_masks=True)
    trainer = Trainer(cfg, train_set=train_set, eval_set=test_set)
    records = _record_part(trainer)
    trainer.fit()
    assert records
    mismatched = sum(int(not torch.equal(r["mask"], r["expected_now"])) for r in records)
    assert mismatched == len(records)  # every batch is attacked with masks of other images
    for r in records:
        delta = (r["adv"] - r["x"]).abs()
        mask = r["mask"].expand_as(delta)
        assert delta[~mask].max() <= 7 / 255 + 1e-6


# --------------------------------------------------------------------------------------------------
# registry and config


def test_registry_has_every_method_and_unknown_names_fail():
    # other packages (fastadv.prompting) may register more methods
    assert set(METHODS) >= {"standard", "pgd_at", "trades", "mart", "part", "part_trades", "part_mart", "fast_at",
                            "free_at", "rrm"}
    assert issubclass(METHODS["part_mart"], PART)
    with pytest.raises(ValueError, match="unknown training method 'madry'.*pgd_at"):
        get_method("madry")
    with pytest.raises(ValueError, match="TrainConfig.method"):
        TrainConfig(method="madry")


def test_trainer_takes_a_configured_method_instance():
    config = _cfg(method="pgd_at", epochs=1, train_subset=32, batch_size=16, steps=1, eval_subset=0,
                  model_kwargs={"width": 4})
    calls = []

    class Counting(METHODS["pgd_at"]):
        def perturb(self, trainer, batch):
            calls.append(batch.x.shape[0])
            return super().perturb(trainer, batch)

    trainer = Trainer(config, method=Counting(config))
    try:
        assert isinstance(trainer.method, Counting)
        trainer.fit()
    finally:
        trainer.close()
    assert sum(calls) == trainer.train_data.num_examples
    with pytest.raises(ValueError, match="'pgd_at' method built with this config"):
        Trainer(config, method=METHODS["trades"](config))
    with pytest.raises(ValueError, match="built with another config"):
        Trainer(config, method=METHODS["pgd_at"](_cfg(method="pgd_at")))
    with pytest.raises(TypeError, match="`method` must be"):
        Trainer(config, method="pgd_at")


@pytest.mark.parametrize("field, value", [
    ("lr", -0.1), ("lr", math.nan), ("epochs", 0), ("batch_size", 2.5), ("eps", 0), ("optimizer", "lbfgs"),
    ("schedule", "step"), ("amp", "fp8"), ("norm", "l1"), ("milestones", (30, 10)), ("cam_recipe", "hot"),
    ("momentum", 1.0), ("train_subset", 0), ("co_action", "panic"), ("dataset", "imagenet"), ("augment", "yes"),
    ("device", "tpu"), ("lr_gamma", 2.0), ("cyclic_peak", 1.0), ("adam_betas", (0.9,)), ("steps", 0),
    ("num_classes", 0), ("co_drop", -0.1), ("free_replays", 0), ("cam_amp", "fp8"),
])
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**{field: value})


def test_config_cross_field_checks_and_round_trip():
    with pytest.raises(ValueError, match="TrainConfig.warmup_epochs"):
        TrainConfig(method="part", epochs=10, warmup_epochs=10)
    with pytest.raises(ValueError, match="TrainConfig.eps_low"):
        TrainConfig(method="part", eps_low=9 / 255)
    with pytest.raises(ValueError, match="TrainConfig.norm"):
        TrainConfig(method="part_trades", norm="l2")
    with pytest.raises(ValueError, match="TrainConfig.amp"):
        TrainConfig(optimizer="sam", amp="fp16")
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    cfg = TrainConfig.for_method("fast_at", epochs=3)
    assert cfg.lr_schedule == "cyclic" and cfg.lr == 0.2 and cfg.epochs == 3
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    defaults = TrainConfig()
    assert (defaults.eps, defaults.alpha, defaults.steps, defaults.trades_beta, defaults.mart_beta) == (
        8 / 255, 2 / 255, 10, 6.0, 6.0)
    assert (defaults.warmup_epochs, defaults.eps_low, defaults.rrm_lambda, defaults.sam_rho) == (
        20, 7 / 255, 0.005, 0.05)
    assert (defaults.momentum, defaults.batch_size, defaults.eval_steps) == (0.9, 128, 20)
