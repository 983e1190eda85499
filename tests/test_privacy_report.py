"""The membership-inference report: JSON content, regime labels and ROC plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastadv import privacy


def _scores(seed=0, n1=400, n0=300, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n1, generator=g) + shift, torch.randn(n0, generator=g)


def _strict_json(text: str):
    def reject(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=reject)


def test_evaluate_writes_json_and_plots(tmp_path):
    loss_m, loss_n = _scores(0)
    lira_m, lira_n = _scores(1, shift=2.0)
    transferred = privacy.transferred_threshold_attack(
        loss_m, torch.zeros(400, dtype=torch.long), loss_n, torch.zeros(300, dtype=torch.long),
        loss_m, torch.zeros(400, dtype=torch.long), loss_n, torch.zeros(300, dtype=torch.long),
    )
    report = privacy.evaluate(
        {"loss": loss_m, "lira": lira_m},
        {"loss": loss_n, "lira": lira_n},
        out_dir=tmp_path / "mia",
        regime={"lira": "calibrated"},
        bootstrap=50,
        generator=torch.Generator().manual_seed(0),
        extra_results={"loss/song_mittal": transferred.to_dict()},
        metadata={"attack": {"class": "PGD", "eps": 8 / 255}},
    )
    path = tmp_path / "mia" / "mia.json"
    on_disk = _strict_json(path.read_text())
    assert on_disk == report
    assert on_disk["signals"]["loss"]["regime"] == "oracle"
    assert on_disk["signals"]["lira"]["regime"] == "calibrated"
    assert on_disk["extra_results"]["loss/song_mittal"]["regime"] == "transferred"
    assert on_disk["metadata"]["attack"]["eps"] == pytest.approx(8 / 255)
    # Every number in the flat table carries its regime.
    assert on_disk["rows"] and all(row["regime"] in privacy.REGIMES for row in on_disk["rows"])
    metrics = {(r["signal"], r["metric"]) for r in on_disk["rows"]}
    assert ("lira", "tpr_at_fpr=0.001") in metrics and ("loss", "auc") in metrics
    # Values agree with roc_metrics and the JSON keys for fpr levels are strings.
    direct = privacy.roc_metrics(lira_m, lira_n)
    assert on_disk["signals"]["lira"]["auc"] == pytest.approx(direct["auc"])
    assert on_disk["signals"]["lira"]["tpr_at_fpr"]["0.01"]["tpr"] == pytest.approx(direct["tpr_at_fpr"][0.01]["tpr"])
    assert "ci" in on_disk["signals"]["loss"]
    for kind in ("linear", "loglog"):
        png = tmp_path / "mia" / f"roc_{kind}.png"
        data = png.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
        assert report["files"][kind] == str(png)


def test_evaluate_without_out_dir_is_serialisable_and_flags_orientation():
    member, nonmember = _scores(2)
    with pytest.warns(UserWarning, match="'entropy'.*wrong orientation"):
        report = privacy.evaluate({"entropy": -member}, {"entropy": -nonmember})
    text = json.dumps(report, allow_nan=False)
    assert "files" not in report and "warning" in _strict_json(text)["signals"]["entropy"]


def test_evaluate_infinite_thresholds_become_strings(tmp_path):
    report = privacy.evaluate({"c": torch.ones(10)}, {"c": torch.ones(10)}, out_dir=tmp_path, plots=False)
    assert report["signals"]["c"]["tpr_at_fpr"]["0.01"]["threshold"] == "inf"
    assert not (tmp_path / "roc_linear.png").exists()
    assert math.isclose(_strict_json((tmp_path / "mia.json").read_text())["signals"]["c"]["auc"], 0.5)


def test_evaluate_bad_arguments():
    member, nonmember = _scores(3)
    with pytest.raises(ValueError, match="same signals"):
        privacy.evaluate({"a": member}, {"b": nonmember})
    with pytest.raises(ValueError, match="regime"):
        privacy.evaluate({"a": member}, {"a": nonmember}, regime="magic")
    with pytest.raises(ValueError, match="extra_results"):
        privacy.evaluate({"a": member}, {"a": nonmember}, extra_results={"x": {"auc": 0.5}})
    with pytest.raises(ValueError, match="member_scores"):
        privacy.evaluate({"a": torch.tensor([])}, {"a": nonmember})


def test_end_to_end_model_signals_to_report(tmp_path):
    # A tiny over-fitted model: members are its training points.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 20, generator=g)
    y = torch.randint(0, 4, (120,), generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:60]), y[:60]).backward()
        opt.step()
    members = privacy.model_signals(model, (x[:60], y[:60]))
    nonmembers = privacy.model_signals(model, (x[60:], y[60:]))
    report = privacy.evaluate(members, nonmembers, out_dir=tmp_path)
    assert set(report["signals"]) == set(privacy.SIGNALS)
    assert report["signals"]["loss"]["auc"] > 0.8
