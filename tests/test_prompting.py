"""fastadv.prompting, units: prompt geometries against an independent construction, label mappings (greedy
assignment, permutation recovery), the frozen LM-VP model, source networks by name, bad input."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastadv.ops
from fastadv.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from fastadv.models import create_model
from fastadv.prompting import (
    FrequencyMapping,
    IterativeMapping,
    LinearMapping,
    LMVPConfig,
    LMVPModel,
    RandomMapping,
    VisualPrompt,
    check_threat_model,
    greedy_assignment,
    label_counts,
    load_source,
    load_threat_model,
    make_mapping,
    natural_accuracy,
    train_lmvp,
)

pytestmark = pytest.mark.usefixtures("one_thread", "restore_method_registry")


# ------------------------------------------------------------------------------------------------------------
# geometries: an independent construction with interpolate + pad + activation + normalisation


def reference_canvas(x, theta, geometry, out, inner, mean, std):
    """The canvas built op by op, as the reference codes do (no fastadv code involved)."""
    act = {"ilm": torch.sigmoid, "tarp": torch.tanh, "pad": lambda t: t}[geometry](theta)
    before = (out - inner + 1) // 2
    after = out - inner - before
    pads = (before, after, before, after)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    window = F.pad(torch.ones(1, 1, inner, inner, dtype=x.dtype), pads)  # 1 where the image is
    if geometry == "pad":
        img = F.interpolate(x, size=(out, out), mode="bilinear", align_corners=False)
        return (img - m) / s + act * (1 - window)
    img = x if x.shape[-1] == inner else F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False)
    if geometry == "tarp":
        img = (img - m) / s
    canvas = F.pad(img, pads) + act * (1 - window)
    if geometry == "ilm":
        canvas = (canvas - m) / s
    return canvas


GEOMETRY_CASES = {
    # name: (VisualPrompt kwargs, image size, inner size, out size)
    "ilm": ({"out_size": 32, "image_size": 16}, 16, 16, 32),
    "ilm_odd": ({"out_size": 31, "image_size": 16}, 16, 16, 31),
    "tarp": ({"out_size": 32, "rescale": 24}, 16, 24, 32),
    "tarp_odd": ({"out_size": 31, "rescale": 20}, 12, 20, 31),
    "tarp_down": ({"out_size": 32, "rescale": 20}, 28, 20, 32),
    "pad": ({"out_size": 32, "pad_width": 6}, 16, 20, 32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(GEOMETRY_CASES))
def test_canvas_matches_independent_construction(case, dtype):
    geometry = case.split("_")[0]
    kwargs, size, inner, out = GEOMETRY_CASES[case]
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if geometry == "tarp" else (IMAGENET_MEAN, IMAGENET_STD)
    g = torch.Generator().manual_seed(sorted(GEOMETRY_CASES).index(case))
    prompt = VisualPrompt(geometry, **kwargs).to(dtype)
    with torch.no_grad():
        prompt.prompt.copy_(torch.randn(prompt.prompt.shape, generator=g, dtype=dtype))
    assert prompt.inner_size == inner and prompt.prompt.shape == (3, out, out)
    x = torch.rand(3, 3, size, size, generator=g, dtype=dtype).requires_grad_(True)
    theta = prompt.prompt.detach().clone().requires_grad_(True)

    canvas = prompt(x)
    expected = reference_canvas(x, theta, geometry, out, inner, mean, std)
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    assert canvas.shape == (3, 3, out, out) and canvas.dtype == dtype
    torch.testing.assert_close(canvas, expected, **tol)

    upstream = torch.randn(canvas.shape, generator=g, dtype=dtype)
    gx, gp = torch.autograd.grad((canvas * upstream).sum(), (x, prompt.prompt))
    rx, rp = torch.autograd.grad((expected * upstream).sum(), (x, theta))
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gp, rp, **tol)


def test_every_geometry_runs_one_prompt_pad(monkeypatch):
    calls = []
    real = fastadv.ops.prompt_pad

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastadv.ops, "prompt_pad", counting)
    expected = {"ilm": ("sigmoid", "replace", "canvas"), "tarp": ("tanh", "replace", "image"),
                "pad": ("none", "add", "image")}
    for geometry, (activation, mode, normalize) in expected.items():
        calls.clear()
        VisualPrompt(geometry, out_size=32, image_size=16, rescale=24, pad_width=6)(torch.rand(2, 3, 16, 16))
        assert len(calls) == 1
        assert (calls[0]["activation"], calls[0]["mode"], calls[0]["normalize"]) == (activation, mode, normalize)


def test_geometry_defaults_follow_the_specs():
    ilm = VisualPrompt("ilm")
    assert (ilm.out_size, ilm.inner_size, ilm.offset) == (224, 32, 96)
    assert torch.equal(ilm.prompt, torch.zeros(3, 224, 224))  # theta = 0
    assert ilm.mean == IMAGENET_MEAN and ilm.normalize == "canvas"
    assert torch.all(ilm.activated() == 0.5)

    tarp = VisualPrompt("tarp")
    assert (tarp.inner_size, tarp.offset) == (192, 16)  # the 16-px border
    assert tarp.activation == "tanh" and tarp.normalize == "image" and tarp.mean == CIFAR10_MEAN
    assert int(tarp.border_mask().sum()) == 224 * 224 - 192 * 192
    no_border = VisualPrompt("tarp", rescale=224)
    assert not no_border.border_mask().any()

    pad = VisualPrompt("pad", generator=0)
    assert (pad.mode, pad.activation, pad.inner_size) == ("add", "none", 224 - 60)
    assert 0.9 < float(pad.prompt.detach().std()) < 1.1  # randn init
    assert torch.equal(pad.prompt, VisualPrompt("pad", generator=0).prompt)
    assert pad.mean == IMAGENET_MEAN and pad.normalize == "image"

    bare = VisualPrompt("tarp", out_size=32, rescale=24, mean=None, std=None)
    x = torch.rand(1, 3, 16, 16)
    out = bare(x)
    torch.testing.assert_close(out[:, :, 4:28, 4:28], F.interpolate(x, size=(24, 24), mode="bilinear"))


def test_ilm_rejects_images_larger_than_the_inner_size():
    prompt = VisualPrompt("ilm", out_size=32, image_size=16)
    with pytest.raises(ValueError, match=r"`x` is 20x20, larger than the inner size `image_size`=16"):
        prompt(torch.rand(1, 3, 20, 20))
    with pytest.raises(ValueError, match="native size"):
        prompt(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="`image_size` 40 is larger than the canvas `out_size` 32"):
        VisualPrompt("ilm", out_size=32, image_size=40)


@pytest.mark.parametrize("kwargs, match", [
    ({"geometry": "spiral"}, "unknown `geometry` 'spiral'"),
    ({"geometry": "tarp", "rescale": 300}, "`rescale` 300 is larger"),
    ({"geometry": "pad", "pad_width": 112}, "`pad_width` 112 leaves no image window"),
    ({"geometry": "tarp", "mean": (0.5, 0.5, 0.5)}, "give both `mean` and `std`"),
    ({"geometry": "tarp", "mean": (0.5,), "std": (0.2,)}, "`mean` needs one value per channel"),
    ({"geometry": "tarp", "mean": (0.5,) * 3, "std": (0.2, 0.0, 0.2)}, "`std` must be positive"),
    ({"geometry": "ilm", "init": "ones"}, "unknown `init`"),
    ({"geometry": "ilm", "out_size": 0}, "`out_size` must be an integer >= 1"),
])
def test_prompt_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisualPrompt(**kwargs)


def test_prompt_bad_input_channels():
    with pytest.raises(ValueError, match="`x` has 1 channels"):
        VisualPrompt("tarp", out_size=32, rescale=24)(torch.rand(2, 1, 16, 16))


# ------------------------------------------------------------------------------------------------------------
# greedy assignment and counting


def python_greedy(counts):
    """Independent reference: visit cells by (count desc, row asc, column asc), keep the first free pair."""
    rows, cols = len(counts), len(counts[0])
    cells = sorted(((counts[r][c], r, c) for r in range(rows) for c in range(cols)), key=lambda t: (-t[0], t[1], t[2]))
    used_rows, index = set(), [None] * cols
    for _, r, c in cells:
        if r not in used_rows and index[c] is None:
            used_rows.add(r)
            index[c] = r
    return index


@pytest.mark.parametrize("counts, expected", [
    # every target has its own clear winner
    ([[5, 0], [0, 7], [1, 1]], [0, 1]),
    # greedy, not the best total: 9 at (0, 0) is taken first, although 8 + 7 > 9 + 1
    ([[9, 8], [7, 1]], [0, 1]),
    # a source row is removed once used: target 1 cannot take source 0 again
    ([[9, 8], [0, 1], [0, 5]], [0, 2]),
    # ties: the first maximum in row-major order (lowest source, then lowest target) wins
    ([[3, 3], [3, 3]], [0, 1]),
    ([[5, 5], [5, 0]], [0, 1]),  # (0, 0) before (0, 1) and (1, 0)
    ([[5, 5], [0, 0]], [0, 1]),  # lowest target first among a source's tied counts
    ([[0, 2], [2, 2], [2, 0]], [1, 0]),  # lowest source first: (0, 1) beats (1, 0), (1, 1) and (2, 0)
    ([[1, 4, 4], [4, 0, 0], [0, 0, 4]], [1, 0, 2]),
    # all-zero counts: targets take sources 0, 1, ... in order
    ([[0, 0], [0, 0], [0, 0], [0, 0]], [0, 1]),
    # target columns with no examples still get a (free) source
    ([[0, 6, 0], [0, 0, 0], [2, 0, 0], [0, 0, 0]], [2, 0, 1]),
])
def test_greedy_assignment_hand_made(counts, expected):
    index = greedy_assignment(torch.tensor(counts))
    assert index.dtype == torch.int64
    assert index.tolist() == expected
    assert python_greedy(counts) == expected  # the reference agrees with the hand-worked answer
    assert greedy_assignment(torch.tensor(counts, dtype=torch.float32)).tolist() == expected


def test_greedy_assignment_matches_reference_on_random_counts():
    rng = random.Random(0)
    for _ in range(30):
        n_source, n_target = rng.randint(1, 9), 0
        n_target = rng.randint(1, n_source)
        counts = [[rng.randint(0, 4) for _ in range(n_target)] for _ in range(n_source)]  # many ties
        index = greedy_assignment(torch.tensor(counts)).tolist()
        assert index == python_greedy(counts)
        assert len(set(index)) == n_target


def test_greedy_assignment_bad_counts():
    with pytest.raises(ValueError, match="n_target"):
        greedy_assignment(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-negative"):
        greedy_assignment(torch.tensor([[1, -1], [0, 2]]))


def test_label_counts_is_a_joint_histogram():
    g = torch.Generator().manual_seed(0)
    pred, y = torch.randint(0, 6, (200,), generator=g), torch.randint(0, 4, (200,), generator=g)
    counts = label_counts(pred, y, 6, 4)
    expected = torch.zeros(6, 4, dtype=torch.int64)
    for p, t in zip(pred.tolist(), y.tolist()):
        expected[p, t] += 1
    assert torch.equal(counts, expected)


# ------------------------------------------------------------------------------------------------------------
# mappings


def test_random_mapping_is_fixed_and_injective():
    a, b = RandomMapping(20, 10, generator=3), RandomMapping(20, 10, generator=3)
    assert torch.equal(a.index, b.index)
    assert a.index.unique().numel() == 10 and int(a.index.max()) < 20
    logits = torch.randn(4, 20)
    assert torch.equal(a(logits), logits[:, a.index])
    assert list(a.parameters()) == []


@pytest.mark.parametrize("kind", ["rlm", "flm", "ilm"])
def test_one_to_one_mapping_needs_enough_source_classes(kind):
    with pytest.raises(ValueError, match=r"`n_target`=12 target classes exceed the `n_source`=10"):
        make_mapping(kind, 10, 12)
    assert isinstance(make_mapping("linear", 10, 12), LinearMapping)  # a learned mapping has no such limit


def test_lmvp_model_rejects_more_targets_than_sources():
    with pytest.raises(ValueError, match="`n_target`=20"):
        LMVPModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), VisualPrompt("ilm", out_size=32,
                  image_size=16), "flm", n_target=20, n_source=10)


def test_mapping_checks_the_source_width():
    model = LMVPModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8)),
                      VisualPrompt("ilm", out_size=32, image_size=16), "rlm", n_target=4, n_source=10)
    with pytest.raises(ValueError, match=r"expects \(B, n_source=10\)"):
        model(torch.rand(2, 3, 16, 16))


def permutation_task(n_source=7, n_target=5, size=16, out=32, per_class=10, seed=0):
    """Target images of ``n_target`` random +-1 templates; a hand-built linear source network that classifies
    the template of target class c (placed natively in the canvas) as source class ``perm[c]``."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 2, (n_target, 3, size, size), generator=g).float() * 2 - 1
    perm = torch.randperm(n_source, generator=g)[:n_target]
    y = torch.arange(n_target).repeat_interleave(per_class)
    x = (0.5 + 0.25 * templates[y] + 0.05 * torch.randn(y.shape[0], 3, size, size, generator=g)).clamp(0, 1)
    weight = torch.zeros(n_source, 3, out, out)
    top = (out - size + 1) // 2
    weight[perm, :, top:top + size, top:top + size] = templates
    source = nn.Sequential(nn.Flatten(), nn.Linear(3 * out * out, n_source))
    with torch.no_grad():
        source[1].weight.copy_(0.01 * weight.flatten(1))
        source[1].bias.zero_()
    return x, y, perm, source


