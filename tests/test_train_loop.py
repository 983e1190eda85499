"""The training loop: exact resume after a crash (exception mid-epoch, and a process killed with SIGKILL),
checkpoint errors and weights_only loading, atomic writes, logs, Fast AT's catastrophic-overfitting rollback,
SAM and the LR schedules against hand computations, mixed precision / channels_last, and PGD-AT beating
standard training on the digits data."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.data import get_dataset
from fastadv.models import create_model
from fastadv.train import SAM, CheckpointError, TrainConfig, Trainer, atomic_save, load_checkpoint, lr_factor, train
from fastadv.train import checkpoint as checkpoint_module

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits16():
    return get_dataset("digits", size=16), get_dataset("digits", split="test", size=16)


def _cfg(**kw):
    base = dict(model="small_cnn", model_kwargs={"width": 4}, dataset="digits", train_subset=96, eval_subset=32,
                batch_size=16, epochs=2, steps=2, eval_steps=2, progress=False, out_dir=None)
    return TrainConfig(**{**base, **kw})


class Crash(RuntimeError):
    pass


class CrashAfter:
    """Raise from the step hook once ``global_step`` reaches ``k`` (a simulated crash)."""

    def __init__(self, k):
        self.k = k

    def on_step_end(self, trainer):
        if trainer.global_step == self.k:
            raise Crash(f"simulated crash after step {self.k}")


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_same_optimizer(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, value in a["state"][k].items():
            other = b["state"][k][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


# --------------------------------------------------------------------------------------------------
# exact resume


RESUME_CASES = {
    "pgd_at": dict(method="pgd_at"),
    "part_trades+sam": dict(method="part_trades", warmup_epochs=1, cam_every=1, optimizer="sam"),
    "free_at": dict(method="free_at", free_replays=2, epochs=4, schedule="cosine"),
    "fast_at": dict(method="fast_at", schedule="cyclic", lr=0.1, co_batch_size=16, co_steps=2),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_crash_mid_epoch_and_resume_gives_bit_identical_weights(tmp_path, digits16, case):
    train_set, test_set = digits16
    cfg = _cfg(**RESUME_CASES[case], augment=True)  # 6 batches per epoch, 2 epochs
    full = train(cfg.replace(out_dir=str(tmp_path / "full")), train_set=train_set, eval_set=test_set)
    reference = load_checkpoint(tmp_path / "full" / "last.pt")

    crashed = cfg.replace(out_dir=str(tmp_path / "crash"), checkpoint_every_steps=4)
    with pytest.raises(Crash):
        train(crashed, train_set=train_set, eval_set=test_set, callbacks=[CrashAfter(9)])
    midway = load_checkpoint(tmp_path / "crash" / "last.pt")
    assert (midway["epoch"], midway["step_in_epoch"], midway["global_step"]) == (1, 2, 8)  # mid-epoch 2

    resumed = train(crashed.replace(resume="auto"), train_set=train_set, eval_set=test_set)
    assert resumed.resumed_from == tmp_path / "crash" / "last.pt"
    final = load_checkpoint(tmp_path / "crash" / "last.pt")
    _assert_same_state(reference["model"], final["model"])
    _assert_same_optimizer(reference["optimizer"], final["optimizer"])
    assert reference["scheduler"]["last_epoch"] == final["scheduler"]["last_epoch"]
    # The logs agree too (the interrupted epoch's running loss was restored), apart from wall-clock times.
    strip = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in full.history]
    assert strip == [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in resumed.history]
    with open(tmp_path / "crash" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(full.history) + 1))


def test_resume_is_needed_for_identity(tmp_path, digits16):
    """The comparison above can fail: restarting from the checkpoint without the RNG/order state differs."""
    train_set, test_set = digits16
    cfg = _cfg(method="pgd_at", augment=True)
    train(cfg.replace(out_dir=str(tmp_path / "a")), train_set=train_set, eval_set=test_set)
    crashed = cfg.replace(out_dir=str(tmp_path / "b"), checkpoint_every_steps=4)
    with pytest.raises(Crash):
        train(crashed, train_set=train_set, eval_set=test_set, callbacks=[CrashAfter(9)])
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    # Corrupt only the augmentation generator state: the resumed run must then differ.
    state["ranks"][0]["rng"]["augment"] = torch.Generator().manual_seed(1234).get_state()
    atomic_save(state, tmp_path / "b" / "last.pt")
    train(crashed.replace(resume="auto"), train_set=train_set, eval_set=test_set)
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from fastadv.data import get_dataset
    from fastadv.train import TrainConfig, train

    class Kill:
        def on_step_end(self, trainer):
            if trainer.global_step == 9:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(**{cfg!r})
    train(cfg, train_set=get_dataset("digits", size=16), eval_set=get_dataset("digits", split="test", size=16),
          callbacks=[Kill()])
""")


