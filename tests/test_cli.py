"""End-to-end tests of the ``fastadv`` command line on tiny settings, run as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY_TRAIN = ["--set", "model=small_cnn", "--set", "model_kwargs={width: 8}", "--set", "dataset=digits",
              "--set", "train_subset=256", "--set", "batch_size=64", "--set", "eval_subset=64",
              "--set", "eval_steps=2", "--set", "steps=2", "--set", "lr=0.05", "--set", "augment=false"]


def fastadv(*args, cwd=None, timeout=600, check=True):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "fastadv", *args], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "train"
    fastadv("train", "--out", str(out), "--no-progress", *TINY_TRAIN, "--set", "method=pgd_at", "--set", "epochs=1")
    return out


def test_train_writes_run_folder(trained):
    for name in ("config.json", "metrics.json", "last.pt"):
        assert (trained / name).is_file() and (trained / name).stat().st_size > 0
    config = json.loads((trained / "config.json").read_text())
    assert config["method"] == "pgd_at" and config["model_kwargs"] == {"width": 8}
    metrics = json.loads((trained / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["nat_acc"] <= 1.0


def test_eval_attack_and_mia(trained, tmp_path):
    ckpt = str(trained / "last.pt")
    fastadv("eval", ckpt, "--attacks", "fgsm,pgd5,cw5,apgd-ce", "--steps", "5", "--limit", "64", "--no-progress",
            "--out", str(tmp_path / "eval"))
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(m["per_attack"]) == {"fgsm", "pgd5", "cw5", "apgd-ce"}
    assert m["worst_case"]["accuracy"] <= min(v["accuracy"] for v in m["per_attack"].values()) + 1e-9
    assert (tmp_path / "eval" / "metrics.csv").read_text().startswith("attack,")

    fastadv("attack", ckpt, "--attack", "pgd5", "--limit", "32", "--eps", "0.05", "--transfer-to", ckpt,
            "--out", str(tmp_path / "atk"))
    saved = torch.load(tmp_path / "atk" / "adversarial.pt", weights_only=True)
    assert saved["x_adv"].shape == (32, 3, 32, 32)
    m = json.loads((tmp_path / "atk" / "metrics.json").read_text())
    assert m["max_linf"] <= 0.05 + 1e-6 and m["robust_accuracy"] <= m["clean_accuracy"]
    assert m["target_robust_accuracy"] == pytest.approx(m["robust_accuracy"])  # same model: same result

    fastadv("mia", ckpt, "--members", "64", "--nonmembers", "64", "--adversarial", "--steps", "2",
            "--out", str(tmp_path / "mia"))
    for view in ("natural", "adversarial"):
        report = json.loads((tmp_path / "mia" / view / "mia.json").read_text())
        assert 0.0 <= report["signals"]["confidence"]["auc"] <= 1.0
        assert report["signals"]["confidence"]["regime"] == "oracle"
        assert (tmp_path / "mia" / view / "roc_loglog.png").stat().st_size > 0


def test_train_resumes_after_kill(tmp_path):
    """A run killed mid-training resumes from its last checkpoint and ends like an uninterrupted run."""
    # 48 steps, killed after the 5th: long enough that the kill lands mid-run even on a fast machine
    args = [*TINY_TRAIN, "--set", "method=standard", "--set", "epochs=3", "--set", "checkpoint_every_steps=1",
            "--set", "train_subset=512", "--set", "batch_size=32", "--set", "eval_steps=0", "--no-progress"]
    ref = tmp_path / "ref"
    fastadv("train", "--out", str(ref), *args)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "fastadv", "train", "--out", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        last = out / "last.pt"
        if last.is_file():
            state = torch.load(last, weights_only=True)
            if state["global_step"] >= 5:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads((out / "config.json").read_text()).get("resume")
    r = fastadv("train", "--out", str(out), "--resume", "--no-progress")
    assert "trained standard" in r.stdout
    a = torch.load(ref / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_demo_quick_outputs(tmp_path):
    """The reduced demo: robust models beat the standard one under PGD; report, plots and JSON are there."""
    out = tmp_path / "demo"
    r = fastadv("demo", "--quick", "--no-progress", "--out", str(out))
    assert "report:" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    models = metrics["models"]
    pgd = next(k for k in models["standard"] if k.startswith("PGD-"))
    assert models["pgd_at"][pgd] > models["standard"][pgd] + 0.1
    assert models["part"][pgd] > models["standard"][pgd] + 0.1
    for m in models.values():
        assert 0 <= m["mia"]["natural"]["auc"] <= 1 and 0 <= m["mia"]["adversarial"]["auc"] <= 1
    assert metrics["lmvp"]["natural_accuracy"] > metrics["lmvp"]["source_accuracy_without_prompt"]
    report = (out / "report.md").read_text()
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(images) >= 6
    for rel in images:
        png = out / rel
        assert png.is_file() and png.stat().st_size > 1000, rel
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "metrics.csv").stat().st_size > 0


def test_info_and_bench(tmp_path):
    r = fastadv("info", "--json")
    info = json.loads(r.stdout)
    assert info["torch"] == torch.__version__ and "native_devices" in info
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ops.json"
    fastadv("bench", "ops", "--out", str(out), "--no-compile", "--sizes", "cifar", "--ops", "linf_step",
            "--min-run-time", "0.05", cwd=root)
    result = json.loads(out.read_text())
    assert result["results"][0]["op"] == "linf_step" and result["results"][0]["speedup_vs_eager"] > 0


BAD = [
    (["frobnicate"], "invalid choice"),
    (["train", "--no-such-option"], "unrecognized arguments"),
    (["train", "--set", "no_such_key=1"], "unknown train config key"),
    (["train", "--set", "epochs=three"], "epochs"),
    (["train", "--set", "method=telepathy"], "method"),
    (["train", "--set", "dataset=cifar10", "--set", "data_dir=/no/such/dir"], "data_dir"),
    (["train", "--config", "/no/such/config.yaml"], "does not exist"),
    (["eval", "/no/such/checkpoint.pt"], "does not exist"),
    (["eval", "CKPT", "--attacks", "laser"], "unknown attack"),
    (["demo", "--set", "epochs=-3"], None),
    (["demo", "--set", "colour=blue"], "unknown demo config key"),
    (["demo", "--dataset", "cifar10", "--data-dir", "/no/such/dir"], "data-dir"),
    (["bench", "nothing"], "invalid choice"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(args, needle, trained, tmp_path):
    args = [str(trained / "last.pt") if a == "CKPT" else a for a in args]
    r = fastadv(*args, check=False, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, r.stderr
    if needle:
        assert needle in r.stderr, r.stderr
    if args[0] == "train":  # a rejected run leaves nothing half-written behind
        assert not (tmp_path / "fastadv-runs").exists()


def test_bad_config_file_types(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("- just\n- a list\n")
    r = fastadv("train", "--config", str(cfg), check=False, cwd=tmp_path)
    assert r.returncode == 2 and "mapping" in r.stderr
    cfg.write_text("epochs: [1, 2\n")
    r = fastadv("train", "--config", str(cfg), check=False, cwd=tmp_path)
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"batch_size": "large"}))
    r = fastadv("train", "--config", str(cfg), check=False, cwd=tmp_path)
    assert r.returncode == 2 and "batch_size" in r.stderr


def test_help_explains_every_subcommand():
    r = fastadv("--help")
    for cmd in ("demo", "train", "eval", "attack", "mia", "bench", "info"):
        assert cmd in r.stdout
        sub = fastadv(cmd, "--help")
        assert "usage: fastadv" in sub.stdout and "--" in sub.stdout
