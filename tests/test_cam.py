"""fastadv.cam against independent computations: PIL's resize, matplotlib's jet, a per-image numpy/PIL
PART mask, and hand-computed Grad-CAM / XGradCAM / LayerCAM."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastadv.cam import (
    XGRADCAM_EPS,
    apply_jet,
    compute_cam,
    jet_table,
    masks_from_cams,
    part_masks,
    resize_bicubic_pil,
)
from fastadv.data import get_dataset
from fastadv.models import create_model, with_normalization

JET = matplotlib.colormaps["jet"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pil_resize(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32))
    assert img.mode == "F"
    return np.asarray(img.resize((width, height), Image.BICUBIC))


def _hand_made_cams() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:7, 0:7].astype(np.float32)
    hot = np.zeros((8, 8), np.float32)
    hot[2, 5] = 3.0
    rng = np.random.default_rng(7)
    return {
        "blob": np.exp(-((yy - 2.0) ** 2 + (xx - 4.5) ** 2) / 3.0).astype(np.float32),
        "ramp": np.tile(np.linspace(0.0, 2.0, 8, dtype=np.float32), (8, 1)),
        "checker": (np.indices((4, 4)).sum(0) % 2).astype(np.float32) * 0.7 + 0.1,
        "hot_pixel": hot,
        "random": rng.random((8, 8)).astype(np.float32) ** 3,
        "zeros": np.zeros((8, 8), np.float32),
        "constant": np.full((8, 8), 2.5, np.float32),
    }


# --------------------------------------------------------------------------------------------------
# bicubic resampling and the jet table


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [((8, 8), (32, 32)), ((4, 4), (32, 32)), ((7, 5), (24, 32)), ((3, 9), (64, 13)), ((16, 16), (5, 7))],
)
def test_bicubic_matches_pil_float_images(in_hw, out_hw):
    rng = np.random.default_rng(sum(in_hw) * 31 + sum(out_hw))
    yy, xx = np.mgrid[0 : in_hw[0], 0 : in_hw[1]]
    blob = np.exp(-((yy - in_hw[0] / 3) ** 2 + (xx - in_hw[1] / 2) ** 2) / 2.0)
    cams = [rng.random(in_hw).astype(np.float32) * 5 - 1, blob.astype(np.float32)]
    ours = resize_bicubic_pil(torch.from_numpy(np.stack(cams)), out_hw).numpy()
    for i, cam in enumerate(cams):
        ref = _pil_resize(cam, *out_hw)
        np.testing.assert_allclose(ours[i], ref, rtol=1e-5, atol=1e-6)


def test_bicubic_hand_made_cams_and_batch_leading_dims():
    cams = _hand_made_cams()
    for name in ("blob", "ramp", "checker", "hot_pixel"):
        ref = _pil_resize(cams[name], 32, 32)
        ours = resize_bicubic_pil(torch.from_numpy(cams[name]), (32, 32)).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6, err_msg=name)
    stacked = torch.stack([torch.from_numpy(cams["ramp"])] * 6).view(2, 3, 8, 8)
    out = resize_bicubic_pil(stacked, 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32


def test_jet_table_equals_matplotlib():
    expected = JET(np.arange(256))[:, :3]
    np.testing.assert_allclose(jet_table().numpy(), expected, rtol=0, atol=1e-15)


def test_apply_jet_indexes_like_matplotlib():
    rng = np.random.default_rng(3)
    edges = np.concatenate([np.arange(257) / 256, np.arange(256) / 255, [0.0, 1.0, -0.01, -5.0, 1.0001, 7.0]])
    values = np.concatenate([rng.random(2000), edges]).astype(np.float32)
    ours = apply_jet(torch.from_numpy(values)).numpy()
    np.testing.assert_allclose(ours, JET(values)[:, :3], rtol=0, atol=1e-15)
    grid = torch.from_numpy(values[:1200].reshape(2, 30, 20))
    assert apply_jet(grid).shape == (2, 30, 20, 3)


# --------------------------------------------------------------------------------------------------
# PART masks against a slow per-image numpy/PIL computation of the reference recipe


def _reference_mask(cam: np.ndarray, height: int, width: int, recipe: str) -> np.ndarray:
    cam = cam.astype(np.float32)
    lo, hi = cam.min(), cam.max()
    channels = 3 if recipe == "jet" else 1
    if hi == lo:
        return np.zeros((channels, height, width), dtype=bool)
    up = _pil_resize((cam - lo) / (hi - lo), height, width)
    if recipe == "jet":
        values = JET(up * up)[..., :3].transpose(2, 0, 1)
    else:
        values = up[None].astype(np.float64)
    z = (values - values.mean()) / values.std()
    return z > 1


@pytest.mark.parametrize("recipe", ["jet", "cam"])
def test_masks_equal_slow_reference(recipe):
    cams = _hand_made_cams()
    for size in ((32, 32), (24, 40)):
        same_shape = {k: v for k, v in cams.items() if v.shape == (8, 8)}
        batch = torch.from_numpy(np.stack(list(same_shape.values())))
        masks = masks_from_cams(batch, size, recipe=recipe)
        channels = 3 if recipe == "jet" else 1
        assert masks.dtype == torch.bool and masks.shape == (len(same_shape), channels, *size)
        for i, (name, cam) in enumerate(same_shape.items()):
            expected = _reference_mask(cam, *size, recipe)
            np.testing.assert_array_equal(masks[i].numpy(), expected, err_msg=f"{name} {size}")
    for name in ("blob", "checker"):  # other CAM sizes, one per call
        mask = masks_from_cams(torch.from_numpy(cams[name])[None], (32, 32), recipe=recipe)[0]
        np.testing.assert_array_equal(mask.numpy(), _reference_mask(cams[name], 32, 32, recipe), err_msg=name)


def test_jet_masks_are_per_channel_and_nontrivial():
    cam = torch.from_numpy(_hand_made_cams()["blob"])[None]
    mask = masks_from_cams(cam, (32, 32))
    counts = mask[0].flatten(1).sum(1)
    assert (counts > 0).any() and (counts < 32 * 32).all()
    assert not torch.equal(mask[0, 0], mask[0, 2])  # red and blue mark different pixels


def test_constant_cams_give_all_false_masks():
    cams = torch.stack([torch.zeros(8, 8), torch.full((8, 8), 2.5), torch.full((8, 8), -1.0)])
    for recipe in ("jet", "cam"):
        assert not masks_from_cams(cams, (32, 32), recipe=recipe).any()


def test_mask_argument_errors():
    with pytest.raises(ValueError, match="recipe"):
        masks_from_cams(torch.rand(1, 4, 4), 8, recipe="viridis")
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        masks_from_cams(torch.rand(4, 4), 8)


# --------------------------------------------------------------------------------------------------
# CAM methods against hand computations


class TinyNet(nn.Module):
    """conv–ReLU, the target block (conv–ReLU), a 1×1 conv with tanh, global mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.target = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1, stride=2), nn.ReLU())
        self.post = nn.Conv2d(5, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        a = self.target(F.relu(self.conv1(x)))
        b = torch.tanh(self.bn(self.post(a)))
        return self.head(b.mean(dim=(2, 3)))


class LinearHeadNet(nn.Module):
    """The target block feeds global average pooling and a linear layer directly."""

    def __init__(self) -> None:
        super().__init__()
        self.target = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.target(x).mean(dim=(2, 3)))