def test_process_killed_with_sigkill_then_resumed_matches_uninterrupted_run(tmp_path, digits16):
    train_set, test_set = digits16
    cfg = _cfg(method="trades", augment=True, checkpoint_every_steps=4, out_dir=str(tmp_path / "killed"))
    values = cfg.to_dict()
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), cfg=values))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not list((tmp_path / "killed").glob("*.tmp"))

    # One thread here as in the killed process (the fixture above): the same reduction order.
    resumed = train(cfg.replace(out_dir=str(tmp_path / "killed"), resume="auto"), train_set=train_set,
                    eval_set=test_set)
    full = train(cfg.replace(out_dir=str(tmp_path / "full")), train_set=train_set, eval_set=test_set)
    assert resumed.resumed_from is not None
    _assert_same_state(load_checkpoint(tmp_path / "full" / "last.pt")["model"],
                       load_checkpoint(tmp_path / "killed" / "last.pt")["model"])
    assert len(resumed.history) == len(full.history) == 2


# --------------------------------------------------------------------------------------------------
# checkpoint files


def _one_run(tmp_path, train_set, test_set, **kw):
    cfg = _cfg(method="standard", epochs=1, out_dir=str(tmp_path / "run"), **kw)
    return cfg, train(cfg, train_set=train_set, eval_set=test_set)


def test_checkpoints_load_with_weights_only_and_hold_the_full_state(tmp_path, digits16):
    train_set, test_set = digits16
    cfg, result = _one_run(tmp_path, train_set, test_set)
    for name in ("last", "best"):
        state = torch.load(tmp_path / "run" / f"{name}.pt", weights_only=True)
        for key in ("model", "optimizer", "scheduler", "scaler", "ranks", "data", "epoch", "step_in_epoch",
                    "global_step", "history", "config", "method"):
            assert key in state
        assert isinstance(state["ranks"][0]["rng"]["global"]["torch"], torch.Tensor)
        assert isinstance(state["data"]["epoch_start"], torch.Tensor)
        assert state["epoch"] == 1 and state["step_in_epoch"] == 0 and state["finished"]
    assert result.best_checkpoint == tmp_path / "run" / "best.pt"
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    # The model weights load into a fresh model with fastadv.models (the "model" entry).
    create_model("small_cnn", 10, width=4, checkpoint_path=tmp_path / "run" / "best.pt")


