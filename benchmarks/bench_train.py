"""Training-side benchmarks, each side by side in one process:

1. PART pixel-importance masks: fastadv's batched ``fastadv.cam.part_masks`` (one forward and one backward
   per batch, PIL-exact bicubic upsampling and the jet table as tensor ops) against the PART reference
   code's way, one image at a time: a forward and a backward pass of that single image with hooks on the
   target layer (Grad-CAM for the predicted class), min–max normalisation, PIL bicubic upsampling, squaring,
   ``matplotlib.colormaps["jet"]``, standardisation of the ``3×H×W`` colour image and the threshold ``> 1``.
   Both masks are compared pixel by pixel (the agreement fraction is reported).
2. One epoch of PGD-AT (PGD-10, ε = 8/255, α = 2/255, SGD lr 0.01, momentum 0.9, weight decay 2e-4,
   batch 128): fastadv's ``Trainer`` against a textbook loop — ``torchattacks.PGD`` for the inner
   maximisation (it puts the model in eval mode for the attack and restores train mode), then
   ``zero_grad / cross_entropy(model(x_adv), y).backward() / step`` with the model in train mode — from the
   same architecture and initial weights, on the same data.

    python -m benchmarks.bench_train --out benchmarks/results/train_cpu.json     # JSON runner
    python -m pytest benchmarks/bench_train.py --benchmark-enable                 # pytest-benchmark suite

Data: scikit-learn's bundled digits (``fastadv.data.get_dataset("digits")``, 3×32×32; nothing is
downloaded). Every figure is the median over repeats of the process's CPU time with one torch thread
(the work done, robust to the other processes on a shared machine); wall-clock medians are reported beside.

torchattacks is a benchmark-only dependency (``pip install torchattacks==3.5.1 --no-deps``); without it the
PGD-AT comparison records why and is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks._common import add_threads_option, apply_threads, cpu_name, write_report
from fastadv.cam import compute_cam, masks_from_cams, part_masks
from fastadv.data import get_dataset
from fastadv.models import create_model
from fastadv.models.fold import eval_view
from fastadv.train import TrainConfig, Trainer

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 2e-4

try:
    import torchattacks

    TORCHATTACKS_ERROR = None
except Exception as exc:  # noqa: BLE001 — any import failure is recorded, not fatal
    torchattacks = None
    TORCHATTACKS_ERROR = f"{type(exc).__name__}: {exc}"


# --- 1. PART masks, the reference code's way: one image at a time ----------------------------------------


def reference_cam(model, layer, x1) -> np.ndarray:
    """Grad-CAM ``(h, w)`` of one image ``x1`` (``(1, C, H, W)``) as the PART reference code computes it:
    hooks on ``layer``, forward and backward of the predicted class's logit, then NumPy."""
    store = {}

    def forward_hook(_module, _inputs, output):
        store["acts"] = output.detach()
        output.register_hook(lambda grad: store.__setitem__("grads", grad.detach()))

    handle = layer.register_forward_hook(forward_hook)
    try:
        model.eval()
        model.zero_grad()
        x1 = x1.clone().requires_grad_(True)
        logits = model(x1)
        cls = int(logits.argmax(dim=1))
        logits[0, cls].backward()
    finally:
        handle.remove()
    acts = store["acts"][0].numpy()
    grads = store["grads"][0].numpy()
    weights = grads.mean(axis=(1, 2))
    return np.maximum((weights[:, None, None] * acts).sum(axis=0), 0)


def reference_mask_from_cam(cam: np.ndarray, h: int, w: int) -> np.ndarray:
    """The reference recipe on one CAM: min–max normalise, PIL bicubic upsampling to ``(h, w)``, square,
    matplotlib's jet (RGB), standardise the ``(3, h, w)`` colour image, ``> 1``."""
    from matplotlib import colormaps
    from PIL import Image

    span = cam.max() - cam.min()
    if span <= 0:  # a constant map has no important pixels (fastadv's convention; the reference divides by 0)
        return np.zeros((3, h, w), dtype=bool)
    cam = (cam - cam.min()) / span
    up = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((w, h), Image.BICUBIC))
    colour = colormaps["jet"](up ** 2)[..., :3].transpose(2, 0, 1)  # (3, H, W)
    z = (colour - colour.mean()) / colour.std()
    return z > 1