@pytest.mark.parametrize("kind", ["flm", "ilm"])
def test_frequency_mappings_recover_a_known_permutation(kind):
    x, y, perm, source = permutation_task()
    model = LMVPModel(source, VisualPrompt("ilm", out_size=32, image_size=16), kind, n_target=5, n_source=7)
    assert model.mapping.needs_fit
    counts = model.mapping.fit(model, (x, y), batch_size=16)
    assert counts.shape == (7, 5) and int(counts.sum()) == 50
    assert torch.equal(model.mapping.index, perm)
    assert not model.mapping.needs_fit
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), y)


def test_ilm_refits_every_epoch_and_flm_once():
    x, y, perm, source = permutation_task()
    config = LMVPConfig(geometry="ilm", optimizer="adam", lr=0.01, epochs=3, batch_size=25, schedule="constant",
                        mia=False)
    fits = {}
    for kind, cls in (("ilm", IterativeMapping), ("flm", FrequencyMapping)):
        model = LMVPModel(source, VisualPrompt("ilm", out_size=32, image_size=16), kind, n_target=5, n_source=7)
        assert isinstance(model.mapping, cls)
        history = train_lmvp(model, (x, y), config)
        fits[kind] = (model.mapping.fits, [h["mapping_refit"] for h in history])
        assert torch.equal(model.mapping.index, perm)
    assert fits["ilm"] == (3, [True, True, True])
    assert fits["flm"] == (1, [True, False, False])