def test_corrupt_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path, digits16):
    train_set, test_set = digits16
    cfg, _ = _one_run(tmp_path, train_set, test_set)
    good = (tmp_path / "run" / "last.pt").read_bytes()
    bad = tmp_path / "bad.pt"

    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="bad.pt"):
        train(cfg.replace(resume=str(bad)), train_set=train_set, eval_set=test_set)
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(bad)
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(bad)
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="not a fastadv training checkpoint"):
        load_checkpoint(bad)
    torch.save({"format": checkpoint_module.FORMAT, "version": 1, "payload": Crash("object")}, bad)
    with pytest.raises(CheckpointError, match="test_train_loop.Crash.*weights_only=True"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        train(cfg.replace(resume=str(tmp_path / "missing.pt")), train_set=train_set, eval_set=test_set)
    with pytest.raises(CheckpointError, match="batch_size"):
        train(cfg.replace(resume=str(tmp_path / "run" / "last.pt"), batch_size=8, out_dir=str(tmp_path / "x")),
              train_set=train_set, eval_set=test_set)


def test_failed_write_leaves_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"a": torch.ones(2)}, path)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_logs_are_written_as_csv_and_json(tmp_path, digits16):
    train_set, test_set = digits16
    cfg = _cfg(method="standard", epochs=2, out_dir=str(tmp_path / "run"), eval_every=2)
    result = train(cfg, train_set=train_set, eval_set=test_set)
    with open(tmp_path / "run" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["nat_acc"] == "" and float(rows[1]["nat_acc"]) == result.history[1]["nat_acc"]
    document = json.loads((tmp_path / "run" / "log.json").read_text())
    assert document["config"]["method"] == "standard"
    assert [r["epoch"] for r in document["history"]] == [1, 2]
    assert document["best"]["epoch"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == cfg.to_dict()


# --------------------------------------------------------------------------------------------------
# Fast AT: catastrophic overfitting


class WeightsAfterEpoch:
    def __init__(self):
        self.by_epoch = {}

    def on_epoch_end(self, trainer, record):
        self.by_epoch[record["epoch"]] = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _fake_evaluator(accuracies):
    calls = []

    def evaluate(model, x, y):
        calls.append(x.shape[0])
        return accuracies[len(calls) - 1]

    return evaluate, calls


def test_fast_at_detects_injected_collapse_rolls_back_and_stops(tmp_path, digits16):
    train_set, test_set = digits16
    cfg = _cfg(method="fast_at", epochs=4, schedule="cyclic", lr=0.1, co_batch_size=16, eval_steps=0,
               out_dir=str(tmp_path / "run"))
    weights = WeightsAfterEpoch()
    trainer = Trainer(cfg, train_set=train_set, eval_set=test_set, callbacks=[weights])
    trainer.method.evaluator, calls = _fake_evaluator([0.40, 0.45, 0.0, 0.5])
    result = trainer.fit()
    assert calls == [16, 16, 16]  # checked after every epoch on the held-out batch, until the stop
    assert "catastrophic overfitting" in result.stop_reason and "epoch 2" in result.stop_reason
    assert len(result.history) == 3
    assert result.history[-1]["co_detected"] is True and result.history[-1]["rolled_back_to_epoch"] == 2
    _assert_same_state(weights.by_epoch[2], trainer.model.state_dict())  # the last good weights
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["finished"] and "catastrophic" in saved["stop_reason"]
    _assert_same_state(weights.by_epoch[2], saved["model"])
    # A finished run resumes to nothing more.
    again = train(cfg.replace(resume="auto"), train_set=train_set, eval_set=test_set)
    assert len(again.history) == 3 and again.stop_reason == result.stop_reason


def test_fast_at_rollback_mode_continues_and_warn_mode_only_logs(digits16):
    train_set, test_set = digits16
    cfg = _cfg(method="fast_at", epochs=4, co_action="rollback", co_batch_size=16, eval_steps=0)
    trainer = Trainer(cfg, train_set=train_set, eval_set=test_set)
    trainer.method.evaluator, _ = _fake_evaluator([0.4, 0.0, 0.35, 0.4])
    result = trainer.fit()
    assert result.stop_reason is None and len(result.history) == 4
    assert result.history[1]["co_detected"] and result.history[1]["rolled_back_to_epoch"] == 1
    assert trainer.method.rollbacks == 1

    trainer = Trainer(cfg.replace(co_action="warn"), train_set=train_set, eval_set=test_set)
    trainer.method.evaluator, _ = _fake_evaluator([0.4, 0.0, 0.0, 0.0])
    result = trainer.fit()
    assert result.stop_reason is None and result.history[1]["co_detected"]
    assert "rolled_back_to_epoch" not in result.history[1]


# --------------------------------------------------------------------------------------------------
# optimiser and schedules


def test_sam_step_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    w0 = [p.detach().clone() for p in model.parameters()]
    rho, lr = 0.05, 0.1

    def loss_at(params):
        return F.cross_entropy(F.linear(x, params[0], params[1]), y)

    params = [p.clone().requires_grad_(True) for p in w0]
    g1 = torch.autograd.grad(loss_at(params), params)
    norm = torch.sqrt(sum((g * g).sum() for g in g1))
    ascent = [(p + rho * g / norm).detach().requires_grad_(True) for p, g in zip(w0, g1)]
    g2 = torch.autograd.grad(loss_at(ascent), ascent)
    expected = [p - lr * g for p, g in zip(w0, g2)]

    sam = SAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    sam.zero_grad()
    sam.step(closure)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    # A scheduler on the wrapper drives the base optimiser's learning rate; state_dict round-trips.
    sched = torch.optim.lr_scheduler.LambdaLR(sam, lambda step: 0.5)
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    state = sam.state_dict()
    sam.load_state_dict(state)
    sam.zero_grad()
    sam.step(closure)
    sched.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="closure"):
        sam.step()


def test_lr_schedules_per_step():
    total = 100  # 10 epochs x 10 steps
    multistep = TrainConfig(epochs=10, lr=0.1, schedule="multistep", milestones=(5, 8), lr_gamma=0.1)
    assert [lr_factor(multistep, s, total) for s in (0, 49, 50, 79, 80, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    default = TrainConfig(epochs=8, schedule="multistep")
    assert lr_factor(default, 39, 80) == 1 and lr_factor(default, 40, 80) == pytest.approx(0.1)
    assert lr_factor(default, 60, 80) == pytest.approx(0.01)
    cosine = TrainConfig(epochs=10, lr=0.1, schedule="cosine")
    for s in (0, 25, 50, 99):
        assert lr_factor(cosine, s, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * s / total)))
    cyclic = TrainConfig(epochs=10, lr=0.2, schedule="cyclic", cyclic_peak=0.4)
    assert lr_factor(cyclic, 0, total) == pytest.approx(1 / 40)
    assert lr_factor(cyclic, 39, total) == pytest.approx(1.0)
    assert lr_factor(cyclic, 69, total) == pytest.approx(0.5)
    assert lr_factor(cyclic, 99, total) == pytest.approx(0.0)
    warm = TrainConfig(epochs=10, schedule="constant", lr_warmup_epochs=2)
    assert lr_factor(warm, 4, total) == pytest.approx(0.25) and lr_factor(warm, 30, total) == 1
    # "auto": Fast AT's reference schedule is the cyclic one; every other method's is multistep.
    assert TrainConfig(method="fast_at").lr_schedule == "cyclic"
    assert TrainConfig(method="trades").lr_schedule == "multistep"
    assert lr_factor(TrainConfig(method="fast_at", epochs=10), 39, total) == pytest.approx(1.0)


def test_scheduler_steps_once_per_optimizer_step(digits16):
    train_set, test_set = digits16
    trainer = Trainer(_cfg(method="standard", schedule="cosine", lr=0.1, eval_steps=0), train_set=train_set,
                      eval_set=test_set)
    lrs = []
    trainer.callbacks.append(type("Rec", (), {"on_step_end": lambda self, t: lrs.append(t._last_lr)})())
    trainer.fit()
    assert len(lrs) == 12 and trainer.scheduler.last_epoch == 12
    assert lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * s / 12)) for s in range(12)])


