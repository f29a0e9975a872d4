"""M2D-X (paper III-B): the offline branch against computations written here in float64, its three tasks,
gradients, the teacher, noise direction, resume, starting from weights, and bad offline inputs."""
import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from fastm2d.config import ConfigError, load_config
from fastm2d.data import DataError
from fastm2d.model import M2D
from fastm2d.train import Trainer, pretrain, read_metrics

from .conftest import TINY_TRAIN, tiny_model_config, write_tone


# ------------------------------------------------------------------ the branch against float64, written here -----
def _offline_frames_by_hand(model, out):
    """Every online token back in patch order by explicit indexing, then eq. 4, in float64."""
    z = torch.cat([out["z_visible"], out["pred"]], dim=1).double()
    ids = out["ids_shuffle"]
    b, n, d = z.shape
    restored = torch.empty_like(z)
    for s in range(b):
        for j in range(n):
            restored[s, ids[s, j]] = z[s, j]
    f, t = model.grid
    return torch.einsum("bftd->btfd", restored.reshape(b, f, t, d)).reshape(b, t, f * d)


def _linear(model, z):
    w, bias = model.offline_predictor.weight.double(), model.offline_predictor.bias.double()
    return z @ w.T + bias


def _eq2(pred, target):
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = pred / pred.norm(dim=-1, keepdim=True)
    target = target / target.norm(dim=-1, keepdim=True)
    return (2 - 2 * (pred * target).sum(-1)).mean()


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_distillation_loss_is_eq2_on_eq4_frames(kernels):
    torch.manual_seed(1)
    model = M2D(tiny_model_config(off_dim=12, lambda_m2d=1.0, lambda_off=0.5, kernels=kernels))
    x, target = torch.randn(3, 1, 80, 64), torch.randn(3, 4, 12)
    out = model(x, offline_target=target)
    want = _eq2(_linear(model, _offline_frames_by_hand(model, out)), target.double())
    assert out["loss_off"].item() == pytest.approx(want.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx(out["loss_m2d"].item() + 0.5 * want.item(), abs=1e-5)


@pytest.mark.parametrize("single", [False, True])
def test_label_losses_average_frame_logits_over_time(single):
    torch.manual_seed(2)
    model = M2D(tiny_model_config(off_dim=5, off_loss="ce" if single else "bce"))
    x = torch.randn(4, 1, 80, 64)
    labels = torch.zeros(4, 5)
    labels[0, 1] = labels[1, 3] = labels[2, 0] = labels[3, 4] = 1
    if not single:
        labels[0, 2] = 1  # multi-hot
    out = model(x, offline_target=labels)
    logits = _linear(model, _offline_frames_by_hand(model, out)).mean(1)
    y = labels.double()
    if single:
        want = -(y * torch.log_softmax(logits, -1)).sum(-1).mean()
    else:
        sig = 1 / (1 + torch.exp(-logits))
        want = -(y * torch.log(sig) + (1 - y) * torch.log(1 - sig)).mean()
    assert out["loss_off"].item() == pytest.approx(want.item(), abs=1e-5)


def test_plain_m2d_has_zero_offline_loss_and_the_original_key_name():
    model = M2D(tiny_model_config(off_dim=8))
    assert "offline_predictor.weight" in model.state_dict()
    out = model(torch.randn(2, 1, 80, 64))
    assert out["loss_off"].item() == 0 and torch.equal(out["loss"], out["loss_m2d"])


def test_gradients_reach_the_predictor_from_both_losses():
    torch.manual_seed(3)
    model = M2D(tiny_model_config(off_dim=6))
    x, target = torch.randn(2, 1, 80, 64), torch.randn(2, 4, 6)
    ids = model.random_ids_shuffle(2, x.device)
    model(x, ids, target)["loss_off"].backward()
    assert model.decoder_pred.weight.grad.abs().sum() > 0  # predictions feed the offline branch
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target_parameters())
    model.zero_grad(set_to_none=True)
    model(x, ids, target)["loss_m2d"].backward()
    assert model.decoder_pred.weight.grad.abs().sum() > 0 and model.offline_predictor.weight.grad is None