def reference_part_mask(model, layer, x1) -> np.ndarray:
    """The ``(3, H, W)`` boolean PART mask of one image, the reference code's way."""
    return reference_mask_from_cam(reference_cam(model, layer, x1), *x1.shape[-2:])


def reference_part_masks(model, layer, x) -> np.ndarray:
    return np.stack([reference_part_mask(model, layer, x[i:i + 1]) for i in range(len(x))])


# --- 2. PGD-AT, the textbook loop ---------------------------------------------------------------------------


def textbook_pgd_at_epoch(model, optimizer, x_train, y_train, *, batch_size=128, seed=0, steps=STEPS) -> float:
    """One epoch of PGD-AT as most codebases write it; returns the mean training loss."""
    attack = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=True)
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
    total, count = 0.0, 0
    model.train()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x, y = x_train[idx], y_train[idx]
        x_adv = attack(x, y)  # torchattacks: eval mode during the attack, the caller's mode restored after
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        count += len(y)
    return total / count


def pgd_at_config(epochs=1, train_subset=None, steps=STEPS, seed=0) -> TrainConfig:
    return TrainConfig(method="pgd_at", model="small_cnn", model_kwargs={"width": 16}, dataset="digits",
                       epochs=epochs, batch_size=128, eval_every=0, eval_steps=0, eval_subset=1, out_dir=None,
                       progress=False, augment=False, schedule="constant", lr=LR, momentum=MOMENTUM,
                       weight_decay=WEIGHT_DECAY, eps=EPS, alpha=ALPHA, steps=steps, train_subset=train_subset,
                       device="cpu", seed=seed)


def textbook_setup(config: TrainConfig, train):
    """The model the Trainer builds for ``config`` (same seed, same constructor: the same initial weights),
    and SGD with the same hyper-parameters."""
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=10, **config.model_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    x, y = train.x, train.y
    if config.train_subset is not None:
        x, y = x[:config.train_subset], y[:config.train_subset]
    return model, opt, x, y


# --- timing helpers -----------------------------------------------------------------------------------------


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0




def _row(cpu: list[float], wall: list[float]) -> dict:
    return {"median_cpu_s": statistics.median(cpu), "median_wall_s": statistics.median(wall),
            "cpu_s": cpu, "wall_s": wall}


