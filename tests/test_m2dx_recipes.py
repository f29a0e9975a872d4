"""The shipped M2D-X recipes (configs/) load and train in a tiny variant; `fastm2d adapt` builds its plan."""
import json

import numpy as np
import pytest
import torch

from fastm2d.config import load_config
from fastm2d.train import pretrain, read_metrics

from .conftest import TINY_TRAIN, labelled_folder, write_m2d_checkpoint


TINY_MODEL = [a for a in TINY_TRAIN if a.startswith("model.")]


@pytest.mark.parametrize("recipe", ["m2d_x_as", "m2d_s", "m2d_x_medical"])
def test_recipes_load_and_a_tiny_variant_trains(recipe, tmp_path):
    from pathlib import Path
    path = Path(__file__).parent.parent / "configs" / f"{recipe}.yaml"
    full = load_config(path, [])
    paper = {"m2d_x_as": (1.0, 1.0, 0.7, [16, 16]), "m2d_s": (1.0, 0.5, 0.6, [80, 2]),
             "m2d_x_medical": (1.0, 1.0, 0.7, [16, 16])}[recipe]
    assert (full.model.lambda_m2d, full.model.lambda_off, full.model.mask_ratio, full.model.patch_size) == \
        (paper[0], paper[1], paper[2], paper[3])
    # The tiny CPU variant: same task, tiny model, embedded-style data written here.
    folder = labelled_folder(tmp_path)
    teacher, _ = write_m2d_checkpoint(tmp_path)
    tiny = [*TINY_MODEL, f"out_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2",
            "data.num_workers=0", "train.progress=false", "train.tensorboard=false", "data.norm_stats=[-8,4]",
            "data.stats_items=4", "train.log_every=1"]
    if recipe == "m2d_x_as":
        tiny += [f"data.train={folder / 'labels.csv'}", "offline.classes=null"]
    elif recipe == "m2d_s":
        feats = tmp_path / "feats"
        feats.mkdir()
        for i in range(8):
            np.save(feats / f"c{i}.npy", np.random.randn(35, 16).astype(np.float32))
        tiny += [f"data.train={folder}", f"offline.features={feats}", "model.patch_size=[80,2]",
                 "data.noise.train=synthetic", "data.synthetic_seconds=1.0", "data.noise.norm_stats=[-9,3]"]
    else:
        tiny += [f"data.train={folder}", f"train.init_from={teacher}", "data.min_epoch_items=16",
                 "data.noise.train=synthetic", "data.synthetic_seconds=1.0", "data.noise.norm_stats=[-9,3]"]
    tr = pretrain(load_config(path, tiny))
    assert all(np.isfinite(r["loss_off"]) for r in read_metrics(tr.out_dir))


def test_the_clap_recipe_is_the_originals_and_a_tiny_variant_trains(tmp_path):
    """clap/train_clap.py's command: --loss_off .01, --batch_size 512 on 4 GPUs, --epochs 300, --blr 3e-4, --seed 3,
    GTE-base caption embeddings (768, mean pooled) for a ViT-Base (768: the text projection is an identity). The
    original's gather has no gradient, so its 4 GPUs train the CLAP term at 0.01 / 4 of fastm2d's arithmetic."""
    from pathlib import Path
    path = Path(__file__).parent.parent / "configs" / "m2d_clap.yaml"
    full = load_config(path, [])
    original_weight, original_gpus = 0.01, 4
    assert (full.model.lambda_m2d, full.model.lambda_off, full.offline.task) == \
        (1.0, pytest.approx(original_weight / original_gpus), "clap")
    assert (full.train.batch_size * full.train.accum_steps, full.train.epochs, full.train.base_lr,
            full.train.seed) == (2048, 300, 3e-4, 3)
    assert (full.offline.text_encoder, full.offline.text_pooling) == ("thenlper/gte-base", "mean")
    folder = labelled_folder(tmp_path)
    np.savez(tmp_path / "e.npz", **{f"c{i}": np.random.randn(2, 768).astype(np.float32) for i in range(8)})
    tiny = [*TINY_MODEL, f"out_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2",
            "data.num_workers=0", "train.progress=false", "train.tensorboard=false", "data.norm_stats=[-8,4]",
            "train.log_every=1", f"data.train={folder}", f"offline.caption_embeddings={tmp_path / 'e.npz'}"]
    tr = pretrain(load_config(path, tiny))
    assert tr.model.text_proj.weight.shape == (64, 768)
    assert all(np.isfinite(r["loss_off"]) for r in read_metrics(tr.out_dir))


def test_adapt_builds_the_recipe_and_prints_the_plan(tmp_path, capsys):
    from fastm2d.cli import main
    from fastm2d.train.adapt import adapt_config
    start, _ = write_m2d_checkpoint(tmp_path)
    folder = labelled_folder(tmp_path)
    cfg = adapt_config(str(folder), str(start), "synthetic", str(tmp_path / "a"), [])
    assert (cfg.offline.task, cfg.train.init_from, cfg.data.min_epoch_items, cfg.train.epochs) == \
        ("regularize", str(start), 10000, 600)
    assert cfg.train.batch_size * cfg.train.accum_steps == 128 and cfg.data.noise.eta == 0.3
    assert (cfg.model.embed_dim, cfg.model.input_size) == (64, [80, 64])  # the checkpoint's shape
    args = ["adapt", str(folder), "--from", str(start), "--out", str(tmp_path / "run"), "train.max_steps=3",
            "train.batch_size=2", "train.accum_steps=1", "data.min_epoch_items=16", "train.progress=false",
            "train.tensorboard=false", "data.num_workers=0", "data.stats_items=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "plan: 8 usable clips, 16 items per epoch, 3 optimiser steps of 2" in out
    assert "s per optimiser step: about" in out and "for the remaining 1 steps" in out
    saved = json.loads(json.dumps(torch.load(tmp_path / "run" / "checkpoint-3.pth", weights_only=True)["config"]))
    assert saved["offline"]["task"] == "regularize"


@pytest.mark.parametrize("task, extra, original", [
    ("clap", ["offline.caption_embeddings=e.npz"], 0.01),  # clap/train_clap.py: --loss_off default .01
    ("labels", ["offline.labels=l.csv"], 1.0),  # M2D-AS: lambda 1.0 / 1.0 (docs/spec.md, the paper)
    ("distill", ["offline.features=f"], 0.5),  # M2D-S: lambda_off 0.5 (the paper)
    ("regularize", ["train.init_from=w.pth"], 1.0),  # further pre-training: 1.0 / 1.0 (the paper)
])
def test_each_offline_task_defaults_to_the_originals_weight(task, extra, original):
    """model.lambda_off unset: the weight the original trains that task with (once 1.0 for all: 100x CLAP's)."""
    assert load_config(None, [f"offline.task={task}", *extra]).model.lambda_off == original
    assert load_config(None, [f"offline.task={task}", *extra, "model.lambda_off=0.3"]).model.lambda_off == 0.3