def test_ablation_options_match_their_definitions():
    torch.manual_seed(4)
    x = torch.randn(2, 1, 80, 64)
    m = M2D(tiny_model_config(depth=3, target_layers=[0, 2], loss="mse", mask_mode="time"))
    ids = m.random_ids_shuffle(2, x.device)
    f, t = m.grid
    for row in ids:  # time masks: whole columns, every frequency row of a visible column is visible
        visible_cols = {int(i) % t for i in row[:m.n_visible]}
        assert len(visible_cols) * f == m.n_visible and {int(i) % t for i in row[m.n_visible:]}.isdisjoint(visible_cols)
    out = m(x, ids)
    # The target: the mean of blocks 0 and 2 (before the final norm), written out here.
    patches = m.patch_embed(x) + m.pos_embed[:, 1:]
    masked = torch.stack([patches[s, ids[s, m.n_visible:]] for s in range(2)])
    h = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), masked], 1)
    outs = []
    for blk in m.target_blocks:
        h = blk(h)
        outs.append(h)
    target = m.target_norm((outs[0] + outs[2]) / 2)[:, 1:]
    assert torch.allclose(out["target"], target, atol=1e-5)
    std = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert out["loss_m2d"].item() == pytest.approx(((out["pred"] - std) ** 2).mean().item(), abs=1e-5)


# -------------------------------------------------------------------------------------- training, per task -----
def _labelled_folder(tmp_path, n=8):
    folder = tmp_path / "clips"
    folder.mkdir()
    rows = ["file_name,labels"]
    for i in range(n):
        write_tone(folder / f"c{i}.wav", seconds=0.7, freq=200 + 150 * (i % 4))
        rows.append(f'c{i}.wav,"{["dog", "bird", "car", "rain"][i % 4]}' + (',bird"' if i % 3 == 0 else '"'))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _write_m2d_checkpoint(tmp_path, name="teacher", **cfg):
    from fastm2d.checkpoint import atomic_save
    torch.manual_seed(7)
    m = M2D(tiny_model_config(**cfg))
    m.norm_stats.copy_(torch.tensor([-9.0, 3.0]))
    path = tmp_path / name / "checkpoint-1.pth"
    atomic_save({"model": m.state_dict(), "model_config": vars(m.cfg), "epoch": 1}, path)
    return path, m


