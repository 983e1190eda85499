"""Kernel benchmarks: each fastadv op against the same computation as plain eager PyTorch ops and against
``torch.compile`` of that eager sequence, timed side by side in one process.

    python -m benchmarks.bench_ops --out benchmarks/results/ops_cpu.json     # JSON runner
    python -m pytest benchmarks/bench_ops.py --benchmark-enable               # pytest-benchmark suite

Absolute times are only meaningful on a quiet machine; the ratios are what the goals are stated in.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils import benchmark as tbench

import fastadv.ops as ops
from benchmarks._common import write_report

EPS, ALPHA = 8 / 255, 2 / 255
SIZES = {"cifar": (512, 3, 32, 32), "imagenet": (64, 3, 224, 224)}


# --- the eager sequences every PGD loop in the field is written with ---------------------------------------


def eager_linf(delta, grad, x, eps):
    delta = delta + ALPHA * grad.sign()
    delta = torch.max(torch.min(delta, eps), -eps) if isinstance(eps, torch.Tensor) else delta.clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def eager_l2(delta, grad, x, eps):
    gnorm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    delta = delta + 0.1 * grad / gnorm
    dnorm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    delta = delta * torch.clamp(eps / dnorm.clamp_min(1e-12), max=1.0)
    return (x + delta).clamp(0, 1) - x


def eager_masked(delta, grad, x, mask):
    eps = torch.where(mask, EPS, 7 / 255)
    return eager_linf(delta, grad, x, eps)


def eager_prompt_pad(x, prompt, inner=192, out=224):
    """The reference-code way: resize, pad, then paste the activated prompt through a border mask."""
    img = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False)
    top = (out - inner + 1) // 2
    img = F.pad(img, (top, out - inner - top, top, out - inner - top))
    border = torch.ones(1, 1, out, out, device=x.device, dtype=x.dtype)
    border[..., top:top + inner, top:top + inner] = 0
    return img + torch.tanh(prompt) * border


# --- cases ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    size: str
    native: Callable[[], object]
    eager: Callable
    eager_args: tuple
    bytes_moved: int  # minimum DRAM traffic of the fused op
    grad_out: torch.Tensor | None = None  # when set, time forward + backward w.r.t. the tensor args

    def call(self, fn: Callable):
        out = fn(*self.eager_args)
        if self.grad_out is not None:
            return torch.autograd.grad(out, self.eager_args, self.grad_out)
        return out


def make_cases(device: str, names=None, sizes=None) -> list[Case]:
    cases = []
    for size_name, shape in SIZES.items():
        if sizes and size_name not in sizes:
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.rand(shape, generator=g).to(device)
        grad = torch.randn(shape, generator=g).to(device)
        delta = ((torch.rand(shape, generator=g) * 2 - 1) * EPS).to(device)
        eps_map = (torch.rand((shape[0], 1) + shape[2:], generator=g) * EPS).to(device)
        mask = (torch.rand((shape[0], 1) + shape[2:], generator=g) > 0.5).to(device)
        eps_b = torch.full((shape[0], 1, 1, 1), 0.5, device=device)
        n = x.numel() * x.element_size()
        plane = n // shape[1]
        work = delta.clone()
        cases += [
            Case("linf_step", size_name, lambda d=delta, gr=grad, xx=x: ops.pgd_step(d, gr, xx, eps=EPS, alpha=ALPHA),
                 eager_linf, (delta, grad, x, EPS), 4 * n),
            Case("linf_step_inplace", size_name,
                 lambda w=work, gr=grad, xx=x: ops.pgd_step_(w, gr, xx, eps=EPS, alpha=ALPHA),
                 eager_linf, (delta, grad, x, EPS), 4 * n),
            Case("l2_step", size_name, lambda d=delta, gr=grad, xx=x: ops.pgd_step(d, gr, xx, eps=0.5, alpha=0.1,
                                                                                  norm="l2"),
                 eager_l2, (delta, grad, x, eps_b), 4 * n),
            Case("per_pixel_step", size_name,
                 lambda d=delta, gr=grad, xx=x, e=eps_map: ops.pgd_step(d, gr, xx, eps=e, alpha=ALPHA),
                 eager_linf, (delta, grad, x, eps_map), 4 * n + plane),
            Case("masked_step", size_name,
                 lambda w=work, gr=grad, xx=x, m=mask: ops.masked_pgd_step_(w, gr, xx, m, eps_high=EPS,
                                                                           eps_low=7 / 255, alpha=ALPHA),
                 eager_masked, (delta, grad, x, mask), 4 * n + plane // 4),
        ]
    g = torch.Generator().manual_seed(1)
    px = torch.rand(64, 3, 32, 32, generator=g).to(device).requires_grad_(True)
    prompt = torch.randn(3, 224, 224, generator=g).to(device).requires_grad_(True)
    go = torch.randn(64, 3, 224, 224, generator=g).to(device)

    def native_pad():
        canvas = ops.prompt_pad(px, prompt, out_size=224, inner_size=192, activation="tanh")
        return torch.autograd.grad(canvas, (px, prompt), go)

    if not sizes or "prompt" in sizes:
        cases.append(Case("prompt_pad_fwd_bwd", "64x3x32x32->192in224", native_pad, eager_prompt_pad, (px, prompt),
                          2 * go.numel() * 4 + 2 * px.numel() * 4, grad_out=go))
    if names:
        cases = [c for c in cases if c.name in names]
    return cases


def time_fn(fn: Callable, min_run_time: float) -> float:
    fn()  # warm-up (and compile)
    return tbench.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: str, numel: int, min_run_time: float) -> float:
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), min_run_time)
    return 2 * src.numel() * src.element_size() / t


def run(device: str, with_compile: bool, min_run_time: float, names=None, sizes=None) -> dict:
    results = []
    copy_bw = {}
    for case in make_cases(device, names, sizes):
        row = {"op": case.name, "size": case.size}
        row["native_s"] = time_fn(case.native, min_run_time)
        row["eager_s"] = time_fn(lambda: case.call(case.eager), min_run_time)
        row["speedup_vs_eager"] = row["eager_s"] / row["native_s"]
        if with_compile:
            torch._dynamo.reset()
            compiled = torch.compile(case.eager, fullgraph=True)
            t0 = time.perf_counter()
            case.call(compiled)
            row["compile_time_s"] = time.perf_counter() - t0
            row["compiled_s"] = time_fn(lambda: case.call(compiled), min_run_time)
            row["speedup_vs_compile"] = row["compiled_s"] / row["native_s"]
        row["native_GBps"] = case.bytes_moved / row["native_s"] / 1e9
        if case.size in SIZES:
            if case.size not in copy_bw:
                copy_bw[case.size] = copy_bandwidth(device, int(torch.tensor(SIZES[case.size]).prod()), min_run_time)
            row["fraction_of_copy_bandwidth"] = row["native_GBps"] * 1e9 / copy_bw[case.size]
        results.append(row)
        print(json.dumps(row), flush=True)
    return {
        "benchmark": "ops",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "device_type": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "native": ops.has_native(device),
        "copy_GBps": {k: v / 1e9 for k, v in copy_bw.items()},
        "min_run_time_s": min_run_time,
        "results": results,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--ops", nargs="*", default=None, help="only these ops")
    ap.add_argument("--sizes", nargs="*", default=None, help="cifar, imagenet, prompt")
    args = ap.parse_args(argv)
    report = run(args.device, not args.no_compile, args.min_run_time, args.ops, args.sizes)
    if args.out:
        write_report(report, args.out)
    return 0


# --- pytest-benchmark suite ------------------------------------------------------------------------------

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", ["native", "eager"])
@pytest.mark.parametrize("case", [f"{n}:{s}" for s in ("cifar", "imagenet")
                                  for n in ("linf_step", "l2_step", "per_pixel_step", "masked_step")]
                         + ["prompt_pad_fwd_bwd:prompt"])
def test_bench_op(benchmark, case, impl):
    name, size = case.split(":")
    (c,) = make_cases(_DEVICE, names=[name], sizes=[size])
    fn = c.native if impl == "native" else (lambda: c.call(c.eager))
    if _DEVICE == "cuda":
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark(fn)


if __name__ == "__main__":
    raise SystemExit(main())
