"""fastadv.data: loaders on tiny files in the real on-disk formats, digits, augmentation, TensorLoader,
Normalize."""

from __future__ import annotations

import collections
import pickle

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

from fastadv.data import (
    CIFAR10_CLASSES,
    DATASETS,
    Normalize,
    RandomCropFlip,
    TensorLoader,
    crop_flip,
    digits,
    get_dataset,
    load_cifar10,
    load_cifar10c,
    load_cifar100,
    load_svhn,
    load_tiny_imagenet,
    random_crop_flip,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# --------------------------------------------------------------------------------------------------
# writers of the real formats


def _write_cifar10(root, per_batch=3, seed=0):
    """``cifar-10-batches-py/``: protocol-2 pickles with bytes keys, as the published archive."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        written[name] = (data, labels)
    meta = {b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return folder, written


def _write_cifar100(root, per_split=4, seed=1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for split in ("train", "test"):
        data = rng.integers(0, 256, (per_split, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, per_split)]
        coarse = [int(v) for v in rng.integers(0, 20, per_split)]
        with open(folder / split, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": coarse}, handle, protocol=2)
        written[split] = (data, fine, coarse)
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return folder, written


# --------------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_round_trip(tmp_path):
    _, written = _write_cifar10(tmp_path)
    train = load_cifar10(tmp_path, "train")
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert train.x.dtype == torch.uint8 and train.x.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(train.x.numpy(), expected)
    assert train.y.dtype == torch.int64
    assert train.y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.classes == CIFAR10_CLASSES
    test = get_dataset("cifar10", tmp_path / "cifar-10-batches-py", split="test")  # folder itself works too
    np.testing.assert_array_equal(test.x.numpy(), written["test_batch"][0].reshape(-1, 3, 32, 32))
    assert test.y.tolist() == written["test_batch"][1]
    mean, std = train.channel_stats()
    planes = expected.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    np.testing.assert_allclose(mean, planes.mean(1), rtol=1e-12)
    np.testing.assert_allclose(std, planes.std(1), rtol=1e-9)
    as_float = test.float()
    assert as_float.x.dtype == torch.float32 and float(as_float.x.max()) <= 1.0
    torch.testing.assert_close(as_float.x * 255, test.x.float())
    # a single channel of the flat layout is one 32×32 plane, rows first
    assert test.x[0, 1, 2, 3] == written["test_batch"][0][0, 1024 + 2 * 32 + 3]


def test_cifar100_round_trip_fine_and_coarse(tmp_path):
    _, written = _write_cifar100(tmp_path)
    fine = get_dataset("cifar100", tmp_path, split="test")
    np.testing.assert_array_equal(fine.x.numpy(), written["test"][0].reshape(-1, 3, 32, 32))
    assert fine.y.tolist() == written["test"][1] and fine.num_classes == 100 and fine.classes[3] == "fine3"
    coarse = load_cifar100(tmp_path, "train", label_type="coarse")
    assert coarse.y.tolist() == written["train"][2] and coarse.num_classes == 20


def test_cifar_missing_and_corrupt_files(tmp_path):
    folder, _ = _write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")
    (folder / "test_batch").write_bytes(b"\x00garbage, not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar10(tmp_path, "test")
    # a pickle naming any other global is refused rather than executed
    (folder / "test_batch").write_bytes(pickle.dumps(collections.OrderedDict(data=1), protocol=2))
    with pytest.raises(ValueError, match="not part of a CIFAR batch"):
        load_cifar10(tmp_path, "test")
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle, protocol=2)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar10(tmp_path, "test")
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, handle, protocol=2)
    with pytest.raises(ValueError, match="labels outside"):
        load_cifar10(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar100(tmp_path, "train")


# --------------------------------------------------------------------------------------------------
# SVHN


def test_svhn_round_trip_and_label_ten_is_zero(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    labels = np.array([[10], [1], [9], [10], [5]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": images, "y": labels})
    data = get_dataset("svhn", tmp_path, split="test")
    assert data.x.shape == (5, 3, 32, 32) and data.x.dtype == torch.uint8
    for i in range(5):
        np.testing.assert_array_equal(data.x[i].numpy(), images[:, :, :, i].transpose(2, 0, 1))
    assert data.y.tolist() == [0, 1, 9, 0, 5]
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        load_svhn(tmp_path, "train")
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB garbage" * 20)
    with pytest.raises(ValueError, match="train_32x32.mat"):
        load_svhn(tmp_path, "train")
    scipy.io.savemat(tmp_path / "extra_32x32.mat", {"X": images[:, :, :, :2], "y": labels})
    with pytest.raises(ValueError, match="labels"):
        load_svhn(tmp_path, "extra")


# --------------------------------------------------------------------------------------------------
# Tiny-ImageNet


def _write_tiny_imagenet(root, size=8):
    rng = np.random.default_rng(3)
    base = root / "tiny-imagenet-200"
    wnids = ["n09999999", "n01443537", "n02124075"]  # deliberately not sorted in wnids.txt
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for k in range(2):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{k}.JPEG", format="JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    # one grayscale image, as a few real ones are
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
        base / "train" / wnids[1] / "images" / f"{wnids[1]}_2.JPEG", format="JPEG"
    )
    lines = []
    for i, wnid in enumerate([wnids[2], wnids[0], wnids[2], wnids[1]]):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            base / "val" / "images" / f"val_{i}.JPEG", format="JPEG"
        )
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t1\t{size - 1}\t{size - 2}")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base, sorted(wnids)


def _decode(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def test_tiny_imagenet_round_trip(tmp_path):
    base, classes = _write_tiny_imagenet(tmp_path)
    train = get_dataset("tiny_imagenet", tmp_path, split="train")
    assert train.classes == tuple(classes) and train.x.shape == (7, 3, 8, 8) and train.x.dtype == torch.uint8
    expected_paths = [p for wnid in classes for p in sorted((base / "train" / wnid / "images").iterdir())]
    expected_labels = [classes.index(p.parent.parent.name) for p in expected_paths]
    assert train.y.tolist() == expected_labels
    for i, path in enumerate(expected_paths):
        np.testing.assert_array_equal(train.x[i].numpy(), _decode(path))
    val = load_tiny_imagenet(base, "val")
    annotated = [line.split("\t") for line in (base / "val" / "val_annotations.txt").read_text().splitlines()]
    assert val.y.tolist() == [classes.index(fields[1]) for fields in annotated]
    for i, fields in enumerate(annotated):
        np.testing.assert_array_equal(val.x[i].numpy(), _decode(base / "val" / "images" / fields[0]))


def test_tiny_imagenet_errors(tmp_path):
    base, classes = _write_tiny_imagenet(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_tiny_imagenet(tmp_path, "test")
    bad = base / "train" / classes[0] / "images" / f"{classes[0]}_0.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=bad.name):
        load_tiny_imagenet(tmp_path, "train")
    annotations = base / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="line 1"):
        load_tiny_imagenet(tmp_path, "val")
    annotations.write_text("val_9.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(FileNotFoundError, match="val_9.JPEG"):
        load_tiny_imagenet(tmp_path, "val")
    (base / "wnids.txt").write_text("n01443537\nn00000001\n")
    with pytest.raises(FileNotFoundError, match="n00000001"):
        load_tiny_imagenet(tmp_path, "train")


# --------------------------------------------------------------------------------------------------
# CIFAR-10-C


def test_cifar10c_severities(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (5 * 4, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(np.array([3, 1, 4, 1], dtype=np.uint8), 5)
    np.save(folder / "gaussian_noise.npy", images)
    np.save(folder / "labels.npy", labels)
    sev3 = get_dataset("cifar10c", tmp_path, corruption="gaussian_noise", severity=3)
    assert sev3.x.shape == (4, 3, 32, 32) and sev3.x.dtype == torch.uint8
    np.testing.assert_array_equal(sev3.x.numpy(), images[8:12].transpose(0, 3, 1, 2))
    assert sev3.y.tolist() == [3, 1, 4, 1]
    everything = load_cifar10c(folder, "gaussian_noise", severity=None)
    np.testing.assert_array_equal(everything.x.numpy(), images.transpose(0, 3, 1, 2))
    assert everything.y.tolist() == labels.tolist()

    with pytest.raises(ValueError, match="unknown corruption"):
        load_cifar10c(tmp_path, "rain")
    with pytest.raises(FileNotFoundError, match="fog.npy"):
        load_cifar10c(tmp_path, "fog")
    with pytest.raises(ValueError, match="severity"):
        load_cifar10c(tmp_path, "gaussian_noise", severity=6)
    with pytest.raises(ValueError, match="corruption="):
        get_dataset("cifar10c", tmp_path)
    np.save(folder / "snow.npy", images[:7])
    with pytest.raises(ValueError, match="snow.npy"):
        load_cifar10c(tmp_path, "snow")
    (folder / "frost.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="frost.npy"):
        load_cifar10c(tmp_path, "frost")


# --------------------------------------------------------------------------------------------------
# dispatch


def test_get_dataset_errors(tmp_path):
    with pytest.raises(ValueError) as info:
        get_dataset("imagenet21k")
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(ValueError, match="data_dir"):
        get_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="nope"):
        get_dataset("svhn", tmp_path / "nope")
    with pytest.raises(ValueError, match="split"):
        get_dataset("cifar10", tmp_path, split="validation")


# --------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_ranges_and_determinism():
    from sklearn.datasets import load_digits

    train, test = digits("train"), get_dataset("digits", split="test")
    assert train.x.shape[1:] == (3, 32, 32) and train.x.dtype == torch.float32
    assert len(train) + len(test) == 1797 and train.num_classes == 10
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert torch.equal(train.x[:, 0], train.x[:, 2])
    # stratified: every class's test share is its rounded 20 %
    all_counts = torch.bincount(torch.cat([train.y, test.y]), minlength=10)
    assert torch.bincount(test.y, minlength=10).tolist() == [round(0.2 * int(c)) for c in all_counts]
    again = digits("train")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    other = digits("train", seed=1)
    assert not torch.equal(other.y, train.y) or not torch.equal(other.x, train.x)
    # at the native size the two splits are exactly the real images scaled to [0, 1]
    native = torch.cat([digits("train", size=8).x[:, 0], digits("test", size=8).x[:, 0]])
    real = torch.from_numpy(load_digits().images.astype(np.float32) / 16)
    assert sorted(map(bytes, native.flatten(1).numpy())) == sorted(map(bytes, real.flatten(1).numpy()))
    # upsampling is bilinear from those images
    small = digits("test", size=8).x[:, :1]
    torch.testing.assert_close(test.x[:, :1], F.interpolate(small, size=32, mode="bilinear", align_corners=False))


# --------------------------------------------------------------------------------------------------
# augmentation


def test_crop_flip_equals_padded_image_shifted_and_flipped():
    x = torch.rand(4, 3, 6, 5)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 1]])
    flips = torch.tensor([False, True, True, False])
    out = crop_flip(x, offsets, flips, padding=4)
    padded = F.pad(x, (4, 4, 4, 4))
    for b in range(4):
        r, c = offsets[b].tolist()
        expected = padded[b, :, r : r + 6, c : c + 5]
        if flips[b]:
            expected = expected.flip(-1)
        assert torch.equal(out[b], expected)
    # the centre offset without flipping is the identity
    assert torch.equal(crop_flip(x, torch.full((4, 2), 4), torch.zeros(4, dtype=torch.bool)), x)


def test_random_crop_flip_outputs_are_valid_crops_and_deterministic():
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    seen = set()
    for b in range(64):
        windows = {(r, c): padded[b, :, r : r + 8, c : c + 8] for r in range(9) for c in range(9)}
        matches = [
            (r, c, f)
            for (r, c), window in windows.items()
            for f in (False, True)
            if torch.equal(out[b], window.flip(-1) if f else window)
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert {f for _, _, f in seen} == {False, True} and len({(r, c) for r, c, _ in seen}) > 20
    again = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    module = RandomCropFlip(generator=torch.Generator().manual_seed(5))
    assert torch.equal(module(x), out)
    assert not torch.equal(random_crop_flip(x, generator=torch.Generator().manual_seed(6)), out)


def test_flip_only_and_no_op():
    x = torch.rand(16, 3, 5, 5)
    out = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    for b in range(16):
        assert torch.equal(out[b], x[b]) or torch.equal(out[b], x[b].flip(-1))
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    with pytest.raises(ValueError, match="offsets"):
        crop_flip(x, torch.tensor([[0, 9]] * 16), torch.zeros(16, dtype=torch.bool), padding=4)


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_and_loader_on_device(device):
    x = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(20)
    reference = random_crop_flip(x, generator=torch.Generator().manual_seed(9))
    moved = random_crop_flip(x.to(device), generator=torch.Generator().manual_seed(9))
    assert moved.device.type == device and torch.equal(moved.cpu(), reference)
    loader = TensorLoader(x, y, 8, shuffle=True, device=device, transform=RandomCropFlip())
    batches = list(loader)
    assert all(xb.device.type == device and yb.device.type == device for xb, yb in batches)
    assert sorted(torch.cat([yb for _, yb in batches]).tolist()) == list(range(20))


# --------------------------------------------------------------------------------------------------
# TensorLoader


def _epoch_ids(loader):
    return torch.cat([yb for _, yb in loader]).tolist()


def test_tensor_loader_covers_every_example_once_per_epoch():
    x = torch.rand(10, 3, 4, 4)
    y = torch.arange(10)
    loader = TensorLoader(x, y, batch_size=3, shuffle=True, seed=7)
    assert len(loader) == 4
    first, second = _epoch_ids(loader), _epoch_ids(loader)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second  # a new permutation each epoch
    loader.set_epoch(0)
    assert _epoch_ids(loader) == first
    for xb, yb in TensorLoader(x, y, batch_size=3, shuffle=True):
        assert torch.equal(xb, x[yb])  # images stay paired with their labels
    dropping = TensorLoader(x, y, batch_size=3, drop_last=True)
    assert len(dropping) == 3 and _epoch_ids(dropping) == list(range(9))
    assert _epoch_ids(TensorLoader(x, y, batch_size=4)) == list(range(10))


def test_tensor_loader_generator_determinism_and_conversion():
    x = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(9)
    a = TensorLoader(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(1))
    b = TensorLoader(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert _epoch_ids(a) == _epoch_ids(b)
    xb, yb = next(iter(TensorLoader(x, y, 9)))
    assert xb.dtype == torch.float32 and torch.equal(xb * 255, x.float())
    raw, _ = next(iter(TensorLoader(x, y, 9, to_float=False)))
    assert raw.dtype == torch.uint8
    flipped, _ = next(iter(TensorLoader(x, y, 9, transform=lambda t: t.flip(-1))))
    assert torch.equal(flipped, (x.float() / 255).flip(-1))
    with pytest.raises(ValueError, match="examples"):
        TensorLoader(x, y[:5], 2)


@pytest.mark.parametrize("total", [12, 10])
def test_tensor_loader_shards(total):
    x = torch.zeros(total, 1, 2, 2)
    y = torch.arange(total)
    world = 3
    exact = [_epoch_ids(TensorLoader(x, y, 2, shuffle=True, seed=3, rank=r, world_size=world, equal_shards=False))
             for r in range(world)]
    assert sorted(sum(exact, [])) == list(range(total))  # disjoint and complete
    padded = [TensorLoader(x, y, 2, shuffle=True, seed=3, rank=r, world_size=world) for r in range(world)]
    ids = [_epoch_ids(loader) for loader in padded]
    assert len({len(loader) for loader in padded}) == 1  # every rank runs the same number of steps
    assert all(len(s) == -(-total // world) for s in ids)
    assert set(sum(ids, [])) == set(range(total))
    if total % world == 0:
        assert sorted(sum(ids, [])) == list(range(total))
    with pytest.raises(ValueError, match="rank"):
        TensorLoader(x, y, 2, rank=3, world_size=3)


# --------------------------------------------------------------------------------------------------
# Normalize


def test_normalize_buffers_and_values():
    norm = Normalize((0.5, 0.25, 0.125), (0.5, 2.0, 0.25))
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)) / torch.tensor([0.5, 2.0, 0.25]).view(1, 3, 1, 1)
    assert torch.equal(norm(x), expected)
    assert dict(norm.named_buffers()).keys() == {"mean", "std"} and norm.state_dict() == {}
    assert norm.double().mean.dtype == torch.float64
    with pytest.raises(ValueError, match="positive"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="channels"):
        Normalize((0.5, 0.5), (1.0,))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        Normalize((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))(torch.rand(2, 1, 4, 4))
