"""fastadv.models: the feature/head/CAM interface of every model, normalisation wrapper, registry, timm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastadv.cam import compute_cam
from fastadv.models import (
    FeatureModel,
    NormalizedModel,
    TimmModel,
    create_model,
    list_models,
    register_model,
    with_normalization,
    wrn,
)

# Reduced widths/depths keep the forward passes cheap; the architecture is otherwise the full one.
SMALL = {
    "resnet18": ({"width": 4}, 32, (4, 4)),
    "preact_resnet18": ({"width": 4}, 32, (4, 4)),
    "wrn34_10": ({"depth": 10, "widen": 1}, 64, (8, 8)),
    "vgg11": ({"width": 4}, 32, (2, 2)),
    "small_cnn": ({"width": 4}, 16, (8, 8)),
}


def test_registry_names():
    assert list_models() == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_interface(name):
    kwargs, dim, cam_hw = SMALL[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **kwargs).eval()
    assert isinstance(model, FeatureModel)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (2, dim) and model.feature_dim == dim
    assert logits.shape == (2, 7)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == dim
    torch.testing.assert_close(logits, model.head(feats), rtol=0, atol=0)
    assert model.cam_layer is model.get_submodule(model.cam_layer_name)
    assert compute_cam(model, x).shape == (2, *cam_hw)
    model.train()
    assert model(x).shape == (2, 7)


def test_full_size_parameter_counts():
    # Built on the meta device: no memory, no time. Published counts of the CIFAR architectures.
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in create_model(n).parameters()) for n in list_models()}
    assert counts["resnet18"] == 11_173_962
    assert counts["wrn34_10"] == 46_160_474
    assert counts["vgg11"] == 9_231_114
    assert counts["preact_resnet18"] == 11_172_170
    with torch.device("meta"):
        # PreAct-ResNet-18 has ResNet-18's convolutions and head; only the BatchNorm layers differ.
        def conv_linear(model):
            layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            return sum(p.numel() for m in layers for p in m.parameters())

        assert conv_linear(create_model("preact_resnet18")) == conv_linear(create_model("resnet18"))
        assert create_model("wrn34_10").feature_dim == 640
        assert wrn(depth=28, widen=10).feature_dim == 640


def test_wrn_depth_and_width_validation():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wrn(depth=30)
    with pytest.raises(ValueError, match="widen"):
        wrn(depth=10, widen=0)
    model = create_model("wrn34_10", depth=16, widen=2)
    assert len(model.block1) == 2 and model.feature_dim == 128


def test_with_normalization_equals_normalising_by_hand():
    torch.manual_seed(1)
    model = create_model("small_cnn", width=4).eval()
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    wrapped = with_normalization(model, mean, std)
    assert isinstance(wrapped, NormalizedModel) and isinstance(wrapped, nn.Sequential)
    x = torch.rand(2, 3, 32, 32)
    by_hand = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(by_hand))
        torch.testing.assert_close(wrapped.features(x), model.features(by_hand))
    assert wrapped.head is model.head and wrapped.feature_dim == model.feature_dim
    assert wrapped.cam_layer is model.cam_layer
    assert wrapped.get_submodule(wrapped.cam_layer_name) is model.cam_layer
    assert wrapped.model is model and wrapped[1] is model
    # the state dict is exactly the wrapped model's (mean/std are construction parameters)
    assert set(wrapped.state_dict()) == {f"1.{k}" for k in model.state_dict()}


def test_unknown_model_name():
    with pytest.raises(ValueError) as info:
        create_model("resnet_does_not_exist")
    message = str(info.value)
    assert "resnet_does_not_exist" in message and "timm" in message
    assert all(name in message for name in list_models())


def test_pretrained_without_checkpoint_is_an_error_not_a_download():
    with pytest.raises(ValueError, match="checkpoint_path"):
        create_model("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="checkpoint_path"):
        create_model("resnet10t", pretrained=True)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_model("resnet10t", pretrained=True, checkpoint_path="/nonexistent/missing.pth")


def test_timm_fallback():
    torch.manual_seed(2)
    model = create_model("resnet10t", num_classes=10, pretrained=False).eval()
    assert isinstance(model, TimmModel)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        torch.testing.assert_close(logits, model.head(feats))
        torch.testing.assert_close(logits, model.model(x))
    assert feats.shape == (2, model.feature_dim) and logits.shape == (2, 10)
    assert model.cam_layer is model.model.layer4
    assert compute_cam(model, x).shape == (2, 1, 1)


def test_timm_pretrained_from_local_file(tmp_path):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet10t", num_classes=10, pretrained=True, checkpoint_path=path)
    # backbone loaded from the file, classifier re-initialised for 10 classes
    torch.testing.assert_close(model.model.conv1[0].weight, source.conv1[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(model.model.layer4[0].conv2.weight, source.layer4[0].conv2.weight, rtol=0, atol=0)
    assert model.head.weight.shape == (10, 512)

    # without pretrained=True a checkpoint is a full, strict checkpoint of the same model, saved from
    # the timm model itself or from fastadv's wrapper
    for saved in (model.model.state_dict(), model.state_dict()):
        torch.save(saved, path)
        again = create_model("resnet10t", num_classes=10, checkpoint_path=path)
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="does not match"):
        create_model("resnet10t", num_classes=5, checkpoint_path=path)


def test_own_model_checkpoint_loading(tmp_path):
    torch.manual_seed(4)
    source = create_model("small_cnn", width=4)
    path = tmp_path / "ddp.pt"
    # a DDP-style checkpoint: nested under "state_dict", keys prefixed with "module."
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    loaded = create_model("small_cnn", width=4, checkpoint_path=path)
    for (k, v), (k2, v2) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    wrapped_path = tmp_path / "normalized.pt"  # saved from with_normalization(...): keys "1.<name>"
    torch.save(with_normalization(source, (0.5,) * 3, (0.5,) * 3).state_dict(), wrapped_path)
    from_wrapper = create_model("small_cnn", width=4, checkpoint_path=wrapped_path)
    assert all(torch.equal(v, from_wrapper.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match="does not match"):
        create_model("small_cnn", width=8, checkpoint_path=path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        create_model("small_cnn", width=4, checkpoint_path=garbage)
    with pytest.raises(FileNotFoundError):
        create_model("small_cnn", checkpoint_path=tmp_path / "absent.pt")


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(lambda num_classes=10: nn.Linear(1, num_classes))
