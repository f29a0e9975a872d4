"""M2D-X training tasks end to end on the tiny model: labels, distillation (precomputed features or a teacher),
noise direction, regularisation, init_from, resume, and one-line errors for bad task inputs."""
import argparse
import shutil

import numpy as np
import pytest
import torch

from fastm2d.config import ConfigError, load_config
from fastm2d.data import DataError
from fastm2d.model import M2D
from fastm2d.train import Trainer, pretrain, read_metrics

from .conftest import labelled_folder, tiny_model_config, write_m2d_checkpoint, write_tone


def test_labels_task_trains_from_a_csv(tmp_path, tiny_config):
    folder = labelled_folder(tmp_path)
    tr = pretrain(tiny_config(f"data.train={folder / 'labels.csv'}", "offline.task=labels", "train.batch_size=2",
                              "train.max_steps=3", "data.norm_stats=[-8,4]", "offline.balanced=true"))
    assert tr.model.cfg.off_dim == 4 and tr.model.cfg.off_loss == "bce"
    rows = read_metrics(tr.out_dir)
    assert all(np.isfinite(r["loss_off"]) and r["loss_off"] > 0 for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_m2d"] + rows[-1]["loss_off"], rel=1e-5)
    item = tr.data.dataset[(0, 5, 0)]
    assert item["offline"].tolist() == tr.offline.targets.matrix[0].tolist()
    # balanced sampling: item weight = sum over its labels of 1 / (clips with that label), counted here
    names = [line.split(",", 1)[1].strip('"').split(",") for line in (folder / "labels.csv").read_text().split()[1:]]
    counts = {c: sum(c in n for n in names) for c in ("dog", "bird", "car", "rain")}
    want = [sum(1 / counts[c] for c in n) for n in names]
    assert np.allclose(tr.offline.targets.balanced_weights(), want)
    assert np.allclose(tr.data.sampler.p, np.array(want) / sum(want))


def test_distillation_from_precomputed_features_aligned_to_the_crop(tmp_path, tiny_config):
    folder = tmp_path / "speech"
    feats = tmp_path / "feats"
    folder.mkdir(), feats.mkdir()
    for i in range(4):
        write_tone(folder / f"s{i}.wav", seconds=1.0, freq=300 + 100 * i)
        # 50 Hz teacher features whose value says the time: feature k = [k, k, ...] (10 wide)
        np.save(feats / f"s{i}.npy", np.repeat(np.arange(50, dtype=np.float32)[:, None], 10, axis=1))
    tr = Trainer(tiny_config(f"data.train={folder}", "offline.task=distill", f"offline.features={feats}",
                             "train.batch_size=2", "data.norm_stats=[-8,4]", "train.max_steps=2"))
    assert tr.model.cfg.off_dim == 10
    seed = 123
    item = tr.data.dataset[(1, seed, 0)]
    from fastm2d.data.dataset import crop_start
    full = tr.data.source.load(1)
    start = crop_start(full.shape[-1], 64, np.random.default_rng(seed))
    # patch frame p covers 10 ms x 16 = 160 ms from start: the mean of the 50 Hz frames centred inside it
    for p in range(4):
        lo = (start + 16 * p) * 0.01
        ks = [k for k in range(50) if lo <= (k + 0.5) / 50 < lo + 0.16]
        want = np.mean(ks) if ks else 49.0  # past the audio: the last frame repeated
        assert item["offline"][p, 0].item() == pytest.approx(want, abs=1e-5)
    tr.fit()
    assert all(np.isfinite(r["loss_off"]) for r in read_metrics(tr.out_dir))


def test_teacher_runs_on_clean_input_gets_no_gradient_and_is_not_saved(tmp_path, tiny_config):
    teacher_path, _ = write_m2d_checkpoint(tmp_path)
    tr = Trainer(tiny_config("offline.task=distill", f"offline.teacher={teacher_path}", "data.noise.train=synthetic",
                             "data.noise.eta=0.3", "data.norm_stats=[-8,4]", "train.max_steps=2",
                             "data.noise.norm_stats=[-10,3]"))
    teacher = tr.offline.teacher
    assert tr.model.cfg.off_dim == teacher.dim == 5 * 64
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    item = tr.data.dataset[(3, 11, 3)]
    batch = tr.to_batch(item["lms"][None], item["bg"][None])
    assert torch.equal(batch.teacher_x, item["lms"][None].float())  # the paper: the teacher hears the clean crop
    assert not torch.allclose(batch.x, (item["lms"][None] + 8) / 4)  # ... and the M2D branch the noisy mix
    tr.fit()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    opt_params = {id(p) for g in tr.engine.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    saved = torch.load(tr.out_dir / "checkpoint-2.pth", weights_only=True)
    assert not any("runtime" in k or "teacher" in k for k in saved["model"])
    assert saved["config"]["offline"]["teacher"] == str(teacher_path)  # only its path travels


def test_noise_direction_reverse_gives_the_teacher_the_mix(tmp_path, tiny_config):
    teacher_path, _ = write_m2d_checkpoint(tmp_path)
    tr = Trainer(tiny_config("offline.task=distill", f"offline.teacher={teacher_path}", "data.noise.train=synthetic",
                             "data.noise.eta=0.3", "data.norm_stats=[-8,4]", "data.noise.norm_stats=[-10,3]",
                             "data.noise.direction=noisy_teacher"))
    item = tr.data.dataset[(3, 11, 3)]
    raw, bg = item["lms"][None].double(), item["bg"][None].double()
    batch = tr.to_batch(item["lms"][None], item["bg"][None])
    assert torch.allclose(batch.x.double(), (raw + 8) / 4, atol=1e-5)  # M2D: clean
    mix = torch.log(0.7 * torch.exp(raw + 8) + 0.3 * torch.exp(bg + 10))  # eq. 5, centred, before / std
    assert torch.allclose(batch.teacher_x.double(), mix - 8, atol=1e-4)  # teacher: the mix, as log-mel


def test_regularize_starts_from_and_stays_near_the_checkpoint(tmp_path, tiny_config):
    start, src = write_m2d_checkpoint(tmp_path)
    tr = Trainer(tiny_config("offline.task=regularize", f"train.init_from={start}", "data.norm_stats=[-8,4]",
                             "train.max_steps=2"))
    for k, v in src.state_dict().items():
        if k.startswith(("blocks.", "cls_token", "patch_embed", "decoder_", "target_")) and k != "decoder_pos_embed":
            assert torch.equal(tr.model.state_dict()[k].cpu(), v), k
    assert tr.offline.teacher.path == str(start) and tr.model.cfg.off_dim == 5 * 64
    tr.fit()
    assert all(np.isfinite(r["loss_off"]) for r in read_metrics(tr.out_dir))


def test_init_from_original_named_encoder_only_weights(tmp_path, tiny_config):
    torch.manual_seed(5)
    src = M2D(tiny_model_config(num_heads=1, decoder_num_heads=16))
    enc = {f"module.{k}": v for k, v in src.state_dict().items()
           if k.startswith(("cls_token", "pos_embed", "patch_embed", "blocks", "norm."))}
    path = tmp_path / "m2d_vit_base-80x64p16x16-240101_enconly" / "checkpoint-300.pth"
    path.parent.mkdir()
    torch.save({"model": enc, "epoch": 300, "args": argparse.Namespace(blr=3e-4)}, path)
    tr = Trainer(tiny_config(f"train.init_from={path}", "model.num_heads=1", "data.norm_stats=[-8,4]"))
    sd = tr.model.state_dict()
    for k in enc:
        k = k[len("module."):]
        if k != "pos_embed":
            assert torch.equal(sd[k], src.state_dict()[k]), k
    assert torch.equal(sd["target_blocks.1.mlp.fc2.weight"], src.state_dict()["blocks.1.mlp.fc2.weight"])
    assert sd["norm_stats"].tolist() == [-8.0, 4.0]  # the run's own statistics


def test_resume_with_the_offline_branch_equals_the_uninterrupted_run(tmp_path, tiny_config):
    folder = labelled_folder(tmp_path)
    common = [f"data.train={folder / 'labels.csv'}", "offline.task=labels", "train.batch_size=2", "train.max_steps=6",
              "data.norm_stats=[-8,4]", "train.save_every=3"]
    whole = pretrain(tiny_config(*common, f"out_dir={tmp_path / 'whole'}"))
    part = tmp_path / "part"
    shutil.copytree(whole.out_dir, part)
    (part / "checkpoint-6.pth").unlink()
    resumed = pretrain(tiny_config(*common, f"out_dir={part}"), resume=True)
    a, b = read_metrics(whole.out_dir), read_metrics(part)
    assert [r["loss_off"] for r in b] == pytest.approx([r["loss_off"] for r in a], rel=1e-6)
    for k, v in whole.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[k], v, atol=1e-6), k


# ----------------------------------------------------------------------------------------- bad offline input -----
def test_bad_labels_are_one_line_errors(tmp_path, tiny_config):
    folder = labelled_folder(tmp_path, n=4)
    csv = folder / "labels.csv"
    cfg = [f"data.train={folder}", "offline.task=labels", "data.norm_stats=[-8,4]", "train.batch_size=2"]
    (folder / "partial.csv").write_text("file_name,labels\nc0.wav,dog\nc1.wav,bird\n")
    with pytest.raises(DataError, match=r"c2.wav: a training file with no row in .*partial.csv"):
        Trainer(tiny_config(*cfg, f"offline.labels={folder / 'partial.csv'}"))
    (folder / "classes.txt").write_text("dog\nbird\ncar\n")
    with pytest.raises(DataError, match=r"unknown class 'rain'"):
        Trainer(tiny_config(*cfg, f"offline.labels={csv}", f"offline.classes={folder / 'classes.txt'}"))
    (folder / "empty.csv").write_text("file_name,labels\nc0.wav,dog\nc1.wav,\nc2.wav,car\nc3.wav,rain\n")
    with pytest.raises(DataError, match=r"empty.csv:3: c1.wav: empty label list"):
        Trainer(tiny_config(*cfg, f"offline.labels={folder / 'empty.csv'}"))
    with pytest.raises(ConfigError, match="offline.labels"):
        load_config(None, ["offline.task=labels"])


def test_bad_teacher_features_and_teachers_are_one_line_errors(tmp_path, tiny_config):
    folder, feats = tmp_path / "a", tmp_path / "f"
    folder.mkdir(), feats.mkdir()
    for i in range(4):
        write_tone(folder / f"s{i}.wav", seconds=1.0)
        np.save(feats / f"s{i}.npy", np.zeros((50, 8), dtype=np.float32))
    cfg = [f"data.train={folder}", "offline.task=distill", f"offline.features={feats}", "data.norm_stats=[-8,4]"]
    np.save(feats / "s2.npy", np.zeros((50, 9), dtype=np.float32))
    with pytest.raises(DataError, match=r"s2.npy: features 9 wide, the others 8"):
        Trainer(tiny_config(*cfg))
    np.save(feats / "s2.npy", np.zeros((150, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"s2.npy: 150 frames at 50 Hz cover 3.00 s, the audio lasts 1.00 s"):
        Trainer(tiny_config(*cfg))
    (feats / "s2.npy").unlink()
    with pytest.raises(DataError, match=r"s2.npy: teacher features missing"):
        Trainer(tiny_config(*cfg))
    other, _ = write_m2d_checkpoint(tmp_path, patch_size=[16, 8])
    with pytest.raises(ConfigError, match="time patch width must match"):
        Trainer(tiny_config("offline.task=distill", f"offline.teacher={other}", "data.norm_stats=[-8,4]"))
    with pytest.raises(ConfigError, match="offline teacher: .*nowhere.pth: checkpoint not found"):
        Trainer(tiny_config("offline.task=distill", f"offline.teacher={tmp_path / 'nowhere.pth'}",
                            "data.norm_stats=[-8,4]"))


# ------------------------------------------------------------------------------------ recipes and `adapt` -----
