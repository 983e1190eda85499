"""Membership signals: hand-written numpy references, extreme logits, and the model runner."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastadv.privacy import SIGNALS, attack_config, compute_signals, model_signals, signal_scores


def numpy_reference(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Textbook formulas in float64, each negated where needed so that higher = member."""
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    rows = np.arange(len(labels))
    p_y = p[rows, labels]
    others = np.ones_like(p, dtype=bool)
    others[rows, labels] = False
    mentr = -(1 - p_y) * np.log(p_y) - np.where(others, p * np.log(1 - p), 0.0).sum(1)
    z_other = np.where(others, z, -np.inf)
    return {
        "correctness": (z.argmax(1) == labels).astype(np.float64),
        "confidence": p_y,
        "loss": np.log(p_y),
        "entropy": (p * np.log(p)).sum(1),
        "modified_entropy": -mentr,
        "scaled_logit": np.log(p_y) - np.log(np.where(others, p, 0.0).sum(1)),
        "margin": z[rows, labels] - z_other.max(1),
    }


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("seed", range(3))
def test_signals_match_numpy_formulas(dtype, tol, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(64, 10))
    labels = rng.integers(0, 10, size=64)
    got = compute_signals(torch.tensor(logits, dtype=dtype), torch.from_numpy(labels))
    ref = numpy_reference(torch.tensor(logits, dtype=dtype).double().numpy(), labels)
    assert set(got) == set(SIGNALS)
    for name in SIGNALS:
        np.testing.assert_allclose(got[name].double().numpy(), ref[name], rtol=tol, atol=tol, err_msg=name)
        assert got[name].shape == (64,)
    assert got["scaled_logit"].dtype == torch.float64
    assert got["confidence"].dtype == dtype


def test_signal_scores_dispatch_and_unknown_name():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([0])
    assert signal_scores("margin", z, y).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="valid names: correctness, confidence, loss"):
        signal_scores("lossy", z, y)
    with pytest.raises(ValueError, match="unknown signal"):
        compute_signals(z, y, ["loss", "nope"])


def test_extreme_logits_stay_finite_and_accurate():
    z = torch.tensor([[50.0, 0.0, 0.0], [0.0, 200.0, -100.0], [50.0, 0.0, 0.0], [1e4, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    got = compute_signals(z, y)
    for name, values in got.items():
        assert torch.isfinite(values).all(), name
    sl = got["scaled_logit"].tolist()
    # log p_y − log Σ_{i≠y} p_i = z_y − log Σ_{i≠y} e^{z_i}
    assert sl[0] == pytest.approx(50.0 - math.log(2.0), abs=1e-12)
    assert sl[1] == pytest.approx(200.0, abs=1e-12)
    assert sl[2] == pytest.approx(-50.0, abs=1e-12)  # 0 − log(e^50 + 1)
    assert sl[3] == pytest.approx(1e4 - math.log(2.0), abs=1e-9)
    # Confidently wrong (row 2, p_0 ≈ 1 − 2e^{-50}): −(1−p_y)·log p_y ≈ 50 and
    # −p_0·log(1−p_0) ≈ 50 − log 2, the other term is negligible; a naive log(1 − p_0) gives inf.
    assert got["modified_entropy"][2].item() == pytest.approx(-(100.0 - math.log(2.0)), rel=1e-6)
    # Confidently right: Mentr ≈ 0, loss ≈ 0 and confidence ≈ 1.
    assert got["modified_entropy"][1].item() == pytest.approx(0.0, abs=1e-30)
    assert got["loss"][1].item() == pytest.approx(0.0, abs=1e-30)
    assert got["confidence"][0].item() == pytest.approx(1.0)


def test_half_precision_warns_and_upcasts():
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(0, 3, size=(16, 5)), dtype=torch.float16)
    y = torch.from_numpy(rng.integers(0, 5, size=16))
    with pytest.warns(UserWarning, match="upcasting to float32"):
        got = compute_signals(z, y)
    ref = compute_signals(z.float(), y)
    for name in SIGNALS:
        assert torch.equal(got[name], ref[name]), name
        assert got[name].dtype in (torch.float32, torch.float64)


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), "logits"),
        (torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), "logits"),
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), "labels"),
        (torch.zeros(3, 4), torch.tensor([0, 1, 4]), "labels"),
        (torch.zeros(3, 4), torch.tensor([0.0, 1.0, 2.0]), "labels"),
        (torch.tensor([[0.0, math.nan]]), torch.tensor([0]), "logits"),
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), "logits"),
    ],
)
def test_bad_inputs(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_signals(logits, labels)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def _data(n=37):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_model_signals_over_tensors_and_loader_match_direct_computation():
    model = _tiny_model()
    x, y = _data()
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    states = [m.training for m in model.modules()]
    with torch.no_grad():
        reference = compute_signals(model.eval()(x), y)
    model.train()
    model[2].eval()

    from_tensors = model_signals(model, (x, y), batch_size=8)
    assert [m.training for m in model.modules()] == states
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=False)
    from_loader, labels = model_signals(model, loader, ["loss", "scaled_logit"], return_labels=True)
    assert [m.training for m in model.modules()] == states
    assert torch.equal(labels, y)
    for name in SIGNALS:
        torch.testing.assert_close(from_tensors[name], reference[name], rtol=1e-6, atol=1e-6)
    assert set(from_loader) == {"loss", "scaled_logit"}
    torch.testing.assert_close(from_loader["loss"], reference["loss"], rtol=1e-6, atol=1e-6)


def test_model_signals_restores_mode_on_error():
    model = _tiny_model().train()

    def broken_attack(x, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model_signals(model, _data(), attack=broken_attack)
    assert all(m.training for m in model.modules())


def test_model_signals_on_adversarial_inputs():
    model = _tiny_model().train()
    x, y = _data()
    seen = []

    def shift(x_batch, y_batch):
        seen.append(model.training)
        return x_batch + 0.25

    got = model_signals(model, (x, y), ["confidence", "margin"], attack=shift, batch_size=16)
    with torch.no_grad():
        reference = compute_signals(model.eval()(x + 0.25), y, ["confidence", "margin"])
    assert seen and not any(seen)  # the attack sees the model in eval mode
    torch.testing.assert_close(got["margin"], reference["margin"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["confidence"], reference["confidence"], rtol=1e-6, atol=1e-6)


def test_model_signals_rejects_bad_data():
    model = _tiny_model()
    with pytest.raises(ValueError, match="batch_size"):
        model_signals(model, _data(), batch_size=0)
    with pytest.raises(ValueError, match="data"):
        model_signals(model, (torch.zeros(4, 5), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="unknown signal"):
        model_signals(model, _data(), ["bogus"])


def test_attack_config_records_simple_attributes():
    class FakePGD:
        def __init__(self):
            self.model = nn.Linear(2, 2)
            self.eps = 8 / 255
            self.steps = 10
            self.loss = "ce"
            self.random_start = True
            self._private = 1

    config = attack_config(FakePGD())
    assert config["class"].endswith("FakePGD")
    assert config["eps"] == pytest.approx(8 / 255) and config["steps"] == 10 and config["loss"] == "ce"
    assert "model" not in config and "_private" not in config