def test_labels_task_trains_from_a_csv(tmp_path, tiny_config):
    folder = _labelled_folder(tmp_path)
    tr = pretrain(tiny_config(f"data.train={folder / 'labels.csv'}", "offline.task=labels", "train.batch_size=2",
                              "train.max_steps=3", "data.norm_stats=[-8,4]", "offline.balanced=true"))
    assert tr.model.cfg.off_dim == 4 and tr.model.cfg.off_loss == "bce"
    rows = read_metrics(tr.out_dir)
    assert all(np.isfinite(r["loss_off"]) and r["loss_off"] > 0 for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_m2d"] + rows[-1]["loss_off"], rel=1e-5)
    item = tr.dataset[(0, 5, 0)]
    assert item["offline"].tolist() == tr.offline.targets.matrix[0].tolist()
    # balanced sampling: item weight = sum over its labels of 1 / (clips with that label), counted here
    names = [line.split(",", 1)[1].strip('"').split(",") for line in (folder / "labels.csv").read_text().split()[1:]]
    counts = {c: sum(c in n for n in names) for c in ("dog", "bird", "car", "rain")}
    want = [sum(1 / counts[c] for c in n) for n in names]
    assert np.allclose(tr.offline.targets.balanced_weights(), want)
    assert np.allclose(tr.sampler.p, np.array(want) / sum(want))


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
    item = tr.dataset[(1, seed, 0)]
    from fastm2d.data.dataset import crop_start
    full = tr.source.load(1)
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
    teacher_path, _ = _write_m2d_checkpoint(tmp_path)
    tr = Trainer(tiny_config("offline.task=distill", f"offline.teacher={teacher_path}", "data.noise.train=synthetic",
                             "data.noise.eta=0.3", "data.norm_stats=[-8,4]", "train.max_steps=2",
                             "data.noise.norm_stats=[-10,3]"))
    teacher = tr.offline.teacher
    assert tr.model.cfg.off_dim == teacher.dim == 5 * 64
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    item = tr.dataset[(3, 11, 3)]
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
    teacher_path, _ = _write_m2d_checkpoint(tmp_path)
    tr = Trainer(tiny_config("offline.task=distill", f"offline.teacher={teacher_path}", "data.noise.train=synthetic",
                             "data.noise.eta=0.3", "data.norm_stats=[-8,4]", "data.noise.norm_stats=[-10,3]",
                             "data.noise.direction=noisy_teacher"))
    item = tr.dataset[(3, 11, 3)]
    raw, bg = item["lms"][None].double(), item["bg"][None].double()
    batch = tr.to_batch(item["lms"][None], item["bg"][None])
    assert torch.allclose(batch.x.double(), (raw + 8) / 4, atol=1e-5)  # M2D: clean
    mix = torch.log(0.7 * torch.exp(raw + 8) + 0.3 * torch.exp(bg + 10))  # eq. 5, centred, before / std
    assert torch.allclose(batch.teacher_x.double(), mix - 8, atol=1e-4)  # teacher: the mix, as log-mel


def test_regularize_starts_from_and_stays_near_the_checkpoint(tmp_path, tiny_config):
    start, src = _write_m2d_checkpoint(tmp_path)
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
    folder = _labelled_folder(tmp_path)
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
    folder = _labelled_folder(tmp_path, n=4)
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
    other, _ = _write_m2d_checkpoint(tmp_path, patch_size=[16, 8])
    with pytest.raises(ConfigError, match="time patch width must match"):
        Trainer(tiny_config("offline.task=distill", f"offline.teacher={other}", "data.norm_stats=[-8,4]"))
    with pytest.raises(ConfigError, match="offline teacher: .*nowhere.pth: checkpoint not found"):
        Trainer(tiny_config("offline.task=distill", f"offline.teacher={tmp_path / 'nowhere.pth'}",
                            "data.norm_stats=[-8,4]"))


# ------------------------------------------------------------------------------------ recipes and `adapt` -----
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
    folder = _labelled_folder(tmp_path)
    teacher, _ = _write_m2d_checkpoint(tmp_path)
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


def test_adapt_builds_the_recipe_and_prints_the_plan(tmp_path, capsys):
    from fastm2d.cli import main
    from fastm2d.train.adapt import adapt_config
    start, _ = _write_m2d_checkpoint(tmp_path)
    folder = _labelled_folder(tmp_path)
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


@pytest.mark.parametrize("name, loss", [("m2d_as_vit_base-80x64p16x16-240413", "bce"),
                                        ("m2d_x_vit_base-80x64p16x16-240101", "norm_mse"),
                                        ("m2d_s_vit_base-80x64p16x16-230220", "norm_mse")])
def test_original_m2dx_checkpoints_load_and_export_both_ways(tmp_path, name, loss):
    from fastm2d import load_model
    from fastm2d.checkpoint import export_original
    torch.manual_seed(6)
    src = M2D(tiny_model_config(num_heads=1, decoder_num_heads=16, off_dim=9, off_loss=loss))
    path = tmp_path / name / "checkpoint-300.pth"
    path.parent.mkdir()
    torch.save({"model": {k: v for k, v in src.state_dict().items() if k != "norm_stats"}, "epoch": 300}, path)
    loaded = load_model(path)
    assert (loaded.cfg.off_dim, loaded.cfg.off_loss) == (9, loss)
    x, target = torch.randn(2, 1, 80, 64), torch.randn(2, 4, 9) if loss == "norm_mse" else torch.rand(2, 9)
    ids = src.random_ids_shuffle(2, x.device)
    assert torch.allclose(src(x, ids, target)["loss"], loaded(x, ids, target)["loss"], atol=1e-6)
    out = export_original(path, tmp_path / "export", date="251126")
    assert out.parent.name.startswith("m2d_as_vit" if loss == "bce" else "m2d_x_vit")
    again = load_model(out)
    assert torch.equal(again.offline_predictor.weight, src.offline_predictor.weight)
