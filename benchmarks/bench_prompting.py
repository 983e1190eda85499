"""Benchmarks of LM-VP (fastadv.prompting): training steps per second on a 224 canvas.

Two ways to run:

* ``pytest benchmarks/bench_prompting.py`` — a pytest-benchmark suite (``test_bench_*``, small batches).
* ``python -m benchmarks.bench_prompting --out benchmarks/results/prompting_cpu.json`` — the side-by-side
  comparison written as JSON.

What is timed: one LM-VP training step — canvas, frozen timm ResNet-50 (random weights, eval mode, parameters
frozen), label mapping, cross-entropy, backward to the prompt and mapping, optimiser step — run by
``fastadv.train``'s :class:`~fastadv.train.Trainer` (the loop :func:`fastadv.prompting.train_lmvp` uses; its
``standard`` method, SGD over the parameters that require gradients), identically for every configuration:

* ``reference``: a reference-style LM-VP module — the canvas is built with separate tensor ops in every
  forward, as the ILM-VP / TARP-VP code does (``tarp``: ``F.interpolate`` → normalise → ``F.pad`` →
  ``+ tanh(W) * mask``; ``ilm``: ``F.pad`` → ``+ sigmoid(θ) * mask`` → normalise), float32, NCHW. Its mask and
  statistics are built once on the device (the reference code's CPU-built canvas and per-batch model copies
  are *not* reproduced: only the op-by-op construction is);
* ``fastadv_fp32_nofold``: :class:`fastadv.prompting.LMVPModel` (one fused ``prompt_pad``) with
  ``fold_bn=False``, float32, NCHW — the difference to ``reference`` is the canvas alone;
* ``fastadv_fp32``: the same with the default ``fold_bn=True`` (the frozen source's BatchNorms folded into its
  convolutions);
* ``fastadv_fp32_cl``: the same with ``channels_last`` — what ``train_lmvp`` runs by default on the CPU
  (``LMVPConfig.channels_last=None``: channels-last for a convolutional source on the CPU);
* ``fastadv_bf16_cl``: ``channels_last`` and bf16 autocast of the source network (``amp="bf16"``);
* ``reference_bf16_cl``: the reference module with the same two options, to separate what the options
  give from what the fused canvas and the folding give.

The configurations are timed interleaved (round-robin, after warm-up steps), so that load from other jobs on
a shared machine spreads over all of them; the JSON has every step time, their medians, and speed-ups taken
as the median over rounds of the per-round time ratio. A canvas-only comparison (forward +
backward of the canvas construction alone, ``prompt_pad`` vs the op-by-op construction) is included.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._common import add_threads_option, apply_threads, cpu_name, write_report
from fastadv import ops
from fastadv.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from fastadv.prompting import LMVPModel, VisualPrompt
from fastadv.train import Batch, TrainConfig, Trainer

N_TARGET = 10


# ------------------------------------------------------------------------------------------------ reference


class ReferenceLMVP(nn.Module):
    """LM-VP as the reference codes write it: the canvas from separate tensor ops in every forward, then the
    source network and a ``Linear(1000, n_target)`` mapping. Mask and statistics are device buffers."""

    def __init__(self, source: nn.Module, geometry: str, out_size: int = 224, image_size: int = 32,
                 rescale: int = 192, channels_last: bool = False) -> None:
        super().__init__()
        self.source = source
        self.geometry = geometry
        self.out_size = out_size
        self.inner = image_size if geometry == "ilm" else rescale
        before = (out_size - self.inner + 1) // 2
        self.pads = (before, out_size - self.inner - before, before, out_size - self.inner - before)
        mask = torch.ones(3, out_size, out_size)
        mask[:, before:before + self.inner, before:before + self.inner] = 0
        self.register_buffer("mask", mask)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if geometry == "ilm" else (CIFAR10_MEAN, CIFAR10_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.program = nn.Parameter(torch.zeros(3, out_size, out_size))
        self.mapping = nn.Linear(1000, N_TARGET)
        self.channels_last = channels_last

    def canvas(self, x: torch.Tensor) -> torch.Tensor:
        if self.geometry == "ilm":
            canvas = F.pad(x, self.pads, value=0) + torch.sigmoid(self.program) * self.mask
            canvas = (canvas - self.mean) / self.std
        else:
            x = F.interpolate(x, size=(self.inner, self.inner), mode="bilinear", align_corners=False)
            x = (x - self.mean) / self.std
            canvas = F.pad(x, self.pads, value=0) + torch.tanh(self.program) * self.mask
        if self.channels_last:
            canvas = canvas.contiguous(memory_format=torch.channels_last)
        return canvas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(self.source(self.canvas(x)))


def reference_canvas_only(x, program, mask, mean, std, inner, pads):
    """The ``tarp`` canvas op by op (canvas-only timing)."""
    x = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False)
    x = (x - mean) / std
    return F.pad(x, pads, value=0) + torch.tanh(program) * mask


# ------------------------------------------------------------------------------------------------ builders


def make_source(channels_last: bool, state: dict | None = None) -> nn.Module:
    """A frozen timm ResNet-50 with random weights (``state``: weights to copy, so all configurations run the
    same network)."""
    import timm

    source = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    if state is not None:
        source.load_state_dict(state)
    source.eval().requires_grad_(False)
    if channels_last:
        source.to(memory_format=torch.channels_last)
    return source


def build_configs(geometry: str, sources: dict[bool, nn.Module]) -> dict[str, tuple[nn.Module, str | None]]:
    """``{name: (model, amp)}`` for the configurations in the module docstring."""

    def ours(channels_last: bool, fold_bn: bool = True) -> nn.Module:
        prompt = VisualPrompt(geometry, out_size=224, image_size=32, rescale=192)
        model = LMVPModel(sources[channels_last], prompt, "linear", n_target=N_TARGET, n_source=1000,
                          channels_last=channels_last, fold_bn=fold_bn)
        return model

    return {
        "reference": (ReferenceLMVP(sources[False], geometry), None),
        "fastadv_fp32_nofold": (ours(False, fold_bn=False), None),
        "fastadv_fp32": (ours(False), None),
        "fastadv_fp32_cl": (ours(True), None),
        "fastadv_bf16_cl": (ours(True), "bf16"),
        "reference_bf16_cl": (ReferenceLMVP(sources[True], geometry, channels_last=True), "bf16"),
    }


def make_trainer(model: nn.Module, amp: str | None, channels_last: bool, x: torch.Tensor, y: torch.Tensor) -> Trainer:
    """A trainer stepping ``model`` with CE and SGD (lr 0.05, momentum 0.9) over its trainable parameters."""
    config = TrainConfig(method="standard", model="resnet50", dataset="digits", num_classes=N_TARGET, augment=False,
                         batch_size=x.shape[0], epochs=1, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0,
                         schedule="constant", amp=amp or "none", channels_last=channels_last, device="cpu",
                         eval_every=0, eval_steps=0, eval_subset=1, out_dir=None, progress=False)
    return Trainer(config, model=model, train_set=(x, y), eval_set=(x[:1], y[:1]))


def step(trainer: Trainer, batch: Batch):
    """One training step exactly as the trainer's epoch loop runs it."""
    return trainer.method.train_batch(trainer, batch)


