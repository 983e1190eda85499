"""BatchNorm folding (fastadv.models.fold): the folded eval view computes the model's eval-mode
function and input gradients, follows weight updates and module replacement, and steps aside for models it
must not touch (no BatchNorm, hooks, untraceable control flow, batch statistics, a convolution output used
twice)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.attacks import PGD
from fastadv.models import create_model, with_normalization
from fastadv.models.fold import FoldedConv2d, eval_view
from fastadv.train import TrainConfig, Trainer


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.eps = 0.1  # large enough that a fold without it would be visibly wrong
    return model.eval()


def _folded(view: nn.Module) -> int:
    return sum(isinstance(m, FoldedConv2d) for m in view.modules())


def _output_and_input_grad(net: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = net(x)
    (grad,) = torch.autograd.grad(out.logsumexp(1).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("name, kwargs, pairs", [
    ("small_cnn", {"width": 4}, 5),
    ("resnet18", {"width": 4}, 20),
    ("vgg11", {}, 8),
    ("preact_resnet18", {}, 3),  # pre-activation: BatchNorm mostly comes before the convolution
])
def test_view_equals_the_eval_model_in_values_and_input_gradients(name, kwargs, pairs):
    torch.manual_seed(0)
    model = _randomise_bn(with_normalization(create_model(name, num_classes=10, **kwargs), (0.5,) * 3, (0.25,) * 3))
    view = eval_view(model)
    assert view is not model and _folded(view) >= pairs
    x = torch.rand(4, 3, 32, 32)
    out, grad = _output_and_input_grad(model, x)
    out_v, grad_v = _output_and_input_grad(view, x)
    torch.testing.assert_close(out_v, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_v, grad, rtol=1e-3, atol=1e-6)
    # the view shares every other module with the model and owns no parameters of its own
    assert not any(p.requires_grad for m in view.modules() if isinstance(m, FoldedConv2d)
                   for p in (m.weight, m.bias))


def _lmvp_pair(seed: int = 4):
    """Two LM-VP models over one frozen source and one prompt: folding on (the default) and off."""
    from fastadv.prompting import LMVPModel, VisualPrompt

    torch.manual_seed(seed)
    source = _randomise_bn(create_model("small_cnn", num_classes=12, width=4))
    prompt = VisualPrompt("tarp", out_size=32, image_size=16, rescale=24, generator=0)
    folded = LMVPModel(source, prompt, "linear", n_target=10, n_source=12)  # the mapping checks shapes
    plain = LMVPModel(source, prompt, folded.mapping, fold_bn=False)
    return folded.eval(), plain.eval()


def test_lmvp_model_without_fold_bn_is_folded_by_the_attack_through_its_frozen_source_only():
    _, model = _lmvp_pair()
    view = eval_view(model)
    assert view is not model and _folded(view) == 5
    x = torch.rand(3, 3, 16, 16)
    out, grad = _output_and_input_grad(model, x)
    out_v, grad_v = _output_and_input_grad(view, x)
    torch.testing.assert_close(out_v, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_v, grad, rtol=1e-3, atol=1e-6)


def test_lmvp_model_folds_its_source_itself_in_training_and_attacks(monkeypatch):
    folded, plain = _lmvp_pair()
    x = torch.rand(3, 3, 16, 16)
    y = torch.tensor([1, 4, 7])
    # The attack engine calls a self-folding model as it is: no second folded copy of the source.
    assert eval_view(folded) is folded
    calls = []
    real_batch_norm = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or real_batch_norm(*a, **k))
    for mode in ("train", "eval"):  # the wrapper's mode never reaches the frozen source
        getattr(folded, mode)() if mode == "eval" else folded.train()
        getattr(plain, mode)() if mode == "eval" else plain.train()
        calls.clear()
        out, grad = _output_and_input_grad(folded, x)
        assert not calls  # every BatchNorm of the source was folded away
        out_p, grad_p = _output_and_input_grad(plain, x)
        assert len(calls) == 5
        torch.testing.assert_close(out, out_p, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, grad_p, rtol=1e-3, atol=1e-6)
    # the prompt's gradient (what LM-VP training follows) is the same, and the source gets none
    grads = []
    for model in (folded, plain):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        grads.append(model.prompt.prompt.grad.clone())
        assert all(p.grad is None for p in model.source.parameters())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-7)
    adv = [PGD(m, eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)(x, y) for m in (folded, plain)]
    torch.testing.assert_close(adv[0], adv[1], rtol=0, atol=1e-6)


def test_lmvp_fold_follows_new_source_weights_and_layout_and_steps_aside_for_fx():
    folded, plain = _lmvp_pair()
    x = torch.rand(2, 3, 16, 16)
    folded(x)
    state = {k: v * 1.3 if k.endswith(("weight", "running_var")) else v
             for k, v in folded.source.state_dict().items()}
    folded.source.load_state_dict(state)  # in place: copy_ bumps the version counters
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-5)
    folded.source.to(memory_format=torch.channels_last)
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-5)
    # symbolic tracing of the LM-VP model sees the source's own modules (no call into an outside view);
    # the prompt and the mapping check shapes, so they stay leaves
    from fastadv.prompting import LabelMapping, VisualPrompt

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, (VisualPrompt, LabelMapping)) or super().is_leaf_module(m, name)

    traced = torch.fx.GraphModule(folded, Tracer().trace(folded))
    assert any(n.op == "call_module" and n.target.startswith("source.") for n in traced.graph.nodes)
    torch.testing.assert_close(traced(x), plain(x), rtol=1e-4, atol=1e-5)
    # switching folding off rebuilds the attack's view, which then folds through the source itself
    folded.fold_bn = False
    assert _folded(eval_view(folded)) == 5


def test_on_change_refresh_skips_unchanged_weights_and_always_refresh_does_not():
    torch.manual_seed(2)
    model = _randomise_bn(create_model("small_cnn", num_classes=10, width=4))
    x = torch.rand(2, 3, 32, 32)
    eval_view(model)
    conv = model.block1[0]
    conv.weight.data.mul_(2.0)  # through .data: no version bump, so "on_change" cannot see it
    stale = eval_view(model, refresh="on_change")(x)
    assert not torch.allclose(stale, model(x), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(eval_view(model)(x), model(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        conv.weight.mul_(0.5)  # in place on the parameter: seen
    torch.testing.assert_close(eval_view(model, refresh="on_change")(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="refresh"):
        eval_view(model, refresh="sometimes")


def test_lmvp_fold_bn_must_be_a_bool():
    from fastadv.prompting import LMVPConfig, LMVPModel

    with pytest.raises(ValueError, match="fold_bn"):
        LMVPModel(create_model("small_cnn", num_classes=12, width=4), "tarp", "rlm", n_target=10, n_source=12,
                  fold_bn=1)
    with pytest.raises(ValueError, match="fold_bn"):
        LMVPConfig(fold_bn="yes")


def test_view_follows_weight_updates_layout_changes_and_module_replacement():
    torch.manual_seed(1)
    model = _randomise_bn(create_model("small_cnn", num_classes=10, width=4))
    x = torch.rand(3, 3, 32, 32)
    view = eval_view(model)
    with torch.no_grad():
        model.block1[0].weight.mul_(1.5)
        model.block2[1].running_mean.add_(0.2)
    view = eval_view(model)
    torch.testing.assert_close(view(x), model(x), rtol=1e-4, atol=1e-5)

    model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(eval_view(model)(x), model(x), rtol=1e-4, atol=1e-5)

    replacement = _randomise_bn(nn.BatchNorm2d(model.block1[1].num_features), seed=5)
    model.block1[1] = replacement  # e.g. SyncBatchNorm conversion swaps modules: the view is rebuilt
    view = eval_view(model)
    torch.testing.assert_close(view(x), model(x), rtol=1e-4, atol=1e-5)
    assert any(m.bn is replacement for m in view.modules() if isinstance(m, FoldedConv2d))


def test_models_the_view_must_not_touch_are_returned_as_they_are():
    class Counting(nn.Module):  # Python state in forward: must not be traced
        def __init__(self):
            super().__init__()
            self.conv, self.calls = nn.Conv2d(3, 4, 3), 0

        def forward(self, x):
            self.calls += 1
            return self.conv(x).mean((2, 3))

    counting = Counting()
    assert eval_view(counting) is counting and counting.calls == 0

    class Branchy(nn.Module):  # data-dependent control flow: not traceable
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.bn(self.conv(x))
            return h.mean((2, 3)) if h.sum() > 0 else -h.mean((2, 3))

    branchy = Branchy().eval()
    assert eval_view(branchy) is branchy

    class Reused(nn.Module):  # the convolution's output also feeds a residual: folding would change it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            h = self.conv(x)
            return (self.bn(h) + h).mean((2, 3))

    reused = _randomise_bn(Reused())
    assert eval_view(reused) is reused

    batch_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    assert eval_view(batch_stats.eval()) is batch_stats

    hooked = _randomise_bn(create_model("small_cnn", num_classes=10, width=4))
    calls = []
    handle = hooked.register_forward_hook(lambda *args: calls.append(1))
    assert eval_view(hooked) is hooked
    handle.remove()
    assert eval_view(hooked) is not hooked


def test_building_the_view_leaves_the_model_mode_as_it_was():
    model = create_model("small_cnn", num_classes=10, width=4)
    model.train()
    model.block2.eval()
    eval_view(model)
    assert model.training and not model.block2.training and model.block1.training


def test_attacks_with_and_without_folding_agree():
    torch.manual_seed(2)
    model = _randomise_bn(create_model("resnet18", num_classes=10, width=4))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    # L2 steps follow the gradient's direction, not its sign: the two runs stay close throughout
    a = PGD(model, eps=0.5, alpha=0.1, steps=5, norm="l2", random_start=False)(x, y)
    b = PGD(model, eps=0.5, alpha=0.1, steps=5, norm="l2", random_start=False, fold_bn=False)(x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert PGD(model, fold_bn=False).config()["fold_bn"] is False
    assert PGD(model, cuda_graph=True).fold_bn is False  # a captured graph reads the model's own tensors


def test_training_config_switches_folding_off():
    config = TrainConfig(method="pgd_at", model="small_cnn", model_kwargs={"width": 4}, dataset="digits",
                         train_subset=16, eval_subset=0, batch_size=8, epochs=1, steps=1, progress=False,
                         out_dir=None, fold_bn=False)
    trainer = Trainer(config)
    try:
        assert trainer.method.attack.fold_bn is False
    finally:
        trainer.close()
    with pytest.raises(ValueError, match="fold_bn"):
        TrainConfig(fold_bn="no")


@pytest.mark.parametrize("fold_bn", [True, False])
def test_training_config_fold_bn_reaches_the_part_masks(monkeypatch, fold_bn):
    import fastadv.train.methods.part as part

    seen = []
    real = part.part_masks
    monkeypatch.setattr(part, "part_masks", lambda *a, **k: seen.append(k["fold_bn"]) or real(*a, **k))
    config = TrainConfig(method="part", model="small_cnn", model_kwargs={"width": 4}, dataset="digits",
                         train_subset=16, eval_subset=0, batch_size=8, epochs=1, steps=1, progress=False,
                         out_dir=None, fold_bn=fold_bn, warmup_epochs=0)
    trainer = Trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert seen and set(seen) == {fold_bn}


def test_trades_inner_loop_runs_the_folded_view():
    from fastadv.train.methods._inner import ascend, plain_step

    torch.manual_seed(3)
    model = _randomise_bn(create_model("small_cnn", num_classes=10, width=4))
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    objective = lambda logits: F.cross_entropy(logits, y, reduction="sum")  # noqa: E731
    step = plain_step(0.5, 0.1, "l2")
    a = ascend(model, x, torch.zeros_like(x), objective, steps=3, step=step)
    b = ascend(model, x, torch.zeros_like(x), objective, steps=3, step=step, fold_bn=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_half_precision_model_folds_in_float32_and_rounds_once():
    torch.manual_seed(8)
    model = _randomise_bn(create_model("resnet18", num_classes=10, width=8)).to(torch.bfloat16)
    view = eval_view(model)
    pairs = [m for m in view.modules() if isinstance(m, FoldedConv2d)]
    assert pairs and all(m.weight.dtype == torch.bfloat16 for m in pairs)
    for m in pairs:  # the fold of the bf16 parameters in float64, by the formula, rounded once to bf16
        bn = m.bn
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        weight = (m.conv.weight.double() * scale[:, None, None, None]).to(torch.bfloat16)
        bias = (bn.bias.double() - bn.running_mean.double() * scale).to(torch.bfloat16)
        ulp = 2.0 ** -7  # bf16 keeps 8 significant bits: neighbours differ by at most 2^-7 relative
        assert ((m.weight.double() - weight.double()).abs() <= ulp * weight.double().abs()).all()
        assert ((m.bias.double() - bias.double()).abs() <= ulp * bias.double().abs() + 1e-30).all()


def test_lmvp_model_evaluated_under_inference_mode_first_still_trains():
    folded, plain = _lmvp_pair(seed=9)
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():  # the first forward builds the view and its folded weights here
        folded(x)
    folded.train()
    out = folded(x)
    out.logsumexp(1).sum().backward()  # the folded weights are normal tensors: saved for backward
    assert folded.prompt.prompt.grad is not None
    with torch.no_grad():
        folded.source.block1[0].weight.mul_(1.1)
    with torch.inference_mode():  # an in-place refresh under inference mode, then training again
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():  # a network built under inference mode folds as well
        source = _randomise_bn(create_model("small_cnn", num_classes=10, width=4))
        torch.testing.assert_close(eval_view(source, refresh="on_change")(x.repeat(1, 1, 2, 2)),
                                   source(x.repeat(1, 1, 2, 2)), rtol=1e-4, atol=1e-5)


def test_frozen_view_leaves_data_parallel_replicas_alone():
    from fastadv.models.fold import frozen_eval_view

    source = _randomise_bn(create_model("small_cnn", num_classes=10, width=4))
    assert frozen_eval_view(source) is not source
    replica = source._replicate_for_data_parallel()  # what nn.DataParallel makes at every forward
    assert frozen_eval_view(replica) is replica
