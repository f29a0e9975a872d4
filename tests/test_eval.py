"""Evaluation: scores against hand computations, the linear probe's extremes, embedding cache, monitors, report,
fine-tuning, HEAR-style embeddings, and the synthetic labelled tasks."""
import json
import math
import time

import numpy as np
import pytest
import torch

from fastm2d.eval import confidence_interval, mean_average_precision
from fastm2d.eval.linear import linear_eval
from fastm2d.eval.monitor import explained_variance, rank_me
from fastm2d.eval.scores import average_precision
from fastm2d.eval.tasks import EvalTask, load_tasks

from .conftest import write_tone


def test_average_precision_by_hand():
    # ranking: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (pos) -> precisions at the positives 1/1, 2/3, 3/4
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert average_precision(scores, np.array([1, 0, 1, 1])) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    two = np.stack([scores, 1 - scores], 1)
    labels = np.array([[1, 0], [0, 1], [1, 0], [1, 1]])
    # class 1 ranking by 1 - s: 0.9 (pos, item 3), 0.3 (neg), 0.2 (pos, item 1), 0.1 (neg) -> (1 + 2/3) / 2
    assert mean_average_precision(two, labels) == pytest.approx(((1 + 2 / 3 + 3 / 4) / 3 + (1 + 2 / 3) / 2) / 2)


def test_tied_scores_form_one_threshold_whatever_the_order():
    """The field's AP (sklearn's): a tie between a positive and a negative counts once at precision 1/2, not
    as the positive first or last depending on where the items happen to stand."""
    scores, labels = np.array([0.5, 0.5, 0.1]), np.array([1, 0, 1])
    expected = 0.5 * (1 / 2) + 0.5 * (2 / 3)  # recall steps 1/2 at precision 1/2, then 1/2 at precision 2/3
    assert average_precision(scores, labels) == pytest.approx(expected)
    assert average_precision(scores[[1, 0, 2]], labels[[1, 0, 2]]) == pytest.approx(expected)


def test_confidence_interval_is_the_t_formula():
    v = [0.71, 0.74, 0.69, 0.73, 0.70]
    m, half = confidence_interval(v)
    s = math.sqrt(sum((x - sum(v) / 5) ** 2 for x in v) / 4)
    assert m == pytest.approx(sum(v) / 5) and half == pytest.approx(2.7764451 * s / math.sqrt(5))  # t(0.975, 4)
    assert confidence_interval([0.1, 0.3])[1] == pytest.approx(12.7062047 * math.sqrt(0.02) / math.sqrt(2))  # 1 df
    assert confidence_interval([0.5]) == (0.5, 0.0)


