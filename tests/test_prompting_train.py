"""fastadv.prompting, training and evaluation: gradients reach only the prompt (and a linear mapping), white-box
attacks leave the prompt region alone, transferred AT never queries the target, schedules and presets,
bf16 / channels_last, checkpoint resume, the evaluation JSON and an end-to-end run on the bundled digits."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from fastadv.attacks import PGD
from fastadv.models import create_model
from fastadv.prompting import (
    LMVPConfig,
    LMVPModel,
    VisualPrompt,
    build_eval_attacks,
    evaluate_lmvp,
    run_lmvp,
    to_train_config,
    train_lmvp,
)
from fastadv.train import SAM, CheckpointError, build_optimizer, load_checkpoint, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread", "restore_method_registry")

N_SOURCE, N_TARGET = 12, 10


def small_cnn(num_classes, seed=0, width=4):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=num_classes, width=width)


def lmvp(geometry="tarp", mapping="linear", seed=0, **kwargs):
    prompt = VisualPrompt(geometry, out_size=32, image_size=16, rescale=24, pad_width=6, generator=seed)
    return LMVPModel(small_cnn(N_SOURCE, seed), prompt, mapping, n_target=N_TARGET, n_source=N_SOURCE, **kwargs)


def data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, N_TARGET, (n,), generator=g)


def tiny_config(**overrides):
    values = {"epochs": 1, "batch_size": 8, "steps": 2, "eval_subset": 16, "mia_subset": 16, "mia_steps": 2,
              "transfer_steps": 2, "eval_batch_size": 16, "sanity_checks": False}
    return LMVPConfig(**{**values, **overrides})


# ------------------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("mapping, optimizer, method", [("linear", "sam", "standard"), ("ilm", "sgd", "pgd_at"),
                                                       ("rlm", "adam", "standard"), ("linear", "sgd", "pgd_at")])
def test_only_the_prompt_and_a_linear_mapping_get_gradients(mapping, optimizer, method):
    model = lmvp(mapping=mapping)
    x, y = data()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.source.named_buffers()}
    # one epoch of one batch: the gradients of that step are still on the parameters afterwards
    history = train_lmvp(model, (x, y), tiny_config(optimizer=optimizer, method=method, batch_size=16))
    assert len(history) == 1 and history[0]["step"] == 1
    assert model.prompt.prompt.grad is not None and model.prompt.prompt.grad.abs().sum() > 0
    for p in model.mapping.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert len(list(model.mapping.parameters())) == (2 if mapping == "linear" else 0)
    for name, p in model.source.named_parameters():
        assert p.grad is None, name
        assert not p.requires_grad, name
        assert torch.equal(p, before[f"source.{name}"]), name
    for name, buf in model.source.named_buffers():  # BatchNorm statistics untouched
        assert torch.equal(buf, buffers[name]), name
    assert not torch.equal(model.prompt.prompt, before["prompt.prompt"])


# ------------------------------------------------------------------------------------------------------------
# white-box attacks perturb the image only


def border(canvas, prompt):
    return canvas[:, :, prompt.border_mask()]


@pytest.mark.parametrize("geometry", ["tarp", "ilm", "pad"])
def test_white_box_attack_never_changes_the_prompt_region(geometry):
    model = lmvp(geometry)
    prompt = model.prompt
    with torch.no_grad():
        prompt.prompt.normal_(generator=torch.Generator().manual_seed(1))
    theta = prompt.prompt.detach().clone()
    x, y = data(8)
    adv = PGD(model, eps=16 / 255, alpha=4 / 255, steps=3, generator=0)(x, y)
    assert (adv - x).abs().max() <= 16 / 255 + 1e-6 and (adv - x).abs().max() > 0
    assert torch.equal(prompt.prompt, theta) and prompt.prompt.grad is None
    with torch.no_grad():
        clean, attacked = model.canvas(x), model.canvas(adv)
    top, left, h, w = prompt.image_box
    assert not torch.equal(clean[:, :, top:top + h, left:left + w], attacked[:, :, top:top + h, left:left + w])
    act = prompt.activated().detach()
    mask = prompt.border_mask()
    if geometry == "pad":
        # Bahng et al.: the image fills the canvas and the prompt is *added* on the frame, so the frame's
        # pixels move with the image; what the prompt contributes there stays exactly theta.
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (prompt.mean, prompt.std))
        for images, canvas in ((x, clean), (adv, attacked)):
            resized = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear")
            contribution = canvas - (resized - mean) / std
            torch.testing.assert_close(contribution[:, :, mask], act[:, mask].expand(8, -1, -1), atol=2e-6, rtol=0)
        return
    assert torch.equal(border(clean, prompt), border(attacked, prompt))  # bit for bit
    if geometry == "ilm":  # the whole canvas is normalised: the border is the normalised sigmoid(theta)
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (prompt.mean, prompt.std))
        expected = (act - mean) / std
    else:  # tarp normalises the image only: the border is tanh(W) itself
        expected = act
    for canvas in (clean, attacked):
        torch.testing.assert_close(canvas[:, :, mask], expected[:, mask].expand(8, -1, -1), atol=2e-6, rtol=0)


def test_white_box_at_crafts_in_pixel_space_before_placement():
    model = lmvp("tarp")
    with torch.no_grad():
        model.prompt.prompt.normal_(generator=torch.Generator().manual_seed(2))
    expected = torch.tanh(model.prompt.prompt.detach())[:, model.prompt.border_mask()]
    canvases = []
    model.source.register_forward_pre_hook(lambda module, args: canvases.append(args[0].detach().clone()))
    x, y = data(8)
    train_lmvp(model, (x, y), tiny_config(method="pgd_at", optimizer="sgd", steps=3))
    # one batch: 3 attack steps and the training forward, all with the prompt as it was before the step
    assert len(canvases) >= 4
    for canvas in canvases[:4]:
        torch.testing.assert_close(border(canvas, model.prompt), expected.expand(8, -1, -1), atol=2e-6, rtol=0)
    images = [c[:, :, 4:28, 4:28] for c in canvases[:4]]
    assert not torch.equal(images[0], images[-1])  # the image region is what the attack moved


# ------------------------------------------------------------------------------------------------------------
# transferred AT never queries the target


def count_backward(module):
    counter = {"backward": 0, "forward": 0}
    module.register_full_backward_hook(lambda *args: counter.__setitem__("backward", counter["backward"] + 1))
    module.register_forward_hook(lambda *args: counter.__setitem__("forward", counter["forward"] + 1))
    return counter


@pytest.mark.parametrize("optimizer, passes", [("sgd", 1), ("sam", 2)])
def test_transferred_at_never_queries_the_target_for_gradients(optimizer, passes):
    x, y = data(16)
    threat = small_cnn(N_TARGET, seed=5)
    steps, batches = 3, 2
    counts = {}
    for method in ("transfer_at", "pgd_at"):
        model = lmvp()
        target = count_backward(model.source)
        crafted = count_backward(threat)
        train_lmvp(model, (x, y), tiny_config(method=method, optimizer=optimizer, steps=steps),
                   threat_model=threat if method == "transfer_at" else None)
        counts[method] = (dict(target), dict(crafted))
        threat._backward_hooks.clear()
        threat._forward_hooks.clear()
        threat._backward_pre_hooks.clear()
    target, crafted = counts["transfer_at"]
    # the target runs only the training passes (forward + backward for the prompt's gradient; no evaluation
    # data was given, so the trainer evaluates nothing) ...
    assert target == {"forward": batches * passes, "backward": batches * passes}
    # ... while every attack step ran on the threat model (+1 forward: the class-count check)
    assert crafted == {"forward": batches * steps + 1, "backward": batches * steps}
    # the same counters see white-box AT query the target at every step
    target, crafted = counts["pgd_at"]
    assert target == {"forward": batches * (steps + passes), "backward": batches * (steps + passes)}
    assert crafted == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("fold_bn", [True, False])
def test_transferred_at_attack_follows_fold_bn(fold_bn):
    from fastadv.prompting.train import model_description
    from fastadv.train import Trainer
    from fastadv.train.methods import METHODS

    x, y = data(16)
    model = lmvp()
    config = to_train_config(tiny_config(method="transfer_at", fold_bn=fold_bn), n_target=model.n_target,
                             eval_subset=0, eval_every=0, model_kwargs=model_description(model))
    method = METHODS[config.method](config, fit_data=(x, y), threat_model=small_cnn(N_TARGET, seed=5))
    trainer = Trainer(config, model=model, train_set=(x, y), method=method)
    try:
        assert trainer.method.attack.fold_bn is fold_bn
    finally:
        trainer.close()
    # train_lmvp applies the config's setting to the model's own source as well
    model = lmvp()
    train_lmvp(model, (x, y), tiny_config(fold_bn=fold_bn))
    assert model.fold_bn is fold_bn


def test_transfer_evaluation_attack_crafts_on_the_threat_model_only():
    model = lmvp()
    threat = small_cnn(N_TARGET, seed=5)
    target = count_backward(model.source)
    attacks = build_eval_attacks(model, tiny_config(eval_attacks=()), threat_model=threat)
    assert list(attacks) == ["transfer_pgd2"]
    x, y = data(8)
    adv = attacks["transfer_pgd2"](x, y)
    assert target == {"forward": 0, "backward": 0}
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6


# ------------------------------------------------------------------------------------------------------------
# optimisation recipes


def test_tarp_vp_defaults_and_schedule():
    config = LMVPConfig.tarp_vp()
    assert (config.geometry, config.rescale, config.mapping) == ("tarp", 192, "linear")
    assert (config.optimizer, config.sam_base, config.sam_rho, config.lr, config.momentum) == ("sam", "sgd", 0.05,
                                                                                              0.05, 0.9)
    assert (config.epochs, config.batch_size, config.lr_step_epochs, config.lr_gamma) == (20, 64, 2, 0.7)
    train_config = to_train_config(config, n_target=10)
    assert (train_config.optimizer, train_config.sam_base, train_config.sam_rho) == ("sam", "sgd", 0.05)
    opt = build_optimizer(train_config, lmvp().trainable_parameters())
    assert isinstance(opt, SAM) and isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9
    # StepLR(2 epochs, x0.7), here with 10 optimiser steps per epoch
    per_epoch = [lr_factor(train_config, 10 * epoch, 200) * config.lr for epoch in range(20)]
    assert per_epoch == pytest.approx([0.05 * 0.7 ** (epoch // 2) for epoch in range(20)])
    assert lr_factor(train_config, 19, 200) == pytest.approx(1.0)  # the last step of epoch 2 (index 1)


def test_ilm_vp_defaults_and_schedule():
    config = LMVPConfig.ilm_vp()
    assert (config.geometry, config.mapping, config.optimizer, config.lr, config.epochs) == ("ilm", "ilm", "adam",
                                                                                           0.01, 200)
    train_config = to_train_config(config, n_target=10)
    assert isinstance(build_optimizer(train_config, lmvp("ilm", "rlm").trainable_parameters()), torch.optim.Adam)
    lrs = [lr_factor(train_config, epoch, 200) * config.lr for epoch in range(200)]
    assert lrs[99] == pytest.approx(0.01) and lrs[100] == pytest.approx(0.001)  # x0.1 at 50 %
    assert lrs[143] == pytest.approx(0.001) and lrs[144] == pytest.approx(0.0001)  # and at 72 %


def test_bf16_channels_last_training_step():
    model = lmvp(channels_last=True)
    x, y = data(8)
    seen = []
    model.source.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    history = train_lmvp(model, (x, y), tiny_config(amp="bf16", optimizer="sam"))
    assert all(c.is_contiguous(memory_format=torch.channels_last) for c in seen)
    assert history[0]["train_loss"] == history[0]["train_loss"]  # finite, not NaN
    assert model.prompt.prompt.dtype == torch.float32
    assert all(p.grad is None for p in model.source.parameters())


@pytest.mark.parametrize("channels_last", [False, None])
def test_training_never_deep_copies_the_source(monkeypatch, channels_last):
    real = copy.deepcopy

    def guarded(obj, *args, **kwargs):
        assert not isinstance(obj, nn.Module), f"deepcopy of a module: {type(obj).__name__}"
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", guarded)
    model = lmvp(mapping="linear")
    params = list(model.source.parameters())
    pointers = [p.data_ptr() for p in params]
    x, y = data(16, seed=3)
    history = train_lmvp(model, (x, y), tiny_config(epochs=2, method="pgd_at", channels_last=channels_last),
                         eval_data=(x, y))
    assert len(history) == 2 and 0 <= history[-1]["nat_acc"] <= 1
    assert model.source is not None and all(a is b for a, b in zip(model.source.parameters(), params, strict=True))
    if channels_last is False:  # the storage itself is untouched
        assert [p.data_ptr() for p in model.source.parameters()] == pointers
    else:  # automatic on the CPU: converted to channels-last in place (the same parameters, restrided)
        assert model.channels_last and params[0].is_contiguous(memory_format=torch.channels_last)


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tmp_path):
    x, y = data(16)
    config = tiny_config(epochs=3, method="pgd_at", optimizer="sam", out_dir=str(tmp_path / "a"))
    full = lmvp(mapping="ilm")
    train_lmvp(full, (x, y), config)

    class Crash(Exception):
        pass

    def crash_after_first(epoch, record):
        if epoch == 0:
            raise Crash

    interrupted = lmvp(mapping="ilm")
    config_b = config.replace(out_dir=str(tmp_path / "b"))
    with pytest.raises(Crash):
        train_lmvp(interrupted, (x, y), config_b, on_epoch_end=crash_after_first)
    resumed = lmvp(mapping="ilm")
    history = train_lmvp(resumed, (x, y), config_b.replace(resume="auto"))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    torch.testing.assert_close(resumed.prompt.prompt, full.prompt.prompt, rtol=0, atol=0)
    assert torch.equal(resumed.mapping.index, full.mapping.index)
    with pytest.raises(CheckpointError, match="differs in model_kwargs"):
        train_lmvp(lmvp("ilm", "ilm"), (x, y), config_b.replace(resume="auto", geometry="ilm"))


def test_checkpoints_leave_the_frozen_source_out_unless_asked(tmp_path):
    x, y = data(16)
    config = tiny_config(epochs=1, out_dir=str(tmp_path / "a"))
    trained = lmvp()
    train_lmvp(trained, (x, y), config)
    state = load_checkpoint(tmp_path / "a" / "last.pt")
    assert not any(k.startswith("source.") for k in state["model"])
    assert set(state["model"]) == {k for k in trained.state_dict() if not k.startswith("source.")}
    assert set(state["frozen"]["fingerprint"]) == {f"source.{k}" for k in small_cnn(N_SOURCE).state_dict()}

    resumed = lmvp()  # the same pre-trained source: the finished run loads
    assert len(train_lmvp(resumed, (x, y), config.replace(resume="auto"))) == 1
    torch.testing.assert_close(resumed.prompt.prompt, trained.prompt.prompt, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"omits the frozen weights \(source\.\)"):
        train_lmvp(LMVPModel(small_cnn(N_SOURCE, seed=9), lmvp().prompt, "linear", n_target=N_TARGET,
                             n_source=N_SOURCE), (x, y), config.replace(resume="auto"))

    train_lmvp(lmvp(), (x, y), config.replace(out_dir=str(tmp_path / "b"), save_source=True))
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert "frozen" not in state and set(state["model"]) == set(trained.state_dict())


# ------------------------------------------------------------------------------------------------------------
# evaluation and a whole run


def test_evaluation_writes_one_json_result(tmp_path):
    model = lmvp()
    threat = small_cnn(N_TARGET, seed=5)
    train, test = data(16, seed=1), data(16, seed=2)
    out = tmp_path / "result.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MIA on a random model: AUC < 0.5 warnings are expected
        result = evaluate_lmvp(model, test, tiny_config(), threat_model=threat, member_data=train, out_path=out)
    on_disk = json.loads(out.read_text())
    assert on_disk["format"] == "fastadv.prompting.result/1"
    assert set(on_disk["accuracy"]) == {"natural", "pgd10", "pgd20", "cw20", "transfer_pgd2"}
    assert on_disk["attacks"]["cw20"]["loss"] == "cw" and on_disk["attacks"]["pgd20"]["steps"] == 20
    for name, entry in on_disk["accuracy"].items():
        assert 0 <= entry["accuracy"] <= 1 and entry["n"] == 16, name
    for inputs in ("natural", "adversarial"):
        mia = on_disk["mia"][inputs]
        assert mia["regime"] == "oracle" and 0.5 <= mia["balanced_accuracy"]["loss"] <= 1
    assert on_disk["mia"]["adversarial"]["attack"]["steps"] == 2
    assert on_disk["mia"]["n_members"] == on_disk["mia"]["n_nonmembers"] == 16
    assert result["accuracy"] == on_disk["accuracy"]


def test_run_on_digits_end_to_end(tmp_path):
    threat = small_cnn(N_TARGET, seed=5)
    path = tmp_path / "threat.pt"
    torch.save(threat.state_dict(), path)
    config = LMVPConfig.tarp_vp(source="fastadv:small_cnn", source_kwargs={"width": 4}, source_classes=N_SOURCE,
                                dataset="digits", dataset_kwargs={"size": 16}, out_size=32, rescale=24,
                                train_subset=48, test_subset=32, epochs=2, batch_size=16, method="transfer_at",
                                steps=2, threat_model="small_cnn", threat_checkpoint=str(path),
                                threat_kwargs={"width": 4}, eval_subset=16, mia_subset=16, mia_steps=1,
                                transfer_steps=2, eval_attacks=("pgd10",), sanity_checks=False,
                                out_dir=str(tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_lmvp(config)
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (tmp_path / "run" / "last.pt").is_file()
    assert [h["epoch"] for h in on_disk["history"]] == [1, 2]
    assert on_disk["config"]["method"] == "transfer_at"
    assert on_disk["model"]["prompt"]["geometry"] == "tarp"
    # tarp normalises with the target training data's statistics
    from fastadv.data import get_dataset

    images = get_dataset("digits", size=16).x[:48].double()
    assert on_disk["model"]["prompt"]["mean"] == pytest.approx(images.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert on_disk["model"]["prompt"]["std"] == pytest.approx(images.std(dim=(0, 2, 3), unbiased=False).tolist(),
                                                              abs=1e-6)
    assert set(on_disk["accuracy"]) == {"natural", "pgd10", "transfer_pgd2"}
    assert result["files"]["result"].endswith("result.json")