def _tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics so eval mode matters
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net, torch.rand(4, 3, 10, 10)


def _hand_activations_and_grads(net: TinyNet, x: torch.Tensor, labels: torch.Tensor):
    """Functional forward written out by hand, eval-mode BN, one sample at a time."""
    acts, grads, logits_all = [], [], []
    for i in range(x.shape[0]):
        h = F.relu(F.conv2d(x[i : i + 1], net.conv1.weight, net.conv1.bias, padding=1))
        conv = net.target[0]
        a = F.relu(F.conv2d(h, conv.weight, conv.bias, padding=1, stride=2)).detach().requires_grad_(True)
        b = F.conv2d(a, net.post.weight, net.post.bias)
        bn = net.bn
        b = (b - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
        b = torch.tanh(b * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
        logits = F.linear(b.mean(dim=(2, 3)), net.head.weight, net.head.bias)
        (g,) = torch.autograd.grad(logits[0, labels[i]], a)
        acts.append(a.detach()[0])
        grads.append(g[0])
        logits_all.append(logits.detach()[0])
    return torch.stack(acts), torch.stack(grads), torch.stack(logits_all)


def _hand_cam(method: str, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    out = []
    for a, g in zip(acts.double(), grads.double()):
        if method == "gradcam":
            w = torch.tensor([g[k].mean() for k in range(a.shape[0])], dtype=torch.float64)
            cam = sum(w[k] * a[k] for k in range(a.shape[0]))
        elif method == "xgradcam":
            w = torch.tensor(
                [(a[k] * g[k]).sum() / (a[k].sum() + XGRADCAM_EPS) for k in range(a.shape[0])], dtype=torch.float64
            )
            cam = sum(w[k] * a[k] for k in range(a.shape[0]))
        else:
            cam = sum(torch.clamp(g[k], min=0) * a[k] for k in range(a.shape[0]))
        out.append(torch.clamp(cam, min=0))
    return torch.stack(out).float()


@pytest.mark.parametrize("method", ["gradcam", "xgradcam", "layercam"])
def test_cam_equals_hand_computation(method):
    net, x = _tiny_setup()
    net.train()  # compute_cam must switch to eval mode itself
    with torch.no_grad():
        net.eval()
        predicted = net(x).argmax(1)
        net.train()
    acts, grads, _ = _hand_activations_and_grads(net, x, predicted)
    cams = compute_cam(net, x, "target", method=method)
    assert cams.shape == (4, 5, 5) and cams.dtype == torch.float32
    torch.testing.assert_close(cams, _hand_cam(method, acts, grads), rtol=1e-5, atol=1e-6)

    labels = torch.tensor([2, 0, 1, 2])
    acts, grads, _ = _hand_activations_and_grads(net, x, labels)
    cams = compute_cam(net, x, net.target, method=method, target=labels)
    torch.testing.assert_close(cams, _hand_cam(method, acts, grads), rtol=1e-5, atol=1e-6)


def test_cam_with_linear_head_is_the_classic_formula():
    torch.manual_seed(1)
    net = LinearHeadNet()
    x = torch.rand(3, 3, 6, 6)
    acts = net.target(x).detach()
    labels = net(x).argmax(1)
    w = net.head.weight.detach()[labels] / (6 * 6)  # ∂y_c/∂A_k[i,j] = W[c, k] / (h·w), constant in space
    per_channel = w[:, :, None, None] * acts
    expected = {
        "gradcam": per_channel.sum(1).clamp(min=0),
        "layercam": (w.clamp(min=0)[:, :, None, None] * acts).sum(1).clamp(min=0),
        "xgradcam": (per_channel * (acts.sum((2, 3)) / (acts.sum((2, 3)) + XGRADCAM_EPS))[:, :, None, None])
        .sum(1)
        .clamp(min=0),
    }
    for method, ref in expected.items():
        torch.testing.assert_close(compute_cam(net, x, "target", method=method), ref, rtol=1e-5, atol=1e-7)


def test_batched_cam_equals_per_sample_and_leaves_model_untouched():
    torch.manual_seed(2)
    model = create_model("small_cnn", width=4)
    model.train()
    model.block2.eval()  # a mixed train/eval state must come back exactly
    frozen = model.block1[0].weight
    frozen.requires_grad_(False)
    stats_before = model.block1[1].running_mean.clone()
    x = torch.rand(5, 3, 32, 32)
    for method in ("gradcam", "xgradcam", "layercam"):
        batched = compute_cam(model, x, method=method)
        assert batched.shape == (5, 8, 8)
        singles = torch.cat([compute_cam(model, x[i : i + 1], method=method) for i in range(5)])
        torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-6)
    assert model.training and not model.block2.training and model.block3.training
    assert all(m.training for m in model.block1.modules())
    assert not frozen.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "block1.0.weight")
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model.block1[1].running_mean, stats_before, rtol=0, atol=0)