def bench_part_masks(args, model_name: str) -> dict:
    test = get_dataset("digits", split="test")
    x = test.x[:args.cam_batch]
    torch.manual_seed(args.seed)
    model = create_model(model_name, num_classes=10, width=args.cam_width).eval()
    layer = model.cam_layer
    # warm-up outside the timings
    part_masks(model, x[:8])
    reference_part_masks(model, layer, x[:2])

    fa_cpu, fa_wall, ref_cpu, ref_wall, bf_cpu, bf_wall = [], [], [], [], [], []
    fa_masks = ref_masks = bf_masks = None
    for r in range(args.repeats):
        fa_masks, c, w = timed(lambda: part_masks(model, x, layer=None, method="gradcam", recipe="jet"))
        fa_cpu.append(c)
        fa_wall.append(w)
        bf_masks, c, w = timed(lambda: part_masks(model, x, layer=None, method="gradcam", recipe="jet", amp="bf16"))
        bf_cpu.append(c)
        bf_wall.append(w)
        if r < args.ref_repeats:
            ref_masks, c, w = timed(lambda: reference_part_masks(model, layer, x))
            ref_cpu.append(c)
            ref_wall.append(w)
    # where the time goes: the CAM passes alone, and the mask recipe alone, on each side
    fa_cam = [timed(lambda: compute_cam(model, x))[1] for _ in range(args.repeats)]
    fa_cam_nofold = [timed(lambda: compute_cam(model, x, fold_bn=False))[1] for _ in range(args.repeats)]
    cams = compute_cam(model, x)
    fa_post = [timed(lambda: masks_from_cams(cams, (32, 32)))[1] for _ in range(args.repeats)]
    ref_cams, ref_cam_cpu, _ = timed(lambda: [reference_cam(model, layer, x[i:i + 1]) for i in range(len(x))])
    _, ref_post_cpu, _ = timed(lambda: [reference_mask_from_cam(c, 32, 32) for c in ref_cams])
    breakdown = {"fastadv_compute_cam_cpu_s": statistics.median(fa_cam),
                 "fastadv_compute_cam_fold_bn_off_cpu_s": statistics.median(fa_cam_nofold),
                 "fastadv_masks_from_cams_cpu_s": statistics.median(fa_post),
                 "reference_cam_loop_cpu_s": ref_cam_cpu, "reference_mask_recipe_loop_cpu_s": ref_post_cpu}
    breakdown["cam_pass_speedup"] = ref_cam_cpu / breakdown["fastadv_compute_cam_cpu_s"]
    breakdown["mask_recipe_speedup"] = ref_post_cpu / breakdown["fastadv_masks_from_cams_cpu_s"]
    # The ceiling of any exact batched method: the loop costs `reference_loop_in_single_forwards` single-image
    # forward passes per image, and batching makes a forward pass `batching_gain` times cheaper per image.
    # Folding BatchNorm makes the forward itself cheaper: the ceiling of a batched pass over the folded network.
    x_cl = x.contiguous(memory_format=torch.channels_last)
    folded = eval_view(model)
    with torch.no_grad():
        single = statistics.median(timed(lambda: [model(x[i:i + 1]) for i in range(len(x))])[1]
                                   for _ in range(args.ref_repeats))
        batched = statistics.median(timed(lambda: model(x_cl))[1] for _ in range(args.repeats))
        batched_folded = statistics.median(timed(lambda: folded(x_cl))[1] for _ in range(args.repeats))
    breakdown["forward_one_image_at_a_time_cpu_s"] = single
    breakdown["forward_batched_cpu_s"] = batched
    breakdown["forward_batched_folded_cpu_s"] = batched_folded
    breakdown["reference_loop_in_single_forwards"] = ref_cam_cpu / single
    breakdown["batching_gain"] = single / batched
    breakdown["exact_batched_ceiling"] = ref_cam_cpu / batched
    breakdown["exact_batched_ceiling_folded"] = ref_cam_cpu / batched_folded

    fa = fa_masks.numpy()
    agree = float((fa == ref_masks).mean())
    per_image = (fa == ref_masks).reshape(len(x), -1).mean(axis=1)
    fa_row, ref_row, bf_row = _row(fa_cpu, fa_wall), _row(ref_cpu, ref_wall), _row(bf_cpu, bf_wall)
    for row in (fa_row, ref_row, bf_row):
        row["images_per_s"] = len(x) / row[f"median_{args.clock}_s"]
    speedup = ref_row[f"median_{args.clock}_s"] / fa_row[f"median_{args.clock}_s"]
    bf = bf_masks.numpy()
    bf_row["speedup"] = ref_row[f"median_{args.clock}_s"] / bf_row[f"median_{args.clock}_s"]
    bf_row["pixel_agreement_with_reference"] = float((bf == ref_masks).mean())
    return {
        "model": f"fastadv.models.create_model({model_name!r}, num_classes=10, width={args.cam_width}), "
                 f"untrained (seed {args.seed}), eval mode; target layer model.cam_layer",
        "images": f"first {len(x)} digits test images, 3x32x32",
        "batch_size": len(x),
        "fastadv": fa_row,
        "reference_per_image": ref_row,
        "speedup": speedup,
        "speedup_wall": ref_row["median_wall_s"] / fa_row["median_wall_s"],
        "fastadv_bf16": bf_row,
        "ceiling_note": "exact_batched_ceiling = reference CAM loop / one batched forward pass of the network as it "
                        "is: no exact batched method at this precision and thread count that runs that network can "
                        "beat it (it still has the forward to do); exact_batched_ceiling_folded: the same for the "
                        "network with BatchNorm folded into the convolutions (compute_cam's default, fold_bn=True)",
        "breakdown": breakdown,
        "pixel_agreement": agree,
        "images_identical": int((per_image == 1).sum()),
        "min_image_agreement": float(per_image.min()),
        "important_fraction_fastadv": float(fa.mean()),
        "important_fraction_reference": float(ref_masks.mean()),
        "all_false_masks_fastadv": int((~fa.reshape(len(x), -1).any(axis=1)).sum()),
    }


