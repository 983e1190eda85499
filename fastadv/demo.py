"""The offline demo: the whole toolkit on an embedded real dataset, end to end, in a few minutes on a CPU.

1. Train three small CNNs on scikit-learn's handwritten digits (8×8 scans, upsampled to 32×32×3): standard
   training, PGD-AT, and PART (pixel-reweighted AT: PGD-AT warm-up, then CAM masks give important pixels the
   larger budget).
2. Evaluate each on the test split: natural accuracy, PGD-20, CW-20 and APGD-CE, with confidence intervals.
3. Measure membership inference on each (oracle confidence-threshold attack: AUC, TPR at 1 % FPR) on natural
   inputs and on PGD examples of every member and non-member.
4. Reprogram the trained standard model with a learned visual prompt and an iterative label mapping (LM-VP)
   for a second task made from the same data: the digits relabelled by a random permutation, shown smaller.
5. Write ``report.md`` with plots (accuracy curves, ROC curves, PART masks, the learned prompt), metrics JSON and
   CSV, and print a results table.

``DemoConfig(dataset="cifar10", data_dir=..., device="cuda", model="resnet18", epochs=...)`` scales it up.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .utils import resolve_device


@dataclass
class DemoConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    device: str = "auto"
    model: str = "small_cnn"
    model_kwargs: dict = field(default_factory=lambda: {"width": 16})
    epochs: int = 8
    part_warmup_epochs: int = 4
    batch_size: int = 64
    lr: float = 0.05
    eps: float = 8 / 255
    alpha: float = 2 / 255
    train_steps: int = 10  # PGD steps of the inner maximisation
    eval_limit: int | None = None  # test examples evaluated (None: all)
    pgd_steps: int = 20
    cw_steps: int = 20
    apgd_steps: int = 100
    mia_members: int | None = None  # training examples used as members (None: as many as non-members)
    lmvp_epochs: int = 6
    lmvp_inner: int = 24  # the target images are resized to this inside the source's canvas
    seed: int = 0
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """The reduced configuration CI runs: same pipeline, fewer epochs and iterations."""
        base = dict(epochs=4, part_warmup_epochs=2, eval_limit=200, pgd_steps=10, cw_steps=10, apgd_steps=20,
                    lmvp_epochs=3, train_steps=5)
        return cls(**{**base, **overrides})


def _floats(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _train(cfg: DemoConfig, method: str, train_set, test_set, out: Path, device, **extra):
    from .train import TrainConfig, train

    tc = TrainConfig(method=method, model=cfg.model, model_kwargs=dict(cfg.model_kwargs), dataset=cfg.dataset,
                     data_dir=cfg.data_dir, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                     schedule="cosine", weight_decay=5e-4, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.train_steps,
                     eval_steps=cfg.pgd_steps, eval_subset=cfg.eval_limit or 1000, out_dir=str(out / "models" / method),
                     device=str(device), seed=cfg.seed, progress=cfg.progress,
                     augment=cfg.dataset != "digits", **extra)  # flipping a digit changes what it means
    result = train(tc, train_set=train_set, eval_set=test_set)
    from .train import load_trained_model

    # the final model (PART's best epoch could fall in its PGD-AT warm-up, i.e. not be a PART model at all)
    return load_trained_model(result.last_checkpoint, device=device), result.history


def _evaluate(cfg: DemoConfig, model, x, y, device):
    from .attacks import APGD, PGD
    from .evaluate import robust_accuracy

    def gen():
        return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(cfg.seed)

    attacks = {
        f"PGD-{cfg.pgd_steps}": PGD(model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.pgd_steps, generator=gen()),
        f"CW-{cfg.cw_steps}": PGD(model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.cw_steps, loss="cw", generator=gen()),
        "APGD-CE": APGD(model, eps=cfg.eps, steps=cfg.apgd_steps, generator=gen()),
    }
    return robust_accuracy(model, (x, y), attacks, batch_size=256, device=device, progress=cfg.progress)


def _mia(cfg: DemoConfig, model, members, nonmembers, out: Path, device) -> dict:
    from . import privacy
    from .attacks import PGD

    results = {}
    attack = PGD(model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.pgd_steps,
                 generator=torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(cfg.seed))
    for view, atk in (("natural", None), ("adversarial", attack)):
        kw = dict(names=("confidence",), device=device, attack=atk)
        m = privacy.model_signals(model, members, **kw)
        n = privacy.model_signals(model, nonmembers, **kw)
        report = privacy.evaluate(m, n, out_dir=out / view, metadata={"inputs": view})
        row = report["signals"]["confidence"]
        results[view] = {"auc": row["auc"], "balanced_accuracy": row["balanced_accuracy"],
                         "tpr_at_1pct_fpr": row["tpr_at_fpr"]["0.01"]["tpr"] if "0.01" in row["tpr_at_fpr"]
                         else next(iter(row["tpr_at_fpr"].values()))["tpr"],
                         "regime": row["regime"], "roc_plot": str((out / view / "roc_linear.png"))}
    return results


def _lmvp(cfg: DemoConfig, source, train_set, test_pair, out: Path, device) -> dict:
    from .data.datasets import ImageSet
    from .prompting import LMVPConfig, build_model, evaluate_lmvp, train_lmvp

    # The second task: the same digits, relabelled by a fixed random permutation and shown smaller (resized to
    # `lmvp_inner` inside the source's canvas). The frozen source model is at chance on the new labels until the
    # iterative label mapping and the border prompt adapt it.
    perm = torch.randperm(len(train_set.classes), generator=torch.Generator().manual_seed(cfg.seed + 7))
    classes = tuple(f"task2-{i}" for i in range(len(train_set.classes)))
    tr = ImageSet(_floats(train_set.x), perm[train_set.y], classes, f"{train_set.name}-relabelled")
    te = ImageSet(test_pair[0], perm[test_pair[1]], classes, f"{train_set.name}-relabelled")
    side = int(tr.x.shape[-1])
    lc = LMVPConfig(source="demo_standard_model", source_classes=10, geometry="tarp", out_size=side,
                    rescale=cfg.lmvp_inner, mapping="ilm", dataset=cfg.dataset, method="standard",
                    epochs=cfg.lmvp_epochs, batch_size=cfg.batch_size, optimizer="sam", lr=0.05, eps=cfg.eps,
                    alpha=cfg.alpha, steps=cfg.train_steps, device=str(device), seed=cfg.seed,
                    eval_subset=cfg.eval_limit or 1000, eval_attacks=("pgd10",), transfer_steps=0,
                    mia=False, out_dir=str(out), progress=False)
    with torch.no_grad():  # the source alone, on the target task's labels and canvas size
        small = torch.nn.functional.interpolate(te.x, size=cfg.lmvp_inner, mode="bilinear", align_corners=False)
        pad = (side - cfg.lmvp_inner + 1) // 2
        small = torch.nn.functional.pad(small, (pad, side - cfg.lmvp_inner - pad) * 2)
        before = (source(small.to(device)).argmax(1) == te.y.to(device)).float().mean().item()
    model = build_model(lc, tr, source=source).to(device)
    history = train_lmvp(model, tr, lc)
    result = evaluate_lmvp(model, te, lc)
    return {"source_accuracy_without_prompt": before, "result": result, "history": history, "model": model}


# --- report ---------------------------------------------------------------------------------------------


def _plot_curves(histories: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, hist in histories.items():
        epochs = [h["epoch"] for h in hist if h.get("nat_acc") is not None]
        axes[0].plot(epochs, [h["nat_acc"] for h in hist if h.get("nat_acc") is not None], marker="o", label=name)
        axes[1].plot(epochs, [h.get("pgd_acc") for h in hist if h.get("nat_acc") is not None], marker="o", label=name)
    for ax, title in zip(axes, ("natural accuracy", "PGD accuracy (held-out)")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_masks(model, x, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cam import part_masks

    masks = part_masks(model, x, recipe="jet")
    n = x.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4))
    for i in range(n):
        axes[0, i].imshow(x[i].permute(1, 2, 0).cpu().numpy())
        axes[1, i].imshow(masks[i].float().mean(0).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.axis("off")
    axes[0, 0].set_title("image", fontsize=8, loc="left")
    axes[1, 0].set_title("PART mask (ε_high)", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_prompt(model, x_clean, x_target, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        canvas = model.prompt(x_target).float().cpu()
    canvas = (canvas - canvas.amin(dim=(1, 2, 3), keepdim=True)) / (
        canvas.amax(dim=(1, 2, 3), keepdim=True) - canvas.amin(dim=(1, 2, 3), keepdim=True) + 1e-12)
    n = x_target.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4))
    for i in range(n):
        axes[0, i].imshow(x_target[i].permute(1, 2, 0).cpu().numpy())
        axes[1, i].imshow(canvas[i].permute(1, 2, 0).numpy())
        for ax in axes[:, i]:
            ax.axis("off")
    axes[0, 0].set_title("target task input", fontsize=8, loc="left")
    axes[1, 0].set_title("prompted canvas (rescaled)", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def run_demo(cfg: DemoConfig, out: str | Path) -> dict:
    from .cli.runs import write_csv, write_json
    from .data import get_dataset

    started = time.perf_counter()
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device, what="demo device")
    torch.manual_seed(cfg.seed)
    train_set = get_dataset(cfg.dataset, cfg.data_dir, "train")
    test_set = get_dataset(cfg.dataset, cfg.data_dir, "test")
    x_test, y_test = _floats(test_set.x), test_set.y
    if cfg.eval_limit is not None:
        x_test, y_test = x_test[:cfg.eval_limit], y_test[:cfg.eval_limit]
    x_test, y_test = x_test.to(device), y_test.to(device)
    n_members = cfg.mia_members or len(x_test)
    members = (_floats(train_set.x[:n_members]).to(device), train_set.y[:n_members].to(device))

    models, histories, rows, summary = {}, {}, [], {"config": dataclasses.asdict(cfg), "models": {}}
    methods = {"standard": {}, "pgd_at": {}, "part": {"warmup_epochs": cfg.part_warmup_epochs, "cam_every": 1}}
    timings = summary["timings"] = {}
    for method, extra in methods.items():
        t0 = time.perf_counter()
        model, history = _train(cfg, method, train_set, test_set, out, device, **extra)
        models[method], histories[method] = model, history
        t1 = time.perf_counter()
        rob = _evaluate(cfg, model, x_test, y_test, device)
        t2 = time.perf_counter()
        mia = _mia(cfg, model, members, (x_test, y_test), out / "mia" / method, device)
        timings[method] = {"train": t1 - t0, "attacks": t2 - t1, "mia": time.perf_counter() - t2}
        entry = {"natural": rob.clean.accuracy, **{k: v.accuracy for k, v in rob.per_attack.items()},
                 "worst_case": rob.worst_case.accuracy, "robust_accuracy": rob.as_dict(), "mia": mia}
        summary["models"][method] = entry
        row = {"model": method, "natural": _pct(rob.clean.accuracy)}
        row.update({k: _pct(v.accuracy) for k, v in rob.per_attack.items()})
        row.update({"MIA AUC": f"{mia['natural']['auc']:.4f}", "MIA AUC (adv)": f"{mia['adversarial']['auc']:.4f}",
                    "TPR@1%FPR": _pct(mia["natural"]["tpr_at_1pct_fpr"])})
        rows.append(row)

    t0 = time.perf_counter()
    lm = _lmvp(cfg, models["standard"], train_set, (x_test.cpu(), y_test.cpu()), out / "lmvp", device)
    timings["lmvp"] = time.perf_counter() - t0
    lm_res = lm["result"]
    summary["lmvp"] = {"source_accuracy_without_prompt": lm["source_accuracy_without_prompt"],
                       "natural_accuracy": lm_res["accuracy"]["natural"]["accuracy"],
                       "pgd_accuracy": lm_res["accuracy"].get("pgd10", {}).get("accuracy"), "result": lm_res}

    _plot_curves(histories, out / "plots" / "accuracy_curves.png")
    _plot_masks(models["part"], x_test[:8], out / "plots" / "part_masks.png")
    _plot_prompt(lm["model"], x_test[:8], x_test[:8], out / "plots" / "prompt.png")
    summary["seconds"] = time.perf_counter() - started
    summary["device"] = str(device)
    summary["torch"] = torch.__version__

    cols = list(rows[0].keys())
    table = _table(rows, cols)
    write_json(out / "metrics.json", summary)
    write_csv(out / "metrics.csv", rows)
    report = [
        "# fastadv demo report", "",
        f"Dataset: `{cfg.dataset}` ({len(train_set)} training / {len(x_test)} evaluated test images), model "
        f"`{cfg.model}`, ε = {cfg.eps:.4f} (L∞), {cfg.epochs} epochs, device `{device}`, "
        f"{summary['seconds']:.0f} s in all.", "",
        "## Robustness and privacy", "",
        "Accuracies in %. An MIA AUC near 0.5 means no measurable membership leakage (this small, regularised model "
        "is about as confident on its training images as on unseen ones). MIA: oracle confidence-threshold attack (the best threshold on the evaluated data, an "
        f"upper bound), members = the first {n_members} training images, non-members = the evaluated test images; "
        "`(adv)` = the same attack on PGD examples of both sets.", "",
        table, "",
        "PART changes the model (its budgets are 8/255 on CAM-important pixels and 7/255 elsewhere after the "
        f"{cfg.part_warmup_epochs}-epoch PGD-AT warm-up), but on a small, nearly saturated test set its counts of "
        "correct answers can coincide with PGD-AT's; the confidence-based MIA numbers still tell them apart.", "",
        "![accuracy curves](plots/accuracy_curves.png)", "",
        "ROC curves of the membership-inference attack (natural inputs):", "",
        *[f"![{m} ROC](mia/{m}/natural/roc_linear.png)" for m in methods], "",
        "## PART importance masks", "",
        "Grad-CAM of the PART model, reference recipe (bicubic upsampling, jet colour map, per-image "
        "standardisation, threshold 1): white pixels get ε_high, the rest ε_low.", "",
        "![PART masks](plots/part_masks.png)", "",
        "## Visual prompting (LM-VP)", "",
        f"The standard model, frozen, reprogrammed for a second task made from the same data: the digits relabelled "
        f"by a fixed random permutation, shown at {cfg.lmvp_inner} px inside the {int(x_test.shape[-1])}-pixel canvas "
        f"with a `tarp` prompt (tanh border) and the iterative label mapping (`ilm`). Accuracy on the new labels: "
        f"{_pct(lm['source_accuracy_without_prompt'])} % for the source model alone, "
        f"{_pct(summary['lmvp']['natural_accuracy'])} % reprogrammed "
        f"(PGD-10: {_pct(summary['lmvp']['pgd_accuracy'])} %).", "",
        "![prompt](plots/prompt.png)", "",
    ]
    (out / "report.md").write_text("\n".join(report))
    summary["table"] = table
    return summary


def config_from_dict(values: dict) -> DemoConfig:
    from .cli.config import build

    return build(DemoConfig, values, what="demo config")


def to_json(summary: dict) -> str:
    return json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2, default=str)