# ------------------------------------------------------------------------------------------------ timing


def time_training_steps(geometry: str, batch_size: int, repeats: int, warmup: int, sources) -> dict:
    configs = build_configs(geometry, sources)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, N_TARGET, (batch_size,), generator=g)
    # Same computation: the fused canvas equals the op-by-op one (both prompts start at zero).
    with torch.no_grad():
        parity = float((configs["fastadv_fp32"][0].canvas(x) - configs["reference"][0].canvas(x)).abs().max())
    if parity > 1e-4:
        raise RuntimeError(f"the fastadv and reference canvases differ by {parity}")
    trainers = {name: make_trainer(model, amp, name.endswith("_cl"), x, y) for name, (model, amp) in configs.items()}
    batch = Batch(x, y)
    for name, trainer in trainers.items():
        trainer.net.train()
        for _ in range(warmup):
            step(trainer, batch)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            step(trainer, batch)
            times[name].append(time.perf_counter() - start)
    result = {}
    for name, values in times.items():
        median = statistics.median(values)
        result[name] = {"median_s": median, "steps_per_s": 1.0 / median, "images_per_s": batch_size / median,
                        "amp": configs[name][1], "times_s": values}
    # Speed-ups: the median over rounds of the per-round time ratio. A round runs every configuration back to
    # back, so a change of load on the shared machine between rounds cancels out of each ratio.
    def speedup(slow: str, fast: str) -> float:
        return statistics.median(a / b for a, b in zip(times[slow], times[fast]))

    ratios = {f"{name}_vs_reference": speedup("reference", name) for name in result if name != "reference"}
    ratios["fastadv_bf16_cl_vs_reference_bf16_cl"] = speedup("reference_bf16_cl", "fastadv_bf16_cl")
    return {"geometry": geometry, "batch_size": batch_size, "canvas_max_abs_difference": parity, "configs": result,
            "speedups": ratios,
            "speedup_definition": "median over rounds of (reference step time / configuration step time)"}


