"""Benchmarks of the membership-inference engine (fastadv.privacy).

Two ways to run:

* ``pytest benchmarks/bench_privacy.py`` — a pytest-benchmark suite (``test_bench_*``), small sizes.
* ``python -m benchmarks.bench_privacy --out benchmarks/results/privacy_cpu.json`` — the side-by-side
  comparison written as JSON:

  1. ``roc_metrics`` (one sort, exact with ties) against the threshold loop of the reference tools
     (Privacy Meter / TARP-VP style: for every distinct score ``t``, a vectorised numpy comparison of all
     member and non-member scores with ``t``; O(n) per threshold, O(n²) in all), at 10k/10k and 50k/10k.
     If the full loop is predicted to take longer than ``--max-loop-seconds`` it is timed on a prefix of
     the thresholds and extrapolated linearly (each iteration costs the same); the JSON says so.
     ``sklearn.metrics.roc_curve`` (also one sort, but numpy on the host) is timed too, for context.
  2. RMIA sort + ``searchsorted`` against the dense |X|×|Z| likelihood-ratio matrix at 20k × 20k: time and
     peak memory, measured two ways (``tracemalloc`` would miss torch's CPU allocations):
     (a) the peak of bytes held in torch's CPU allocator during one call, from the allocation events of
     ``torch.profiler`` with ``profile_memory=True`` (each carries the allocator's running total); and
     (b) the growth of the process's peak resident set (``VmHWM`` in ``/proc/self/status``) during the
     call, after resetting the peak with ``/proc/self/clear_refs`` (Linux ≥ 4.0), or in a fresh subprocess
     where that reset is not possible. (b) has page granularity: the sort path's few small tensors reuse
     memory the process already holds, so it reads ~0 there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import torch

from benchmarks._common import add_threads_option, apply_threads, cpu_name, write_report
from fastadv.privacy import rmia_scores, roc_metrics

LEVELS = (0.01, 0.001)


# ------------------------------------------------------------------------------------------ references


def reference_threshold_loop(member: np.ndarray, nonmember: np.ndarray, thresholds: np.ndarray | None = None):
    """The reference tools' approach: one pass over all scores per distinct threshold (O(n²))."""
    if thresholds is None:
        thresholds = np.unique(np.concatenate([member, nonmember]))[::-1]
    tpr = np.empty(thresholds.size)
    fpr = np.empty(thresholds.size)
    for i, t in enumerate(thresholds):
        tpr[i] = np.mean(member >= t)
        fpr[i] = np.mean(nonmember >= t)
    tpr = np.concatenate([[0.0], tpr])
    fpr = np.concatenate([[0.0], fpr])
    out = {
        "auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)),
        "balanced_accuracy": float(np.max(0.5 * (tpr + 1.0 - fpr))),
        "advantage": float(np.max(tpr - fpr)),
    }
    for level in LEVELS:
        out[f"tpr_at_fpr_{level:g}"] = float(np.max(tpr[fpr <= level]))
    return out


def sklearn_roc(member: np.ndarray, nonmember: np.ndarray):
    from sklearn.metrics import roc_curve as sk_roc_curve

    scores = np.concatenate([member, nonmember])
    labels = np.concatenate([np.ones(member.size), np.zeros(nonmember.size)])
    fpr, tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auc": float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr)),
        "balanced_accuracy": float(np.max(0.5 * (tpr + 1.0 - fpr))),
    }


# ---------------------------------------------------------------------------------------------- timing