def test_cam_does_not_touch_input_grad_and_works_under_no_grad():
    net, x = _tiny_setup()
    x.requires_grad_(True)
    with torch.no_grad():
        cams = compute_cam(net, x, "target")
    assert x.grad is None and cams.shape == (4, 5, 5) and not cams.requires_grad


def test_part_masks_end_to_end_with_normalized_model():
    torch.manual_seed(3)
    model = with_normalization(create_model("small_cnn", width=4), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    x = torch.rand(3, 3, 32, 32)
    for method in ("gradcam", "layercam"):
        cams = compute_cam(model, x, method=method)
        for recipe, channels in (("jet", 3), ("cam", 1)):
            masks = part_masks(model, x, method=method, recipe=recipe)
            assert masks.dtype == torch.bool and masks.shape == (3, channels, 32, 32)
            assert torch.equal(masks, masks_from_cams(cams, (32, 32), recipe=recipe))
    by_name = compute_cam(model, x, "1.block3")
    torch.testing.assert_close(by_name, compute_cam(model, x), rtol=0, atol=0)


def test_layout_and_bf16_passes_agree_with_the_float32_nchw_pass():
    torch.manual_seed(4)
    model = create_model("resnet18", width=8).eval()
    x = get_dataset("digits", split="test").x[:16]
    nchw = compute_cam(model, x, channels_last=False)
    torch.testing.assert_close(compute_cam(model, x, channels_last=True), nchw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compute_cam(model, x), nchw, rtol=1e-4, atol=1e-6)  # automatic: on, on the CPU
    bf16 = compute_cam(model, x, amp="bf16")
    assert bf16.dtype == torch.float32
    scale = nchw.amax(dim=(1, 2), keepdim=True)  # bf16 keeps ~3 significant digits of each map
    assert ((bf16 - nchw).abs() / scale).max() < 0.05
    agreement = (part_masks(model, x, amp="bf16") == masks_from_cams(nchw, (32, 32))).float().mean()
    assert agreement > 0.98
    with pytest.raises(ValueError, match="amp"):
        compute_cam(model, x, amp="fp8")


def _count_batch_norms(monkeypatch) -> list:
    calls: list = []
    real = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("name, layer", [
    ("resnet18", None),  # layer4: a container with its own conv-BN pairs, folded inside the tap
    ("small_cnn", None),
    ("vgg11", None),
    ("resnet18", "layer4.1.conv2"),  # a convolution whose BatchNorm comes after the tap: left unfolded
    ("small_cnn", "block2"),  # a middle block: the layers after it are differentiated through folded pairs
])
def test_folded_cam_pass_equals_the_unfolded_one_without_running_batch_norm(monkeypatch, name, layer):
    torch.manual_seed(6)
    model = create_model(name, num_classes=10, **({} if name == "vgg11" else {"width": 8}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial statistics, and an eps that a fold without it would get wrong
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.eps = 0.1
    x = get_dataset("digits", split="test").x[:6]
    calls = _count_batch_norms(monkeypatch)
    for method in ("gradcam", "xgradcam", "layercam"):
        calls.clear()
        plain = compute_cam(model, x, layer, method=method, fold_bn=False)
        unfolded_calls = len(calls)
        calls.clear()
        folded = compute_cam(model, x, layer, method=method)
        assert unfolded_calls > 0 and len(calls) == (1 if layer == "layer4.1.conv2" else 0)
        scale = plain.amax(dim=(1, 2), keepdim=True).clamp(min=1e-6)
        assert ((folded - plain).abs() / scale).max() < 1e-4
    assert (part_masks(model, x, layer) == part_masks(model, x, layer, fold_bn=False)).float().mean() > 0.999


def test_folded_cam_pass_steps_aside_for_hooked_models_and_rejects_a_twice_run_layer(monkeypatch):
    torch.manual_seed(7)
    model = create_model("small_cnn", num_classes=10, width=4).eval()
    x = torch.rand(3, 3, 32, 32)
    calls = _count_batch_norms(monkeypatch)
    handle = model.block1.register_forward_hook(lambda *args: None)
    compute_cam(model, x)
    assert len(calls) == 5  # hooks would not all run in a view: the model runs as it is
    handle.remove()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
            self.head = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(self.block(self.block(x)).mean((2, 3)))

    with pytest.raises(ValueError, match="more than once"):
        compute_cam(Twice().eval(), x, "block")
    with pytest.raises(ValueError, match="fold_bn"):
        compute_cam(model, x, fold_bn="yes")


def test_cam_errors():
    net, x = _tiny_setup()
    with pytest.raises(ValueError, match="unknown CAM method"):
        compute_cam(net, x, "target", method="scorecam")
    with pytest.raises(ValueError, match="not a sub-module"):
        compute_cam(net, x, "nope.layer")
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        compute_cam(net, x, "head")
    with pytest.raises(ValueError, match="did not run"):
        compute_cam(net, x, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="no cam_layer"):
        compute_cam(net, x)
    with pytest.raises(ValueError, match="target"):
        compute_cam(net, x, "target", target=torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="inference_mode"):
        with torch.inference_mode():
            compute_cam(net, x, "target")
    assert all(p.requires_grad for p in net.parameters())  # restored after the failures


@pytest.mark.parametrize("device", DEVICES)
def test_cam_and_masks_on_device_match_cpu(device):
    torch.manual_seed(5)
    model = create_model("small_cnn", width=4).eval()
    x = torch.rand(3, 3, 32, 32)
    cams = compute_cam(model, x)
    on_device = compute_cam(model.to(device), x.to(device))
    assert on_device.device.type == device
    torch.testing.assert_close(on_device.cpu(), cams, rtol=1e-4, atol=1e-5)
    for recipe in ("jet", "cam"):
        masks = masks_from_cams(cams.to(device), (32, 32), recipe=recipe)
        assert masks.device.type == device
        assert torch.equal(masks.cpu(), masks_from_cams(cams, (32, 32), recipe=recipe))
