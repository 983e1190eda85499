"""Reference models trained with fastadv.train on half-splits, resumable, feeding LiRA; MIA on real PGD inputs."""

import torch

from fastadv import privacy
from fastadv.attacks import PGD
from fastadv.data import get_dataset
from fastadv.train import TrainConfig

CFG = TrainConfig(method="standard", model="small_cnn", model_kwargs={"width": 8}, dataset="digits", epochs=25,
                  batch_size=16, lr=0.05, weight_decay=0.0, eval_steps=0, eval_every=0, augment=False, progress=False,
                  out_dir=None)


def _data(n=96):
    ds = get_dataset("digits", split="train")
    from fastadv.data.datasets import ImageSet

    return ImageSet(ds.x[:n], ds.y[:n], ds.classes, "digits")


def test_reference_models_half_splits_resume_and_lira(tmp_path):
    torch.set_num_threads(1)
    data = _data()
    refs = privacy.train_reference_models(CFG, data, 4, tmp_path, seed=3)
    assert refs.in_mask.shape == (4, 96) and (refs.in_mask.sum(0) == 2).all()
    for i, ckpt in enumerate(refs.checkpoints):
        state = torch.load(ckpt, weights_only=True)
        assert state["finished"] and state["data"] is not None
        assert state["config"]["seed"] == 4 + i
    stamps = [c.stat().st_mtime_ns for c in refs.checkpoints]

    # a crash mid-set: model 2's checkpoint is gone; rerunning trains only model 2 and keeps the membership
    refs.checkpoints[2].unlink()
    again = privacy.train_reference_models(CFG, data, 4, tmp_path, seed=3)
    assert torch.equal(again.in_mask, refs.in_mask)
    assert [c.stat().st_mtime_ns for i, c in enumerate(again.checkpoints) if i != 2] == \
        [s for i, s in enumerate(stamps) if i != 2]
    assert again.checkpoints[2].is_file()

    stats = privacy.reference_statistics(again.checkpoints, data, signal="scaled_logit")
    assert stats.shape == (4, 96) and torch.isfinite(stats).all()
    # each reference model is more confident on its own training half than on the other half
    in_mean = (stats * again.in_mask).sum(1) / again.in_mask.sum(1)
    out_mean = (stats * ~again.in_mask).sum(1) / (~again.in_mask).sum(1)
    assert (in_mean > out_mean).all(), (in_mean, out_mean)
    # LiRA on reference model 0 as the target (its membership is row 0): members score higher
    scores = privacy.lira_scores(stats[1:], again.in_mask[1:], stats[0], online=True, fixed_variance=True)
    m = privacy.roc_metrics(scores[again.in_mask[0]], scores[~again.in_mask[0]])
    assert m["auc"] > 0.5


def test_mismatched_membership_matrix_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="in_mask"):
        privacy.train_reference_models(CFG, _data(), 2, tmp_path, in_mask=torch.ones(3, 96, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_models"):
        privacy.train_reference_models(CFG, _data(), 1, tmp_path)


def test_adversarial_inputs_use_the_attack():
    torch.manual_seed(0)
    data = _data(64)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    x = data.x.float()
    natural = privacy.model_signals(model, (x, data.y), ("loss",))["loss"]
    attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=5, generator=0)
    adversarial = privacy.model_signals(model, (x, data.y), ("loss",), attack=attack)["loss"]
    # higher score = member, i.e. negated loss: the attack raises every loss, so every score drops
    assert (adversarial <= natural + 1e-6).all() and (adversarial < natural - 1e-4).float().mean() > 0.9
