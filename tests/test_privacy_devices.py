"""The privacy engine on accelerators gives the CPU's answers and keeps tensors on their device.

Skipped where no accelerator is present (the CPU path is covered by the other test files).
"""

from __future__ import annotations

import pytest
import torch

from fastadv import privacy

DEVICES = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_roc_metrics_on_device_equals_cpu(device):
    g = torch.Generator().manual_seed(0)
    member = torch.randint(0, 50, (5000,), generator=g).float() + 3
    nonmember = torch.randint(0, 50, (4000,), generator=g).float()
    cpu = privacy.roc_metrics(member, nonmember)
    dev = privacy.roc_metrics(member.to(device), nonmember.to(device))
    assert dev == cpu
    fpr, tpr, thr = privacy.roc_curve(member.to(device), nonmember.to(device))
    assert fpr.device.type == device and thr.device.type == device
    boot = privacy.roc_metrics(
        member.to(device), nonmember.to(device), bootstrap=64, generator=torch.Generator(device).manual_seed(0)
    )
    lo, hi = boot["ci"]["auc"]
    assert lo < cpu["auc"] < hi
    cpu_gen = privacy.roc_metrics(
        member.to(device), nonmember.to(device), bootstrap=8, generator=torch.Generator().manual_seed(0)
    )
    assert "ci" in cpu_gen


@pytest.mark.parametrize("device", DEVICES)
def test_signals_lira_rmia_on_device(device):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 10, generator=g) * 4
    labels = torch.randint(0, 10, (64,), generator=g)
    cpu = privacy.compute_signals(logits, labels)
    dev = privacy.compute_signals(logits.to(device), labels.to(device))
    for name in privacy.SIGNALS:
        assert dev[name].device.type == device
        torch.testing.assert_close(dev[name].cpu(), cpu[name], rtol=1e-5, atol=1e-5)

    stats = torch.randn(8, 30, 2, generator=g, dtype=torch.float64)
    mask = privacy.make_in_mask(8, 30, generator=g)
    target = torch.randn(30, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        privacy.lira_scores(stats.to(device), mask.to(device), target.to(device)).cpu(),
        privacy.lira_scores(stats, mask, target),
    )
    args = [torch.rand(40, generator=g, dtype=torch.float64), torch.rand(50, generator=g, dtype=torch.float64),
            torch.rand(3, 40, generator=g, dtype=torch.float64), torch.rand(3, 50, generator=g, dtype=torch.float64)]
    on_device = privacy.rmia_scores(*(a.to(device) for a in args))
    assert torch.equal(on_device, privacy.rmia_scores(*(a.to(device) for a in args), dense=True))
    assert torch.equal(on_device.cpu(), privacy.rmia_scores(*args))

    fitted = privacy.fit_class_thresholds(
        stats[0, :, 0].to(device), labels[:30].to(device), stats[1, :, 0].to(device), labels[30:60].to(device)
    )
    reference = privacy.fit_class_thresholds(stats[0, :, 0], labels[:30], stats[1, :, 0], labels[30:60])
    assert torch.equal(fitted.thresholds.cpu(), reference.thresholds)