def _toy_task(n=240, classes=4, separable=True, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    y = rng.integers(classes, size=n)
    centres = rng.standard_normal((classes, dim)) * (6.0 if separable else 0.0)
    x = centres[y] + rng.standard_normal((n, dim))
    splits = np.array(["train"] * (n // 2) + ["valid"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    labels = np.eye(classes, dtype=np.float32)[y]
    return x.astype(np.float32), EvalTask("toy", [f"x{i}" for i in range(n)], labels, splits, list("abcd")[:classes])


def test_probe_reaches_100_percent_on_separable_data_and_chance_on_shuffled_labels():
    x, task = _toy_task()
    assert linear_eval(x, task, seeds=2, max_epochs=60)["mean"] == pytest.approx(1.0)
    shuffled = EvalTask("shuffled", task.items, task.labels[np.random.default_rng(1).permutation(len(x))],
                        task.splits, task.classes)
    r = linear_eval(x, shuffled, seeds=3)
    assert abs(r["mean"] - 0.25) < 0.12  # 4 classes: chance


def test_synthetic_tasks_know_their_labels():
    from fastm2d.data.synthetic import synth_labelled_clip
    event, pitch = load_tasks("synthetic")
    assert (event.name, pitch.name, len(event.items)) == ("synthetic-event", "synthetic-pitch", 1500)
    for i in (0, 7, 599):
        _, k, b = synth_labelled_clip(event.synthetic["seed"], i, 0.2)
        assert event.labels[i].argmax() == k and pitch.labels[i].argmax() == b
    assert set(event.splits) == {"train", "valid", "test"} and event.labels.sum(0).min() > 60  # balanced enough


def test_csv_task_and_its_errors(tmp_path):
    from fastm2d.data import DataError
    for i in range(6):
        write_tone(tmp_path / f"a{i}.wav", seconds=0.3)
    labels = ['"x,y"', "x", "y", "x", "y", "x"]  # the first clip has two labels: a multi-label task
    splits = ["train", "valid", "test"] * 2
    (tmp_path / "meta.csv").write_text("file_name,label,split\n" + "".join(
        f"a{i}.wav,{labels[i]},{splits[i]}\n" for i in range(6)))
    (task,) = load_tasks(str(tmp_path))
    assert task.multi_label and task.classes == ["x", "y"] and task.labels[0].tolist() == [1, 1]
    (tmp_path / "bad.csv").write_text("file_name,label,split\na0.wav,x,training\n")
    with pytest.raises(DataError, match="split 'training'"):
        load_tasks(str(tmp_path / "bad.csv"))


def test_cached_embeddings_equal_recomputed_ones(tiny_run, tmp_path, capsys):
    from fastm2d.cli import main
    from fastm2d.eval.embeddings import embed_task, weights_key
    from fastm2d.transfer.runtime import load_encoder
    args = ["linear-eval", str(tiny_run), "synthetic:60", "--seeds", "1", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    cached = list((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 1  # both synthetic tasks share the clips, hence one embedding file
    event = load_tasks("synthetic:60")[0]
    again, rate = embed_task(load_encoder(tiny_run), event, progress=False)
    assert np.allclose(np.load(cached[0]), again, atol=1e-5) and rate > 0
    assert cached[0].name.startswith(weights_key(tiny_run))
    result = json.loads((tmp_path / "synthetic-event.json").read_text())
    assert result["metric"] == "accuracy" and 0 <= result["mean"] <= 1 and result["clips_per_s"] > 0
    assert "synthetic-pitch" in (tmp_path / "results.md").read_text()
    assert main(args + ["--untrained"]) == 0  # the baseline: same architecture, fresh weights
    assert main(args + ["--untrained", "--untrained-seed", "1"]) == 0  # another initialisation, not a cache hit
    cached = sorted((tmp_path / "cache").glob("*.npy"), key=lambda p: p.stat().st_mtime_ns)
    assert len(cached) == 3 and not np.allclose(np.load(cached[1]), np.load(cached[2]))


def test_task_embeddings_of_mixed_lengths_come_back_in_order_with_workers(tiny_run, tmp_path):
    """Clips of three lengths interleaved, decoded by two worker processes and batched by length (transfer/batching,
    as embed and tag batch): row i is still clip i's own embedding, computed alone."""
    from fastm2d.eval.embeddings import embed_task
    from fastm2d.frontend import read_audio
    from fastm2d.transfer.runtime import load_encoder
    rows = ["file_name,label,split"]
    for i in range(7):
        write_tone(tmp_path / f"c{i}.wav", seconds=(0.7, 1.3, 2.1)[i % 3], freq=300 + 60 * i)
        rows.append(f"c{i}.wav,{'xy'[i % 2]},{('train', 'valid', 'test')[i % 3]}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    (task,) = load_tasks(str(tmp_path))
    rt = load_encoder(tiny_run)
    emb, _ = embed_task(rt, task, batch_size=2, progress=False, workers=2)
    for i, item in enumerate(task.items):
        with torch.inference_mode():
            alone = rt.encode(read_audio(item, rt.sample_rate)[None], rt.sample_rate).float().mean(1)[0]
        assert np.allclose(emb[i], alone.numpy(), atol=1e-5), i


def test_rank_me_and_explained_variance_by_hand():
    u, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 2.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    x = u[:, :8] @ torch.diag(s) @ v.T
    p = np.array([0.5, 0.25, 0.25])
    assert rank_me(x, eps=0) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)  # = 2^1.5
    centred = x - x.mean(0)
    var = torch.linalg.svdvals(centred) ** 2
    assert np.allclose(explained_variance(x), (torch.cumsum(var, 0) / var.sum()).numpy())


def test_monitors_land_in_metrics_and_cost_what_they_claim(tiny_run, monkeypatch, tiny_config, tmp_path):
    from fastm2d.train import Trainer, read_metrics
    mons = read_metrics(tiny_run, monitors=True)
    assert [m["step"] for m in mons] == [1, 2]
    for m in mons:
        assert 1 <= m["rank_me"] <= 16 and len(m["explained_variance"]) == 16 and "valid_loss" in m
    assert [r["step"] for r in read_metrics(tiny_run)] == [1, 2]  # training rows stay apart
    tr = Trainer(tiny_config("train.eval_every=1", "eval.clips=8", "eval.task=synthetic:30", "train.max_steps=1",
                             "data.norm_stats=[-9,3.5]"))
    t0 = time.perf_counter()
    row = tr.monitor()
    wall = time.perf_counter() - t0
    assert abs(row["monitor_seconds"] - wall) < 0.05 * wall + 0.05
    assert 0 <= row["probe_synthetic-event"] <= 1 and 0 <= row["probe_synthetic-pitch"] <= 1


def test_report_draws_figures_and_a_summary(tiny_run):
    from fastm2d.cli import main
    assert main(["report", str(tiny_run)]) == 0
    md = (tiny_run / "report" / "report.md").read_text()
    assert "2 optimiser steps" in md and "rank_me" in md
    for png in ("loss.png", "schedule.png", "speed.png", "monitors.png"):
        data = (tiny_run / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and png in md


def test_hear_style_timestamp_embeddings(tiny_run, tmp_path):
    from fastm2d.cli import main
    wav = write_tone(tmp_path / "a.wav", seconds=1.5)
    assert main(["embed", "--level", "timestamp", "--weights", str(tiny_run), "--out", str(tmp_path / "e"),
                 str(wav)]) == 0
    feats, ts = np.load(tmp_path / "e" / "a.npy"), np.load(tmp_path / "e" / "a.timestamps.npy")
    assert len(feats) == len(ts) == 10 and np.allclose(ts, (np.arange(10) + 0.5) * 160.0)


def test_finetuning_a_tiny_model_beats_chance(tiny_run, tmp_path):
    from fastm2d.eval.finetune import FinetuneConfig, finetune
    _, pitch = load_tasks("synthetic:200")  # 3 classes: chance 1/3
    r = finetune(str(tiny_run), pitch, tmp_path, FinetuneConfig(epochs=6, batch_size=16, lr=3e-3, warmup_epochs=1))
    assert r["test"] > 0.5, r["history"]
    saved = torch.load(tmp_path / "finetuned-synthetic-pitch.pth", weights_only=True)
    assert saved["classes"] == ["low", "mid", "high"] and "head.weight" in saved["model"]


def test_finetuning_with_lars_beats_chance(tiny_run, tmp_path):
    """LARS steps each matrix by a fraction of its norm: with the AdamW head init (2e-5) the head hardly moved and
    this run stayed at chance (measured 32.5 % on 3 classes); the LARS head starts at 0.01."""
    from fastm2d.eval.finetune import FinetuneConfig, finetune
    _, pitch = load_tasks("synthetic:200")
    r = finetune(str(tiny_run), pitch, tmp_path, FinetuneConfig(epochs=6, batch_size=16, lr=10.0, warmup_epochs=1,
                                                                 optimizer="lars"))
    assert r["test"] > 0.5, r["history"]


def test_finetuning_runs_the_chosen_attention_kernel(tiny_run, tmp_path, monkeypatch):
    """`attention` reaches the encoder (the reference kernel is called), and the fused path and the reference give
    the same fine-tuning run (same seed, same batches)."""
    from fastm2d.eval.finetune import FinetuneConfig, finetune
    from fastm2d.model import attention
    calls = []
    reference = attention.BACKENDS["reference"]
    monkeypatch.setitem(attention.BACKENDS, "reference", lambda *a: calls.append(1) or reference(*a))
    _, pitch = load_tasks("synthetic:40")
    runs = []
    for a in ("sdpa", "reference"):
        runs.append(finetune(str(tiny_run), pitch, tmp_path / a, FinetuneConfig(epochs=2, batch_size=8, attention=a)))
        assert bool(calls) == (a == "reference")
    fused, ref = ([h["loss"] for h in r["history"]] for r in runs)
    assert np.allclose(fused, ref, atol=1e-4), (fused, ref)


def test_lars_steps_equal_the_formula_by_hand():
    """Two LARS steps against the update rule written out in float64: a weight matrix gets decay and the trust
    ratio eta * |w| / |g + wd w|, the bias plain momentum SGD; the momentum buffer carries the scaled update."""
    from fastm2d.eval.lars import LARS
    lr, mom, wd, eta = 0.5, 0.9, 0.1, 0.01
    w0 = [[1.0, -2.0], [0.5, 3.0]]
    b0 = [0.25, -1.0]
    grads = [([[0.2, 0.1], [-0.3, 0.4]], [1.0, -0.5]), ([[-0.1, 0.5], [0.2, 0.0]], [0.3, 0.2])]
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    opt = LARS([w, b], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta)
    for gw, gb in grads:
        w.grad, b.grad = torch.tensor(gw, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64)
        opt.step()
    # by hand, element by element
    ew, eb = [row[:] for row in w0], b0[:]
    mw, mb = [[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0]
    for gw, gb in grads:
        u = [[gw[i][j] + wd * ew[i][j] for j in range(2)] for i in range(2)]
        wn = sum(x * x for r in ew for x in r) ** 0.5
        un = sum(x * x for r in u for x in r) ** 0.5
        q = eta * wn / un
        mw = [[mom * mw[i][j] + q * u[i][j] for j in range(2)] for i in range(2)]
        ew = [[ew[i][j] - lr * mw[i][j] for j in range(2)] for i in range(2)]
        mb = [mom * mb[k] + gb[k] for k in range(2)]
        eb = [eb[k] - lr * mb[k] for k in range(2)]
    assert torch.allclose(w.detach(), torch.tensor(ew, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(b.detach(), torch.tensor(eb, dtype=torch.float64), atol=1e-12)


def test_timm_lars_matches_ours_only_without_weight_decay():
    """Why eval/lars.py stays: timm.optim.Lars divides by |g| + wd |w|, MAE's rule by |g + wd w|."""
    from timm.optim import Lars

    from fastm2d.eval.lars import LARS

    def run(make, wd):
        torch.manual_seed(0)
        w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        opt = make(w, b, wd)
        for step in range(3):
            torch.manual_seed(10 + step)
            w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
            opt.step()
        return torch.cat([w.detach().flatten(), b.detach()])

    ours = lambda w, b, wd: LARS([w, b], lr=0.5, momentum=0.9, weight_decay=wd, trust_coefficient=0.01)  # noqa: E731
    timm = lambda w, b, wd: Lars([{"params": [w], "weight_decay": wd, "always_adapt": True},  # noqa: E731
                                  {"params": [b], "weight_decay": 0.0}], lr=0.5, momentum=0.9, trust_coeff=0.01,
                                 eps=0.0)
    assert torch.allclose(run(ours, 0.0), run(timm, 0.0), atol=1e-12)
    assert (run(ours, 0.1) - run(timm, 0.1)).abs().max() > 1e-4


@pytest.mark.parametrize("diverge_in_epoch", [1, 2])
def test_a_finetune_whose_loss_goes_nan_says_so_and_keeps_no_nan_weights(tiny_run, tmp_path, monkeypatch, capsys,
                                                                         diverge_in_epoch):
    """Before: a NaN loss made NaN weights, whose NaN logits still scored (argmax), so the run exited 0 with a score and
    saved them. Now: TrainingDiverged naming the epoch (exit 2 from the command); the file holds the last finite
    best epoch's weights, or is never written."""
    from fastm2d.cli import main
    from fastm2d.errors import TrainingDiverged
    from fastm2d.eval import finetune as ft
    real_augment, calls = ft._augment, []
    task = load_tasks("synthetic:40")[0]
    steps_per_epoch = len(task.index("train")) // 8

    def poisoned(x, y, cfg, g):  # a NaN enters the input batch from the chosen epoch on (as a bad clip would)
        x, y = real_augment(x, y, cfg, g)
        calls.append(1)
        if len(calls) > (diverge_in_epoch - 1) * steps_per_epoch:
            x = x.clone()
            x[0] = float("nan")
        return x, y
    monkeypatch.setattr(ft, "_augment", poisoned)
    with pytest.raises(TrainingDiverged, match=f"NaN/inf in epoch {diverge_in_epoch}"):
        ft.finetune(str(tiny_run), task, tmp_path, ft.FinetuneConfig(epochs=3, batch_size=8))
    saved = tmp_path / f"finetuned-{task.name}.pth"
    if diverge_in_epoch == 1:
        assert not saved.exists()
    else:
        state = torch.load(saved, weights_only=True)
        assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / f"finetuned-{task.name}.json").exists()  # no score reported
    assert main(["finetune", "synthetic:40", "--weights", str(tiny_run), "--out", str(tmp_path / "cli"),
                 "--epochs", "2"]) == 2
    assert "NaN/inf in epoch" in capsys.readouterr().err