def time_canvas_only(batch_size: int, repeats: int) -> dict:
    """Forward + backward of the ``tarp`` canvas alone: ``prompt_pad`` vs the op-by-op construction."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch_size, 3, 32, 32, generator=g)
    program = torch.randn(3, 224, 224, generator=g).requires_grad_(True)
    mask = torch.ones(3, 224, 224)
    mask[:, 16:208, 16:208] = 0
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    upstream = torch.randn(batch_size, 3, 224, 224, generator=g)

    def fused():
        canvas = ops.prompt_pad(x, program, out_size=224, inner_size=192, activation="tanh", mean=CIFAR10_MEAN,
                                std=CIFAR10_STD, normalize="image")
        canvas.backward(upstream)

    def reference():
        canvas = reference_canvas_only(x, program, mask, mean, std, 192, (16, 16, 16, 16))
        canvas.backward(upstream)

    for fn in (fused, reference):
        fn()
    times: dict[str, list[float]] = {"prompt_pad": [], "op_by_op": []}
    for _ in range(repeats):
        for name, fn in (("prompt_pad", fused), ("op_by_op", reference)):
            program.grad = None
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["op_by_op"], times["prompt_pad"]))
    return {"geometry": "tarp", "batch_size": batch_size, "prompt_pad_median_s": med["prompt_pad"],
            "op_by_op_median_s": med["op_by_op"], "speedup": ratio}


# ------------------------------------------------------------------------------------------------ main




def main(argv: list[str] | None = None) -> int:
    """Run the comparison, write the JSON (``--out``) and print a summary; returns the exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/prompting_cpu.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per configuration (interleaved)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--geometries", default="tarp", help="comma-separated: tarp, ilm")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    started = time.perf_counter()
    torch.manual_seed(0)
    first = make_source(False)
    sources = {False: first, True: make_source(True, first.state_dict())}
    import timm

    result = {
        "benchmark": "fastadv.prompting",
        "device": "cpu",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
        "native_kernels": ops.has_native("cpu"),
        "source_network": "timm resnet50, random weights, frozen (eval mode, requires_grad=False)",
        "canvas": 224,
        "image_size": 32,
        "mapping": "linear (1000 -> 10)",
        "optimizer": "SGD lr 0.05 momentum 0.9 over the prompt and mapping (one forward/backward per step)",
        "step": "fastadv.train.Trainer, method 'standard': forward (autocast when amp), float32 cross-entropy, "
                "backward, optimiser and LR-schedule step",
        "timing": "time.perf_counter per step; configurations interleaved round-robin after warm-up; median",
        "load_average_at_start": list(os.getloadavg()),
        "training_steps": [time_training_steps(g, args.batch_size, args.repeats, args.warmup, sources)
                           for g in args.geometries.split(",")],
        "canvas_only": time_canvas_only(16, max(10, 3 * args.repeats)),
        "load_average_at_end": list(os.getloadavg()),
    }
    result["wall_time_s"] = time.perf_counter() - started
    write_report(result, args.out)
    for entry in result["training_steps"]:
        cfg = entry["configs"]
        print(f"[{entry['geometry']}] batch {entry['batch_size']}: "
              + ", ".join(f"{name} {c['steps_per_s']:.2f} steps/s" for name, c in cfg.items()))
        print("    speed-ups: " + ", ".join(f"{k} {v:.2f}x" for k, v in entry["speedups"].items()))
    c = result["canvas_only"]
    print(f"canvas only (tarp, batch {c['batch_size']}, fwd+bwd): prompt_pad {c['prompt_pad_median_s'] * 1e3:.2f} ms, "
          f"op by op {c['op_by_op_median_s'] * 1e3:.2f} ms ({c['speedup']:.2f}x); total {result['wall_time_s']:.0f} s")
    return 0


# ------------------------------------------------------------------------------------------------ pytest-benchmark


_SOURCES: dict = {}


def _bench_sources() -> dict:
    if not _SOURCES:
        torch.manual_seed(0)
        first = make_source(False)
        _SOURCES.update({False: first, True: make_source(True, first.state_dict())})
    return _SOURCES


def _bench_step(benchmark, name: str, geometry: str = "tarp", batch_size: int = 4):
    model, amp = build_configs(geometry, _bench_sources())[name]
    x = torch.rand(batch_size, 3, 32, 32)
    y = torch.randint(0, N_TARGET, (batch_size,))
    trainer = make_trainer(model, amp, name.endswith("_cl"), x, y)
    trainer.net.train()
    batch = Batch(x, y)
    step(trainer, batch)
    benchmark.pedantic(step, args=(trainer, batch), rounds=3, warmup_rounds=1)


def test_bench_step_reference_tarp(benchmark):
    _bench_step(benchmark, "reference")


def test_bench_step_fastadv_fp32_tarp(benchmark):
    _bench_step(benchmark, "fastadv_fp32")


def test_bench_step_fastadv_bf16_channels_last_tarp(benchmark):
    _bench_step(benchmark, "fastadv_bf16_cl")


def test_bench_canvas_prompt_pad(benchmark):
    x = torch.rand(16, 3, 32, 32)
    program = torch.zeros(3, 224, 224, requires_grad=True)

    def run():
        ops.prompt_pad(x, program, out_size=224, inner_size=192, activation="tanh", mean=CIFAR10_MEAN,
                       std=CIFAR10_STD, normalize="image").sum().backward()

    benchmark(run)


def test_bench_canvas_op_by_op(benchmark):
    x = torch.rand(16, 3, 32, 32)
    program = torch.zeros(3, 224, 224, requires_grad=True)
    mask = torch.ones(3, 224, 224)
    mask[:, 16:208, 16:208] = 0
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def run():
        reference_canvas_only(x, program, mask, mean, std, 192, (16, 16, 16, 16)).sum().backward()

    benchmark(run)


if __name__ == "__main__":
    raise SystemExit(main())