def test_prompt_and_linear_mapping_learn_a_permuted_task():
    x, y, perm, source = permutation_task(per_class=8)
    torch.manual_seed(0)  # the Linear mapping's initialisation
    model = LMVPModel(source, VisualPrompt("ilm", out_size=32, image_size=16), "linear", n_target=5, n_source=7)
    assert natural_accuracy(model, (x, y)) <= 0.4  # a random linear map (chance: 0.2)
    config = LMVPConfig.tarp_vp(geometry="ilm", epochs=6, batch_size=20, lr=0.05, mia=False)
    history = train_lmvp(model, (x, y), config, eval_data=(x, y))
    assert history[-1]["nat_acc"] == 1.0
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert [round(h["lr"], 6) for h in history] == [0.05, 0.05, 0.035, 0.035, 0.0245, 0.0245]


# ------------------------------------------------------------------------------------------------------------
# the frozen source


def small_source(num_classes=12, seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=num_classes, width=4)


def test_source_is_frozen_in_eval_mode_and_not_copied():
    source = small_source()
    pointers = [p.data_ptr() for p in source.parameters()]
    stats = source.block1[1].running_mean.clone()
    model = LMVPModel(source, VisualPrompt("tarp", out_size=32, rescale=24), "linear", n_target=10, n_source=12)
    assert model.source is source
    assert all(not p.requires_grad for p in source.parameters())
    model.train()
    assert model.training and model.prompt.training and model.mapping.training
    assert not source.training and not any(m.training for m in source.modules())
    source.train()  # even when someone switches the source itself
    model(torch.rand(4, 3, 16, 16))
    assert not source.training
    assert torch.equal(source.block1[1].running_mean, stats)  # BatchNorm statistics untouched
    assert [p.data_ptr() for p in model.source.parameters()] == pointers
    assert {id(p) for p in model.trainable_parameters()} == {id(model.prompt.prompt)} | {
        id(p) for p in model.mapping.parameters()}
    assert set(model.trainable_state_dict()) == {"prompt", "mapping"}


