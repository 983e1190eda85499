import torch

from fastadv.data import get_dataset
from fastadv.train import TrainConfig, load_trained_model, train


def test_load_trained_model_rebuilds_the_network(tmp_path):
    torch.set_num_threads(1)
    data = get_dataset("digits", split="train")
    cfg = TrainConfig(method="standard", model="small_cnn", model_kwargs={"width": 8}, dataset="digits",
                      train_subset=128, epochs=1, batch_size=64, eval_steps=0, eval_subset=64, normalize=True,
                      out_dir=str(tmp_path), progress=False, lr=0.05)
    result = train(cfg)
    model = load_trained_model(result.last_checkpoint)
    state = torch.load(result.last_checkpoint, weights_only=True)
    assert state["num_classes"] == 10 and state["normalization"] is not None
    x = data.x[:16].float() / (255.0 if data.x.dtype == torch.uint8 else 1.0)
    # independent rebuild: normalise by hand and run the bare network with the saved weights
    from fastadv.models import create_model

    bare = create_model("small_cnn", num_classes=10, width=8)
    bare.load_state_dict({k[2:]: v for k, v in state["model"].items() if k.startswith("1.")})
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in state["normalization"])
    bare.eval()
    torch.testing.assert_close(model(x), bare((x - mean) / std))
    assert not model.training


def test_eval_subset_zero_trains_without_evaluation_data(tmp_path):
    import pytest

    torch.set_num_threads(1)
    train_set = get_dataset("digits", split="train")
    cfg = TrainConfig(method="standard", model="small_cnn", model_kwargs={"width": 4}, dataset="digits",
                      train_subset=64, epochs=2, batch_size=32, eval_subset=0, out_dir=str(tmp_path), progress=False)
    result = train(cfg, train_set=train_set, eval_set=None)
    assert len(result.history) == 2
    assert all("nat_acc" not in r and "pgd_acc" not in r for r in result.history)
    assert (tmp_path / "last.pt").is_file() and result.best is None
    with pytest.raises(ValueError, match="eval_subset"):
        TrainConfig(method="fast_at", eval_subset=0)
    with pytest.raises(ValueError, match="eval_subset"):
        TrainConfig(eval_subset=-1)
