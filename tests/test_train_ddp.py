"""Two-process DDP on the gloo backend (spawned with torch.multiprocessing) against one process with the same
global batch: SGD without momentum, no augmentation, the same data order and a BatchNorm-free model, so the
two runs compute the same mean gradient every step. Also: sharded evaluation summed over the ranks, rank-0
checkpoints holding every rank's state, a method with two forward passes per step (TRADES) under DDP, and a
two-process run crashed mid-epoch and resumed ending bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fastadv.models.base import FeatureModel
from fastadv.train import TrainConfig, load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
PER_RANK_BATCH = 16


class NoBatchNorm(FeatureModel):
    """Per-sample computation only (no BatchNorm), so sharding a batch does not change any output."""

    cam_layer_name = "conv2"

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.feature_dim = 32
        self.head = nn.Linear(32, num_classes)

    def features(self, x):
        return torch.flatten(self.pool(self.conv2(self.conv1(x))), 1)


def _seeded_model() -> NoBatchNorm:
    torch.manual_seed(0)
    return NoBatchNorm()


def _data():
    from fastadv.data import get_dataset

    train_set = get_dataset("digits", size=16)
    test_set = get_dataset("digits", split="test", size=16)
    return train_set.x[:128], train_set.y[:128], test_set.x[:50], test_set.y[:50]


def _config(out_dir: str, batch_size: int, **kw) -> TrainConfig:
    values = dict(method="standard", model="small_cnn", dataset="digits", batch_size=batch_size, epochs=2,
                  lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", augment=False, eval_steps=0,
                  eval_batch_size=8, progress=False, out_dir=out_dir, seed=3)
    values.update(kw)
    return TrainConfig(**values)


class _Crash(RuntimeError):
    pass


class _CrashAfter:
    """Every rank raises after the same step: a crash that leaves the last step checkpoint behind."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_step_end(self, trainer) -> None:
        if trainer.global_step == self.k:
            raise _Crash(f"simulated crash after step {self.k}")


RESUME_CASES = {
    "part_trades": dict(method="part_trades", warmup_epochs=1, cam_every=1, steps=2),
    "free_at": dict(method="free_at", free_replays=2, epochs=4),
}


def _resume_config(out_dir: str, case: str, **kw) -> TrainConfig:
    values = dict(model="small_cnn", model_kwargs={"width": 4}, dataset="digits", batch_size=PER_RANK_BATCH,
                  epochs=2, augment=True, eval_steps=2, progress=False, out_dir=out_dir, checkpoint_every_steps=2)
    values.update(RESUME_CASES[case])
    values.update(kw)
    return TrainConfig(**values)


def _worker(rank: int, rendezvous: str, out_dir: str, data) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    # Started here, so the trainers below join this group and leave it running for the next run. A file
    # rendezvous, not a TCP port: a port picked free by the parent can be taken before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        x, y, xt, yt = data
        result = train(_config(out_dir + "/standard", PER_RANK_BATCH), model=_seeded_model(), train_set=(x, y),
                       eval_set=(xt, yt))
        # Two forward passes of the DDP module per backward pass.
        trades = train(_config(out_dir + "/trades", PER_RANK_BATCH, method="trades", epochs=1, steps=2,
                               eval_steps=2), model=_seeded_model(), train_set=(x, y), eval_set=(xt, yt))
        # Exact resume under DDP (small_cnn has BatchNorm, whose statistics differ between the ranks).
        for case in RESUME_CASES:
            train(_resume_config(f"{out_dir}/{case}-full", case), train_set=(x, y), eval_set=(xt, yt))
            crashed = _resume_config(f"{out_dir}/{case}-crash", case)
            try:
                train(crashed, train_set=(x, y), eval_set=(xt, yt), callbacks=[_CrashAfter(5)])
            except _Crash:
                pass
            train(crashed.replace(resume="auto"), train_set=(x, y), eval_set=(xt, yt))
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump({"history": result.history, "trades": trades.history,
                       "files": sorted(os.listdir(out_dir + "/standard"))}, handle)
    finally:
        dist.destroy_process_group()


def _spawn(out_dir: Path, data, timeout: float = 150.0) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rendezvous = out_dir / "rendezvous"
    context = mp.start_processes(_worker, args=(str(rendezvous), str(out_dir), data), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail("the DDP workers did not finish in time")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_ddp_matches_single_process_with_same_global_batch(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    data = _data()
    _spawn(tmp_path / "ddp", data)

    x, y, xt, yt = data
    single = train(_config(str(tmp_path / "single"), WORLD * PER_RANK_BATCH), model=_seeded_model(),
                   train_set=(x, y), eval_set=(xt, yt))
    ddp_state = load_checkpoint(tmp_path / "ddp" / "standard" / "last.pt")
    single_state = load_checkpoint(tmp_path / "single" / "last.pt")
    assert ddp_state["world_size"] == WORLD and len(ddp_state["ranks"]) == WORLD
    assert ddp_state["global_step"] == single_state["global_step"] == 2 * 128 // (WORLD * PER_RANK_BATCH)
    initial = _seeded_model()
    moved = 0.0
    for key, value in single_state["model"].items():
        torch.testing.assert_close(ddp_state["model"][key], value, rtol=1e-4, atol=2e-6, msg=key)
    for key, value in initial.state_dict().items():
        moved = max(moved, (single_state["model"][key] - value).abs().max().item())
    assert moved > 1e-3  # the runs did train, so matching weights is not trivial

    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank in ranks:
        for ours, ref in zip(rank["history"], single.history):
            # Evaluation is sharded (25 examples per rank) and summed: the same accuracy as one process.
            assert ours["nat_acc"] == pytest.approx(ref["nat_acc"], abs=1e-12)
            assert ours["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
        assert len(rank["trades"]) == 1 and math.isfinite(rank["trades"][0]["train_loss"])
    # Every rank logs the same (all-reduced) figures; only rank 0 writes them.
    timeless = [[{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rank["history"]] for rank in ranks]
    assert timeless[0] == timeless[1]
    assert "last.pt" in ranks[0]["files"] and "log.csv" in ranks[0]["files"]

    # A two-process run that crashed mid-epoch and resumed from its step checkpoint ends bit-identical to an
    # uninterrupted one (every rank restores its own RNG states, BatchNorm buffers and running sums).
    for case in RESUME_CASES:
        full = load_checkpoint(tmp_path / "ddp" / f"{case}-full" / "last.pt")
        resumed = load_checkpoint(tmp_path / "ddp" / f"{case}-crash" / "last.pt")
        assert resumed["global_step"] == full["global_step"] and resumed["finished"]
        for key, value in full["model"].items():
            assert torch.equal(resumed["model"][key], value), (case, key)
        for a, b in zip(full["ranks"], resumed["ranks"]):
            for key, value in a["buffers"].items():
                assert torch.equal(b["buffers"][key], value), (case, key)
        timeless = [[{k: v for k, v in r.items() if k != "epoch_time_s"} for r in run["history"]]
                    for run in (full, resumed)]
        assert timeless[0] == timeless[1]