# --------------------------------------------------------------------------------------------------
# precision, layout, data sources


def test_fingerprints_ignore_layout_and_catch_a_changed_weight():
    from fastadv.train.checkpoint import fingerprint, fingerprint_mismatch

    torch.manual_seed(0)
    model = create_model("resnet18", width=8)
    saved = fingerprint(model.state_dict())
    model.to(memory_format=torch.channels_last)  # another summation order, the same values
    assert fingerprint_mismatch(saved, fingerprint(model.state_dict())) is None
    with torch.no_grad():
        model.layer3[0].conv1.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint_mismatch(saved, fingerprint(model.state_dict())) == "layer3.0.conv1.weight"
    assert fingerprint_mismatch(saved, fingerprint({})) is not None


def test_channels_last_is_automatic_for_convolutional_models_on_the_cpu(digits16):
    train_set, test_set = digits16
    losses = {}
    for setting, expected in ((None, True), (False, False), (True, True)):
        trainer = Trainer(_cfg(channels_last=setting, epochs=1), train_set=train_set, eval_set=test_set)
        try:
            assert trainer.channels_last is expected
            conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last) is expected
            losses[setting] = trainer.fit().history[-1]["train_loss"]
        finally:
            trainer.close()
    # the layout changes float rounding in the convolutions, not the computation
    assert losses[None] == pytest.approx(losses[False], rel=1e-4) and losses[None] == losses[True]

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))  # no convolution: nothing to gain
    trainer = Trainer(_cfg(epochs=1), model=mlp, train_set=train_set, eval_set=test_set)
    try:
        assert trainer.channels_last is False
    finally:
        trainer.close()
    with pytest.raises(ValueError, match="channels_last"):
        _cfg(channels_last="yes").validate()


