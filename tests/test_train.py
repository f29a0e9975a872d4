"""The reference trainer: schedules, exact resume, divergence handling, and that training learns."""
import math

import pytest
import torch

from fastm2d.config import ConfigError
from fastm2d.train import Trainer, TrainingDiverged, lr_at, pretrain, read_metrics
from fastm2d.train.schedule import scaled_lr


def test_lr_schedule_warmup_then_cosine():
    assert scaled_lr(3e-4, 2048) == pytest.approx(2.4e-3)
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_no_decay_for_biases_and_1d_parameters(tiny_config):
    tr = Trainer(tiny_config("train.max_steps=1"))
    groups = {g["weight_decay"]: g["params"] for g in tr.engine.param_groups}
    names = {id(p): n for n, p in tr.model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0.0]}
    assert "blocks.0.norm1.weight" in no_decay and "decoder_pred.bias" in no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay
    assert not any(n.startswith("target_") for g in groups.values() for n in (names[id(p)] for p in g))


def test_resume_reproduces_the_uninterrupted_curve(tiny_config, tmp_path):
    common = ["train.max_steps=8", "train.warmup_epochs=0.5", "train.accum_steps=2", "train.save_every=3"]
    full = pretrain(tiny_config(*common, f"out_dir={tmp_path / 'full'}"))
    # Interrupted: three steps by hand, a checkpoint, then `pretrain --resume` to the end.
    cut = tiny_config(*common, f"out_dir={tmp_path / 'cut'}")
    tr = Trainer(cut)
    batches = tr.micro_batches()
    for _ in range(3):
        tr.train_step([next(batches) for _ in range(2)])
    tr.save()
    resumed = pretrain(cut, resume=True)
    assert resumed.step == 8
    a = [r["loss"] for r in read_metrics(tmp_path / "full")]
    b = [r["loss"] for r in read_metrics(tmp_path / "cut")][-5:]
    assert len(a) == 8 and len(b) == 5
    assert b == pytest.approx(a[3:], rel=1e-6, abs=1e-7)
    for k, v in full.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k


def test_existing_run_needs_resume(tiny_config):
    pretrain(tiny_config("train.max_steps=1"))
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(tiny_config("train.max_steps=2"))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, monkeypatch):
    cfg = tiny_config("train.max_steps=10", "train.save_every=2", "train.log_every=3")
    tr = Trainer(cfg)
    real_forward = tr.model.forward

    def poisoned(lms, ids_shuffle=None, offline_target=None):
        out = real_forward(lms, ids_shuffle, offline_target)
        if tr.step == 4:  # the 5th step produces NaN
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(tr.model, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"at or before step 6;.*checkpoint-4.pth\."):
        tr.fit()
    ckpt = torch.load(tr.out_dir / "checkpoint-4.pth", weights_only=False)
    assert not (tr.out_dir / "checkpoint-6.pth").exists()
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_training_lowers_the_loss(tiny_config):
    tr = pretrain(tiny_config("train.max_steps=60", "train.base_lr=3e-2", "train.warmup_epochs=1",
                              "train.batch_size=8", "data.synthetic_clips=64"))
    losses = [r["loss"] for r in read_metrics(tr.out_dir)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert (tr.out_dir / "norm_stats.json").is_file() and (tr.out_dir / "config.yaml").is_file()


@pytest.mark.slow
def test_the_shipped_demo_config_lowers_the_loss(tmp_path):
    from pathlib import Path

    from fastm2d.config import load_config
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_config(demo, [f"out_dir={tmp_path}", "train.max_steps=30", "data.synthetic_clips=96",
                             "train.progress=false", "train.log_every=5", "train.tensorboard=false"])
    losses = [r["loss"] for r in read_metrics(pretrain(cfg).out_dir)]
    assert losses[-1] < 0.85 * losses[0], losses
