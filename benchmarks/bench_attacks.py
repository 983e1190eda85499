"""Whole-attack benchmarks: fastadv's PGD-10, PGD-20 and APGD-CE (100 iterations) against a textbook eager
PyTorch PGD loop and against torchattacks 3.5.1, on the same model, data and settings, in one run.

    python -m benchmarks.bench_attacks --out benchmarks/results/attacks_cpu.json     # JSON runner
    python -m pytest benchmarks/bench_attacks.py --benchmark-enable                   # pytest-benchmark suite

The runner trains ``fastadv.models.small_cnn`` for a few epochs on scikit-learn's bundled digits (8×8 scans
upsampled to 3×32×32; nothing is downloaded) so that robust accuracies are not trivially 0 or 100 %, then
attacks test batches with every method, interleaving the methods batch by batch so that a noisy shared
machine slows them alike. Throughput is images per second from the median per-batch wall time; robust
accuracies are reported side by side. Runs without a random start must agree exactly (same algorithm);
with one, the random numbers differ between libraries (torchattacks draws from the global RNG, which the
runner seeds), so the accuracies agree up to sampling noise.

torchattacks is a benchmark-only dependency: ``pip install torchattacks==3.5.1 --no-deps``. When it does
not import, the JSON records why and the other columns are still measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks._common import add_threads_option, apply_threads, cpu_name, write_report
from fastadv.attacks import APGD, PGD, AutoAttack
from fastadv.models import small_cnn

EPS, ALPHA = 8 / 255, 2 / 255

try:
    import torchattacks

    TORCHATTACKS_ERROR = None
except Exception as exc:  # noqa: BLE001 — any import failure is recorded, not fatal
    torchattacks = None
    TORCHATTACKS_ERROR = f"{type(exc).__name__}: {exc}"


# --- the textbook eager loop ------------------------------------------------------------------------------


def eager_pgd(model, x, y, *, eps=EPS, alpha=ALPHA, steps=10, random_start=True, generator=None):
    """PGD as most codebases write it: ``autograd.grad`` w.r.t. the input, then the 6–8 eager tensor ops
    (sign step, projection onto the ε-ball, clip to [0, 1]). The model is in eval mode; its parameters keep
    ``requires_grad`` as they are."""
    x_adv = x.clone()
    if random_start:
        x_adv = (x_adv + torch.empty_like(x).uniform_(-eps, eps, generator=generator)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def eager_pgd_frozen(model, x, y, **kw):
    """The same loop with the parameters frozen for the attack (what fastadv's engine does), which isolates
    the fused step's share of the speed-up from the input-only backward pass's."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        return eager_pgd(model, x, y, **kw)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


# --- the model and data -----------------------------------------------------------------------------------


def trained_model(epochs: int = 4, seed: int = 0):
    """``small_cnn`` with standard training (Adam, lr 2e-3, batch 64) on the digits training split."""
    from fastadv.data.datasets import digits

    torch.manual_seed(seed)
    train = digits("train")
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def eval_batches(n: int, batch: int):
    from fastadv.data.datasets import digits

    test = digits("test")
    n = min(n, len(test))
    return [(test.x[i:i + batch], test.y[i:i + batch]) for i in range(0, n - n % batch or n, batch)]


# --- the methods ------------------------------------------------------------------------------------------


def methods_for(model, steps: int, seed: int, random_start: bool, variants: bool = True) -> dict:
    """name -> callable(x, y) for one PGD setting. Every method draws its random start from a generator
    seeded with ``seed`` (torchattacks from the global RNG, seeded the same): the starts coincide.
    ``variants`` adds fastadv in the contiguous layout and in bf16, and the eager loop with frozen
    parameters."""
    kw = dict(eps=EPS, alpha=ALPHA, steps=steps, random_start=random_start)
    out = {"fastadv": lambda x, y: PGD(model, generator=seed, **kw)(x, y)}
    if variants:
        out["fastadv_contiguous"] = lambda x, y: PGD(model, generator=seed, channels_last=False, **kw)(x, y)
        out["fastadv_bf16"] = lambda x, y: PGD(model, generator=seed, amp="bf16", **kw)(x, y)
    out["eager"] = lambda x, y: eager_pgd(model, x, y, steps=steps, random_start=random_start,
                                          generator=torch.Generator().manual_seed(seed))
    if variants:
        out["eager_frozen_params"] = lambda x, y: eager_pgd_frozen(
            model, x, y, steps=steps, random_start=random_start, generator=torch.Generator().manual_seed(seed))
    if torchattacks is not None:
        def ta(x, y):
            torch.manual_seed(seed)   # torchattacks draws its random start from the global RNG
            return torchattacks.PGD(model, **kw)(x, y)
        out["torchattacks"] = ta
    return out


def apgd_methods(model, seed: int) -> dict:
    out = {"fastadv": lambda x, y: APGD(model, eps=EPS, steps=100, loss="ce", restarts=1, generator=seed)(x, y)}
    if torchattacks is not None:
        def ta(x, y):
            torch.manual_seed(seed)
            return torchattacks.APGD(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss="ce", seed=seed)(x, y)
        out["torchattacks"] = ta
    return out


def run_side_by_side(model, methods: dict, batches) -> dict:
    """Every method on every batch, interleaved. Each call is timed twice: wall clock and the process's CPU
    time. With one torch thread the CPU time is the work the attack did, nearly independent of the other
    processes on a shared machine, so throughput (``images_per_s``) and the ratios use the median CPU time
    per batch; the wall-clock figures are reported beside them."""
    wall = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    correct = {name: 0 for name in methods}
    total = 0
    for x, y in batches:
        total += len(y)
        for name, fn in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            adv = fn(x, y)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
            with torch.no_grad():
                correct[name] += int((model(adv).argmax(1) == y).sum())
    out = {}
    size = len(batches[0][1])
    for name in methods:
        c_med, w_med = statistics.median(cpu[name]), statistics.median(wall[name])
        out[name] = {"images_per_s": size / c_med, "median_batch_cpu_s": c_med, "median_batch_wall_s": w_med,
                     "wall_images_per_s": size / w_med, "batch_cpu_s": cpu[name], "batch_wall_s": wall[name],
                     "robust_accuracy": correct[name] / total, "n": total}
    return out


def add_ratios(result: dict) -> None:
    """Each non-fastadv row gets fastadv's (default fp32) speed-up and accuracy gap over it; each fastadv
    variant gets its speed-up over torchattacks."""
    fa = result.get("fastadv")
    ta = result.get("torchattacks")
    for name, row in result.items():
        if not name.startswith("fastadv") and fa:
            row["fastadv_speedup"] = fa["images_per_s"] / row["images_per_s"]
            row["accuracy_gap_points"] = 100 * (fa["robust_accuracy"] - row["robust_accuracy"])
        if name.startswith("fastadv") and ta:
            row["speedup_vs_torchattacks"] = row["images_per_s"] / ta["images_per_s"]
            row["accuracy_gap_vs_torchattacks_points"] = 100 * (row["robust_accuracy"] - ta["robust_accuracy"])




def _summary(rows: dict) -> str:
    keep = ("images_per_s", "robust_accuracy", "speedup_vs_torchattacks", "fastadv_speedup")
    return json.dumps({k: {m: round(v, 3) for m, v in r.items() if m in keep} for k, r in rows.items()})


def warm_up(model, x, y) -> None:
    """Load kernels and allocator pools once, outside the timings."""
    PGD(model, steps=1, generator=0)(x[:8], y[:8])
    PGD(model, steps=1, generator=0, amp="bf16", channels_last=True)(x[:8], y[:8])
    eager_pgd(model, x[:8], y[:8], steps=1)
    if torchattacks is not None:
        torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=1)(x[:8], y[:8])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the JSON report here")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=256, help="test images for the PGD rows")
    ap.add_argument("--apgd-batches", type=int, default=1, help="batches for the APGD-CE row (slow)")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs of the benchmark model")
    add_threads_option(ap)
    ap.add_argument("--autoattack", action="store_true",
                    help="also time AutoAttack-standard (minutes on a CPU) on the first --aa-n test images")
    ap.add_argument("--aa-n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    apply_threads(args)

    t_start = time.perf_counter()
    model = trained_model(args.epochs, args.seed)
    batches = eval_batches(args.n_eval, args.batch)
    x0, y0 = batches[0]
    with torch.no_grad():
        clean = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)
    warm_up(model, x0, y0)

    report = {
        "benchmark": "whole attacks, CPU",
        "device": cpu_name(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fastadv_native_ops": __import__("fastadv.ops", fromlist=["has_native"]).has_native("cpu"),
        "torchattacks": getattr(torchattacks, "__version__", None),
        "torchattacks_error": TORCHATTACKS_ERROR,
        "model": f"fastadv.models.small_cnn (width 32), {args.epochs} epochs standard training (Adam) on sklearn "
                 "digits 3x32x32",
        "data": "sklearn digits test split, upsampled to 3x32x32",
        "batch_size": args.batch,
        "eps": EPS,
        "alpha": ALPHA,
        "clean_accuracy": clean,
        "results": {},
        "notes": [
            "AutoAttack-standard is timed only with --autoattack (it takes minutes on this CPU). torchattacks' "
            "AutoAttack(version='standard') builds APGD, APGD-T and FAB with their 10-step defaults, not the "
            "paper's 100; fastadv runs 100.",
            "'fastadv' is the default configuration (fp32; channels-last inputs, automatic on the CPU for conv "
            "models; eval-mode BatchNorm folded into the convolutions, fold_bn=True); 'fastadv_contiguous' forces "
            "the NCHW layout; 'fastadv_bf16' adds amp='bf16'.",
            "'eager' keeps the model's parameters trainable as most codebases do; 'eager_frozen_params' "
            "freezes them, isolating what the fused step adds.",
            "images_per_s = batch size / median CPU time per batch (one torch thread: CPU time is the attack's "
            "own work, robust to the other processes on this shared machine); wall_images_per_s uses the "
            "median wall time.",
        ],
    }
    for name, steps, random_start, variants in (("pgd10", 10, True, True), ("pgd10_no_random_start", 10, False, False),
                                                ("pgd20", 20, True, False)):
        methods = methods_for(model, steps, args.seed, random_start, variants)
        if name == "pgd20":
            methods["fastadv_bf16"] = methods_for(model, steps, args.seed, random_start, True)["fastadv_bf16"]
        rows = run_side_by_side(model, methods, batches)
        add_ratios(rows)
        report["results"][name] = rows
        print(name, _summary(rows), flush=True)
    rows = run_side_by_side(model, apgd_methods(model, args.seed), batches[:args.apgd_batches])
    add_ratios(rows)
    report["results"]["apgd_ce_100"] = rows
    print("apgd_ce_100", _summary(rows), flush=True)
    if args.autoattack:
        xa, ya = x0[:args.aa_n], y0[:args.aa_n]
        aa = {"fastadv": lambda x, y: AutoAttack(model, norm="linf", eps=EPS, version="standard",
                                                 generator=args.seed)(x, y)}
        if torchattacks is not None:
            aa["torchattacks"] = lambda x, y: torchattacks.AutoAttack(model, norm="Linf", eps=EPS,
                                                                      version="standard", n_classes=10,
                                                                      seed=args.seed)(x, y)
        rows = run_side_by_side(model, aa, [(xa, ya)])
        add_ratios(rows)
        report["results"]["autoattack_standard"] = rows
        print("autoattack_standard", _summary(rows), flush=True)

    res = report["results"]
    if "torchattacks" in res["pgd10"]:
        speed = {v: min(res[k][v]["speedup_vs_torchattacks"] for k in ("pgd10", "pgd20"))
                 for v in ("fastadv", "fastadv_bf16")}
        speed["fastadv_contiguous"] = res["pgd10"]["fastadv_contiguous"]["speedup_vs_torchattacks"]
        report["goals"] = {
            "pgd_accuracy_within_0.5_points_of_torchattacks": all(
                abs(res[k]["torchattacks"]["accuracy_gap_points"]) <= 0.5
                for k in ("pgd10", "pgd20", "pgd10_no_random_start")),
            "min_pgd_speedup_vs_torchattacks": speed,
            "cpu_fp32_speedup_at_least_1.1": speed["fastadv"] >= 1.1,
        }
    report["wall_s"] = time.perf_counter() - t_start
    write_report(report, args.out)
    return 0


# --- pytest-benchmark suite (untrained model, small batch: quick) ----------------------------------------


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.rand(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    return model, x, y


def test_bench_pgd10_fastadv(benchmark, setup):
    model, x, y = setup
    benchmark(lambda: PGD(model, steps=10, generator=0)(x, y))


def test_bench_pgd10_eager(benchmark, setup):
    model, x, y = setup
    benchmark(lambda: eager_pgd(model, x, y, steps=10, generator=torch.Generator().manual_seed(0)))


def test_bench_pgd10_torchattacks(benchmark, setup):
    if torchattacks is None:
        pytest.skip(f"torchattacks does not import: {TORCHATTACKS_ERROR}")
    model, x, y = setup
    benchmark(lambda: torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=10)(x, y))


def test_bench_pgd20_fastadv(benchmark, setup):
    model, x, y = setup
    benchmark(lambda: PGD(model, steps=20, generator=0)(x, y))


def test_bench_apgd_ce_fastadv(benchmark, setup):
    model, x, y = setup
    benchmark.pedantic(lambda: APGD(model, steps=100, generator=0)(x, y), rounds=1, iterations=1)


def test_bench_apgd_ce_torchattacks(benchmark, setup):
    if torchattacks is None:
        pytest.skip(f"torchattacks does not import: {TORCHATTACKS_ERROR}")
    model, x, y = setup
    benchmark.pedantic(lambda: torchattacks.APGD(model, eps=EPS, steps=100, loss="ce")(x, y), rounds=1,
                       iterations=1)


if __name__ == "__main__":
    raise SystemExit(main())