def test_bf16_channels_last_and_dataset_inputs_train(tmp_path, digits16):
    train_set, test_set = digits16
    result = train(_cfg(method="trades", amp="bf16", channels_last=True, epochs=1), train_set=train_set,
                   eval_set=test_set)
    assert math.isfinite(result.history[-1]["train_loss"])

    dataset = torch.utils.data.TensorDataset(train_set.x[:64], train_set.y[:64])
    result = train(_cfg(method="part", warmup_epochs=1, cam_every=1, epochs=2, train_subset=None, amp="bf16"),
                   train_set=dataset, eval_set=torch.utils.data.TensorDataset(test_set.x[:16], test_set.y[:16]))
    assert len(result.history) == 2 and result.history[-1]["part_phase"] == "reweighted"


def test_unknown_names_and_impossible_settings_are_clear_errors(digits16):
    train_set, test_set = digits16
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        Trainer(_cfg(model="resnet9000", model_kwargs={}), train_set=train_set, eval_set=test_set)
    with pytest.raises(ValueError, match="TrainConfig.dataset"):
        _cfg(dataset="mnist")
    with pytest.raises(ValueError, match="data_dir"):
        Trainer(_cfg(dataset="cifar10"))
    with pytest.raises(ValueError, match="TrainConfig.batch_size"):
        Trainer(_cfg(batch_size=200, drop_last=True), train_set=train_set, eval_set=test_set)


# --------------------------------------------------------------------------------------------------
# the effect adversarial training exists for


def test_pgd_at_beats_standard_training_under_pgd20(digits16):
    train_set, test_set = digits16
    common = dict(model_kwargs={"width": 16}, train_subset=None, eval_subset=200, batch_size=64, epochs=3,
                  lr=0.05, schedule="cosine", weight_decay=5e-4, augment=False, eval_every=0, eval_steps=20,
                  eval_alpha=2 / 255, steps=3, alpha=2.5 * 8 / 255 / 3)
    standard = train(_cfg(method="standard", **common), train_set=train_set, eval_set=test_set).final
    robust = train(_cfg(method="pgd_at", **common), train_set=train_set, eval_set=test_set).final
    assert standard["nat_acc"] > 0.9 and robust["nat_acc"] > 0.9
    # Measured over seeds 0-2 (eps = 8/255): standard 0.38-0.69, PGD-AT 0.93-0.95 PGD-20 accuracy.
    assert robust["pgd_acc"] > standard["pgd_acc"] + 0.15
    assert robust["pgd_acc"] > 0.8