def test_channels_last_canvas():
    model = LMVPModel(small_source(), VisualPrompt("tarp", out_size=32, rescale=24), "linear", n_target=10,
                      n_source=12, channels_last=True)
    canvas = model.canvas(torch.rand(2, 3, 16, 16))
    assert canvas.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)


# ------------------------------------------------------------------------------------------------------------
# source networks by name


def test_source_by_name_from_each_library(tmp_path):
    timm_model = load_source("timm:resnet18", num_classes=10)
    assert type(timm_model).__name__ == "TimmModel" and timm_model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    tv_model = load_source("torchvision:resnet18", num_classes=10)
    assert type(tv_model).__module__.startswith("torchvision")
    own = load_source("small_cnn", num_classes=10, width=4)  # not a timm / torchvision name: fastadv's
    assert type(own).__name__ == "SmallCNN"
    # a local weights file: timm's pretrained loader (classifier adapted) and a strict full state dict
    path = tmp_path / "rn18.pth"
    torch.save(timm_model.model.state_dict(), path)
    again = load_source("timm:resnet18", num_classes=10, pretrained=True, checkpoint_path=path)
    assert torch.equal(again.model.conv1.weight, timm_model.model.conv1.weight)
    tv_path = tmp_path / "tv.pth"
    torch.save(tv_model.state_dict(), tv_path)
    tv_again = load_source("torchvision:resnet18", num_classes=10, checkpoint_path=tv_path)
    assert torch.equal(tv_again.fc.weight, tv_model.fc.weight)
    module = nn.Linear(3, 3)
    assert load_source(module) is module