def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _scores(n1: int, n0: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    member = torch.randn(n1, generator=g, dtype=dtype) + 0.5
    nonmember = torch.randn(n0, generator=g, dtype=dtype)
    return member, nonmember


def bench_roc(n1: int, n0: int, max_loop_seconds: float, repeats: int) -> dict:
    member, nonmember = _scores(n1, n0)
    m_np, n_np = member.numpy().astype(np.float64), nonmember.numpy().astype(np.float64)
    fast_median, fast_times = _median_time(lambda: roc_metrics(member, nonmember, fpr=LEVELS), repeats=repeats)
    fast = roc_metrics(member, nonmember, fpr=LEVELS)

    thresholds = np.unique(np.concatenate([m_np, n_np]))[::-1]
    probe = thresholds[: min(thresholds.size, 500)]
    probe_time, _ = _median_time(lambda: reference_threshold_loop(m_np, n_np, probe), repeats=1, warmup=0)
    predicted = probe_time * thresholds.size / probe.size
    if predicted <= max_loop_seconds:
        loop_repeats = 3 if predicted * 3 <= max_loop_seconds else 1
        loop_median, loop_times = _median_time(
            lambda: reference_threshold_loop(m_np, n_np, thresholds), repeats=loop_repeats, warmup=0
        )
        extrapolated, timed_thresholds = False, int(thresholds.size)
    else:
        subset = thresholds[: max(1, int(thresholds.size * max_loop_seconds / predicted / 2))]
        sub_median, loop_times = _median_time(lambda: reference_threshold_loop(m_np, n_np, subset), repeats=1, warmup=0)
        loop_median = sub_median * thresholds.size / subset.size
        extrapolated, timed_thresholds = True, int(subset.size)
    reference = reference_threshold_loop(m_np, n_np, thresholds) if not extrapolated else None

    sk_median, _ = _median_time(lambda: sklearn_roc(m_np, n_np), repeats=repeats)
    sk = sklearn_roc(m_np, n_np)
    entry = {
        "n_members": n1,
        "n_nonmembers": n0,
        "n_distinct_thresholds": int(thresholds.size),
        "roc_metrics_median_s": fast_median,
        "roc_metrics_times_s": fast_times,
        "reference_loop_median_s": loop_median,
        "reference_loop_times_s": loop_times,
        "reference_loop_extrapolated": extrapolated,
        "reference_loop_thresholds_timed": timed_thresholds,
        "sklearn_roc_curve_median_s": sk_median,
        "speedup_vs_reference_loop": loop_median / fast_median,
        "speedup_vs_sklearn": sk_median / fast_median,
        "results_agree": {
            "sklearn_balanced_accuracy": abs(sk["balanced_accuracy"] - fast["balanced_accuracy"]) < 1e-9,
            "sklearn_auc": abs(sk["auc"] - fast["auc"]) < 1e-9,
        },
    }
    if reference is not None:
        entry["results_agree"].update(
            {
                "reference_auc": abs(reference["auc"] - fast["auc"]) < 1e-9,
                "reference_balanced_accuracy": abs(reference["balanced_accuracy"] - fast["balanced_accuracy"]) < 1e-9,
                "reference_tpr_at_fpr": all(
                    abs(reference[f"tpr_at_fpr_{lv:g}"] - fast["tpr_at_fpr"][lv]["tpr"]) < 1e-12 for lv in LEVELS
                ),
            }
        )
    return entry


# ----------------------------------------------------------------------------------------- RMIA memory


def _rmia_inputs(n: int, z: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64) * 0.98 + 0.01  # noqa: E731
    return u(n), u(z), u(m, n), u(m, z)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def _peak_rss_growth(fn: Callable[[], object]) -> float:
    """Bytes by which the peak resident set grows above the current one while ``fn`` runs."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024.0


def _rmia_child(n: int, z: int, m: int, dense: bool) -> None:
    """Subprocess entry: print the RSS peak growth of one RMIA call (fallback measurement)."""
    import resource

    args = _rmia_inputs(n, z, m)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rmia_scores(*args, dense=dense)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_bytes": (after - before) * 1024.0}))


def _peak_torch_allocated(fn: Callable[[], object]) -> float | None:
    """Peak bytes live in torch's CPU allocator during ``fn`` (kernel-internal buffers included).

    Read from the profiler's allocation events (``profile_memory=True``): each carries the allocator's
    running total, and the peak is its maximum minus the total before the first event. Returns ``None``
    when this torch build does not expose the events.
    """
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = []

        def walk(nodes):
            for node in nodes:
                if node.tag == torch._C._profiler._EventType.Allocation:
                    fields = node.extra_fields
                    events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
                walk(node.children)

        walk(prof.profiler.kineto_results.experimental_event_tree())
    except Exception:  # noqa: BLE001 - private profiler API; fall back to RSS only
        return None
    if not events:
        return 0.0
    events.sort()
    baseline = events[0][2] - events[0][1]
    return float(max(total for _, _, total in events) - baseline)


def bench_rmia(n: int, z: int, m: int, repeats: int) -> dict:
    args = _rmia_inputs(n, z, m)
    sort_median, sort_times = _median_time(lambda: rmia_scores(*args), repeats=repeats)
    dense_median, dense_times = _median_time(lambda: rmia_scores(*args, dense=True), repeats=max(1, repeats // 2))
    equal = bool(torch.equal(rmia_scores(*args), rmia_scores(*args, dense=True)))
    if _can_reset_peak():
        method = "VmHWM growth after /proc/self/clear_refs reset (same process)"
        sort_peak = _peak_rss_growth(lambda: rmia_scores(*args))
        dense_peak = _peak_rss_growth(lambda: rmia_scores(*args, dense=True))
    else:
        method = "ru_maxrss growth in a fresh subprocess"

        def child(dense: bool) -> float:
            code = f"from benchmarks.bench_privacy import _rmia_child; _rmia_child({n}, {z}, {m}, {dense})"
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_bytes"]

        sort_peak, dense_peak = child(False), child(True)
    sort_alloc = _peak_torch_allocated(lambda: rmia_scores(*args))
    dense_alloc = _peak_torch_allocated(lambda: rmia_scores(*args, dense=True))
    return {
        "n_targets": n,
        "n_population": z,
        "n_reference_models": m,
        "sort_median_s": sort_median,
        "sort_times_s": sort_times,
        "dense_median_s": dense_median,
        "dense_times_s": dense_times,
        "speedup_sort_vs_dense": dense_median / sort_median,
        "sort_peak_allocated_bytes": sort_alloc,
        "dense_peak_allocated_bytes": dense_alloc,
        "memory_ratio_dense_vs_sort": (dense_alloc / sort_alloc) if sort_alloc else None,
        "peak_allocated_method": (
            "torch.profiler(profile_memory=True) allocation events: max running total of bytes held in "
            "torch's CPU allocator during one call, minus the total before it (inputs excluded)"
        ),
        "sort_peak_rss_growth_bytes": sort_peak,
        "dense_peak_rss_growth_bytes": dense_peak,
        "peak_rss_method": method + "; page granularity, small allocations reuse memory the process holds",
        "dense_matrix_bytes_analytic": n * z * (8 + 1),  # float64 ratios + bool comparison
        "results_identical": equal,
    }


# ----------------------------------------------------------------------------------------------- main




def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/privacy_cpu.json")
    parser.add_argument("--max-loop-seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    apply_threads(args)

    roc_sizes = [(1000, 1000), (5000, 1000)] if args.quick else [(10_000, 10_000), (50_000, 10_000)]
    rmia_size = (2000, 2000, 4) if args.quick else (20_000, 20_000, 4)
    result = {
        "benchmark": "fastadv.privacy",
        "device": "cpu",
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "timing": "time.perf_counter, median over repeats after one warm-up call (reference loop: no warm-up)",
        "reference_loop": (
            "for each distinct score t (descending): tpr = mean(member >= t), fpr = mean(nonmember >= t) with "
            "numpy, then AUC (trapezoid), balanced accuracy, advantage and TPR at FPR from the arrays; scores "
            "are continuous, so there are n1 + n0 distinct thresholds"
        ),
        "roc_metrics": [bench_roc(n1, n0, args.max_loop_seconds, args.repeats) for n1, n0 in roc_sizes],
        "rmia": bench_rmia(*rmia_size, repeats=max(3, args.repeats // 3)),
        "load_average_at_end": list(os.getloadavg()),
    }
    write_report(result, args.out)
    for entry in result["roc_metrics"]:
        print(
            f"roc_metrics {entry['n_members']}/{entry['n_nonmembers']}: {entry['roc_metrics_median_s'] * 1e3:.2f} ms; "
            f"reference loop {entry['reference_loop_median_s']:.2f} s"
            f"{' (extrapolated)' if entry['reference_loop_extrapolated'] else ''}; "
            f"speed-up {entry['speedup_vs_reference_loop']:.0f}x; sklearn {entry['sklearn_roc_curve_median_s'] * 1e3:.2f} ms"
        )
    r = result["rmia"]
    print(
        f"RMIA {r['n_targets']}x{r['n_population']}: sort {r['sort_median_s'] * 1e3:.1f} ms / "
        f"{(r['sort_peak_allocated_bytes'] or 0) / 2**20:.2f} MiB allocated; "
        f"dense {r['dense_median_s'] * 1e3:.0f} ms / {(r['dense_peak_allocated_bytes'] or 0) / 2**20:.0f} MiB "
        f"allocated ({r['dense_peak_rss_growth_bytes'] / 2**20:.0f} MiB RSS growth); "
        f"identical={r['results_identical']}"
    )
    print(f"wrote {args.out}")
    return result


# ------------------------------------------------------------------------------ pytest-benchmark suite


def test_bench_roc_metrics_10k_10k(benchmark):
    member, nonmember = _scores(10_000, 10_000)
    result = benchmark(roc_metrics, member, nonmember, fpr=LEVELS)
    assert 0.5 < result["auc"] < 1.0


def test_bench_roc_metrics_50k_10k(benchmark):
    member, nonmember = _scores(50_000, 10_000)
    benchmark(roc_metrics, member, nonmember, fpr=LEVELS)


def test_bench_roc_metrics_bootstrap_100(benchmark):
    member, nonmember = _scores(5_000, 5_000)
    benchmark(roc_metrics, member, nonmember, fpr=LEVELS, bootstrap=100, generator=torch.Generator().manual_seed(0))


def test_bench_reference_loop_2k_2k(benchmark):
    member, nonmember = _scores(2_000, 2_000)
    benchmark(reference_threshold_loop, member.double().numpy(), nonmember.double().numpy())


def test_bench_rmia_sort_20k_20k(benchmark):
    args = _rmia_inputs(20_000, 20_000, 4)
    benchmark(rmia_scores, *args)


def test_bench_rmia_dense_4k_4k(benchmark):
    args = _rmia_inputs(4_000, 4_000, 4)
    benchmark(rmia_scores, *args, dense=True)


if __name__ == "__main__":
    main()