def bench_pgd_at(args) -> dict:
    if torchattacks is None:
        return {"skipped": f"torchattacks does not import: {TORCHATTACKS_ERROR}"}
    config = pgd_at_config(epochs=1, train_subset=args.train_subset, seed=args.seed)
    train = get_dataset("digits", split="train")

    # warm-up: one short run of each side
    warm = pgd_at_config(epochs=1, train_subset=128, steps=1, seed=args.seed)
    trainer = Trainer(warm)
    trainer.fit()
    trainer.close()
    m, o, xw, yw = textbook_setup(warm, train)
    textbook_pgd_at_epoch(m, o, xw, yw, steps=1)

    no_fold_config = dataclasses.replace(config, fold_bn=False)
    plain_config = dataclasses.replace(config, channels_last=False, fold_bn=False)
    info = {}

    def run_trainer(cfg):
        trainer = Trainer(cfg)  # construction (data loading, model, optimiser) is not timed
        info["n"] = trainer.train_data.num_examples
        if cfg is config:
            info["layout"] = "channels_last" if trainer.channels_last else "contiguous (NCHW)"
        try:
            result, c, w = timed(trainer.fit)
        finally:
            trainer.close()
        return result.history[-1].get("train_loss"), c, w

    def run_textbook(r):
        model, opt, x, y = textbook_setup(config, train)
        torch.manual_seed(args.seed + r)  # torchattacks draws its random start from the global RNG
        return timed(lambda: textbook_pgd_at_epoch(model, opt, x, y, batch_size=config.batch_size,
                                                   seed=args.seed + r))

    # Round-robin with the order rotated every round, so that load from other jobs on the shared machine
    # spreads over the three sides; the speed-up is the median of the per-round ratios.
    sides = {"fastadv": lambda r: run_trainer(config), "no_fold": lambda r: run_trainer(no_fold_config),
             "plain": lambda r: run_trainer(plain_config), "textbook": run_textbook}
    rows = {name: {"cpu": [], "wall": [], "loss": []} for name in sides}
    names = list(sides)
    for r in range(args.train_repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            loss, c, w = sides[name](r)
            rows[name]["cpu"].append(c)
            rows[name]["wall"].append(w)
            rows[name]["loss"].append(loss)
    clock = args.clock

    def ratio(slow: str, fast: str, which: str = clock) -> float:
        return statistics.median(a / b for a, b in zip(rows[slow][which], rows[fast][which]))

    out = {k: _row(rows[k]["cpu"], rows[k]["wall"]) for k in sides}
    for k in sides:
        out[k]["train_loss"] = rows[k]["loss"]
        if k != "textbook":
            out[k]["speedup"] = ratio("textbook", k)
    out["fastadv"]["memory_format"] = info["layout"]
    n = info["n"]
    return {
        "model": "fastadv small_cnn (width 16), the same initial weights on both sides (seed "
                 f"{args.seed})",
        "data": f"digits train split, {n} images, batch 128, no augmentation, shuffled",
        "attack": f"PGD-{STEPS} Linf eps 8/255 alpha 2/255, uniform random start",
        "optimizer": f"SGD lr {LR} (constant) momentum {MOMENTUM} weight decay {WEIGHT_DECAY}",
        "timing": "fastadv: Trainer(config).fit() for 1 epoch, Trainer construction excluded; the fit includes "
                  "a natural-accuracy evaluation of 1 held-out image (eval_subset=1, eval_steps=0). textbook: "
                  "the epoch loop, torchattacks.PGD built once per epoch. The three sides run round-robin, the "
                  "order rotated every round; speedup = median over rounds of the per-round time ratio.",
        "fastadv_trainer": out["fastadv"],
        "fastadv_trainer_fold_bn_off": out["no_fold"],
        "fastadv_trainer_channels_last_and_fold_bn_off": out["plain"],
        "textbook_torchattacks": out["textbook"],
        "speedup": ratio("textbook", "fastadv"),
        "speedup_wall": ratio("textbook", "fastadv", "wall"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the JSON report here")
    ap.add_argument("--cam-batch", type=int, default=128)
    ap.add_argument("--cam-models", default="resnet18,small_cnn", help="comma-separated model names")
    ap.add_argument("--cam-width", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of fastadv's part_masks")
    ap.add_argument("--ref-repeats", type=int, default=3, help="timed repeats of the per-image reference loop")
    ap.add_argument("--train-repeats", type=int, default=6, help="timed PGD-AT epochs per side")
    ap.add_argument("--train-subset", type=int, default=None, help="use only the first n training images")
    add_threads_option(ap)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    apply_threads(args)
    # CPU time measures the work with one thread; with more, it also counts spin-waiting: compare wall times.
    args.clock = "cpu" if torch.get_num_threads() == 1 else "wall"

    t_start = time.perf_counter()
    report = {
        "benchmark": "PART masks and one PGD-AT epoch, CPU",
        "device": cpu_name(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torchattacks": getattr(torchattacks, "__version__", None),
        "torchattacks_error": TORCHATTACKS_ERROR,
        "speedup_clock": args.clock,
        "notes": [
            ("PART masks: speedup = median time of the baseline / median time of fastadv; PGD-AT epoch: the "
             "median of the per-round ratios. Times are taken with speedup_clock: the process's CPU time with one "
             "torch thread (the work done, robust to other processes), else the wall clock; speedup_wall always "
             "uses the wall clock."),
            ("fastadv runs with its defaults: on the CPU, batches of a convolutional network go channels-last "
             "(TrainConfig.channels_last=None, compute_cam(channels_last=None)), and attacks fold eval-mode "
             "BatchNorm into the convolutions (TrainConfig.fold_bn=True), as do CAM passes (compute_cam(fold_bn=True)); "
             "the fastadv_trainer_*_off rows show the same trainer without them, and the breakdown the CAM pass "
             "without folding. fastadv_bf16 computes the CAM pass under bf16 autocast "
             "(compute_cam(amp='bf16')), with its own pixel agreement."),
        ],
    }
    report["part_masks"] = {}
    for name in args.cam_models.split(","):
        part = report["part_masks"][name] = bench_part_masks(args, name)
        print("part_masks", name, json.dumps({k: part[k] for k in ("speedup", "speedup_wall", "pixel_agreement")}),
              "bf16", json.dumps({k: part["fastadv_bf16"][k] for k in ("speedup", "pixel_agreement_with_reference")}),
              json.dumps({k: round(v, 4) for k, v in part["breakdown"].items()}), flush=True)
    at = bench_pgd_at(args)
    report["pgd_at_epoch"] = at
    print("pgd_at_epoch", json.dumps({k: at.get(k) for k in ("speedup", "speedup_wall", "skipped")}), flush=True)
    report["goals"] = {
        "part_masks_speedup_at_least_20": {k: v["speedup"] >= 20 for k, v in report["part_masks"].items()},
        "part_masks_bf16_speedup_at_least_20": {k: v["fastadv_bf16"]["speedup"] >= 20
                                                for k, v in report["part_masks"].items()},
        "part_masks_pixel_agreement": {k: v["pixel_agreement"] for k, v in report["part_masks"].items()},
        "pgd_at_epoch_speedup_at_least_1.2": at.get("speedup", 0) >= 1.2 if "speedup" in at else None,
    }
    report["wall_s"] = time.perf_counter() - t_start
    write_report(report, args.out)
    return 0


# --- pytest-benchmark suite (untrained models, small sizes: quick) --------------------------------------


@pytest.fixture(scope="module")
def cam_setup():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=16).eval()
    x = get_dataset("digits", split="test").x[:16]
    return model, x


def test_bench_part_masks_fastadv(benchmark, cam_setup):
    model, x = cam_setup
    masks = benchmark(lambda: part_masks(model, x))
    ref = reference_part_masks(model, model.cam_layer, x)
    assert masks.shape == ref.shape
    assert (masks.numpy() == ref).mean() > 0.99


def test_bench_part_masks_reference(benchmark, cam_setup):
    model, x = cam_setup
    benchmark(lambda: reference_part_masks(model, model.cam_layer, x))


def test_bench_pgd_at_epoch_fastadv(benchmark):
    config = pgd_at_config(epochs=1, train_subset=128, steps=2)

    def run():
        trainer = Trainer(config)
        try:
            return trainer.fit()
        finally:
            trainer.close()

    benchmark.pedantic(run, rounds=1, iterations=1)


def test_bench_pgd_at_epoch_textbook(benchmark):
    if torchattacks is None:
        pytest.skip(f"torchattacks does not import: {TORCHATTACKS_ERROR}")
    config = pgd_at_config(epochs=1, train_subset=128, steps=2)
    train = get_dataset("digits", split="train")

    def run():
        model, opt, x, y = textbook_setup(config, train)
        return textbook_pgd_at_epoch(model, opt, x, y, steps=2)

    benchmark.pedantic(run, rounds=1, iterations=1)


if __name__ == "__main__":
    raise SystemExit(main())