def test_unknown_backbone_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown `source` network 'resnet_does_not_exist'"):
        load_source("resnet_does_not_exist")
    with pytest.raises(ValueError, match=r"unknown `source` network 'torchvision:small_cnn'.*in torchvision"):
        load_source("torchvision:small_cnn")
    with pytest.raises(ValueError, match="unknown `source` network"):
        LMVPModel("not_a_network", VisualPrompt("ilm"), "rlm", n_target=10)


def test_pretrained_without_a_local_file_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    with pytest.raises(ValueError, match="pretrained=True for timm model 'resnet18'.*never downloads"):
        load_source("timm:resnet18", pretrained=True)
    with pytest.raises(ValueError, match="pretrained=True for torchvision model 'resnet18'.*never downloads"):
        load_source("torchvision:resnet18", pretrained=True)
    # a file already in torch's hub cache is used
    import torchvision

    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "torch" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cached)
    loaded = load_source("torchvision:resnet18", pretrained=True)
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)


# ------------------------------------------------------------------------------------------------------------
# threat models


def test_threat_model_with_the_wrong_number_of_classes():
    model = LMVPModel(small_source(), VisualPrompt("tarp", out_size=32, rescale=24), "linear", n_target=10,
                      n_source=12)
    sample = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"`threat_model` returns \(1, 7\).*10 classes"):
        check_threat_model(small_source(num_classes=7), 10, sample, target=model)
    with pytest.raises(ValueError, match="`threat_model` shares modules"):
        check_threat_model(model, 10, sample, target=model)
    check_threat_model(small_source(num_classes=10), 10, sample, target=model)  # fine
    config = LMVPConfig(method="transfer_at", epochs=1, batch_size=4, steps=1, mia=False)
    with pytest.raises(ValueError, match=r"`threat_model` returns \(1, 7\)"):
        train_lmvp(model, (sample, torch.tensor([0, 1])), config, threat_model=small_source(num_classes=7))
    with pytest.raises(ValueError, match="'transfer_at' needs `threat_model`"):
        train_lmvp(model, (sample, torch.tensor([0, 1])), config)


def test_threat_model_by_name_needs_trained_weights(tmp_path):
    with pytest.raises(ValueError, match="`threat_model` 'resnet18' needs checkpoint_path"):
        load_threat_model("resnet18", num_classes=10)
    path = tmp_path / "threat.pt"
    torch.save(create_model("small_cnn", num_classes=7, width=4).state_dict(), path)
    with pytest.raises(ValueError, match="does not match the model"):
        load_threat_model("small_cnn", num_classes=10, checkpoint_path=path, width=4)
    assert load_threat_model("small_cnn", num_classes=7, checkpoint_path=path, width=4).head.out_features == 7
    with pytest.raises(ValueError, match="LMVPConfig.threat_checkpoint"):
        LMVPConfig(threat_model="resnet18")


@pytest.mark.parametrize("field, value", [("geometry", "spiral"), ("mapping", "hungarian"), ("method", "trades"),
                                          ("amp", "fp16"), ("rescale", 300), ("milestones", (0.8, 0.5)),
                                          ("eval_attacks", ("pgd7",)), ("lr", 0.0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"LMVPConfig.{field}"):
        LMVPConfig(**{field: value})
