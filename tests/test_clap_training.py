"""M2D-CLAP training (offline.task=clap): the CLIP loss against a float64 formula, its global-batch gradient over
two gloo ranks against one process, captions encoded once through the cache, and what a run writes read back by
fastm2d's zero-shot and in the original's M2D-CLAP key layout."""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch

from fastm2d.config import ConfigError, load_config
from fastm2d.data import DataError
from fastm2d.model.clip_loss import LOGIT_SCALE_MAX, clip_loss
from fastm2d.train import Trainer, pretrain, read_metrics

from .conftest import TINY_TRAIN, tiny_bert, tone_folder


def _clip_loss_float64(a: np.ndarray, t: np.ndarray, scale: float) -> float:
    """CLIP's loss written out: cosine similarities, log-softmax along each axis, the diagonal's mean."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = scale * a @ t.T
    def diag_nll(m):
        m = m - m.max(axis=1, keepdims=True)
        return -(np.diag(m) - np.log(np.exp(m).sum(axis=1))).mean()
    return (diag_nll(logits) + diag_nll(logits.T)) / 2


def test_clip_loss_equals_the_float64_formula():
    g = torch.Generator().manual_seed(0)
    a, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    got = clip_loss(a, t, torch.tensor(math.exp(2.0))).item()
    want = _clip_loss_float64(a.double().numpy(), t.double().numpy(), math.exp(2.0))
    assert got == pytest.approx(want, rel=1e-5)
    # matched pairs score lower than shuffled ones
    assert clip_loss(a, a + 0.01 * t, torch.tensor(10.0)) < clip_loss(a, t, torch.tensor(10.0))


# ------------------------------------------------------------------------- two gloo ranks vs one process ----
class _Heads(torch.nn.Module):
    """Stands in for the online encoder's token mean -> audio_proj and the caption -> text_proj."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.audio = torch.nn.Linear(8, 6)
        self.text = torch.nn.Linear(5, 6)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x, c):
        return clip_loss(self.audio(x), self.text(c), self.logit_scale.exp())


def _batch():
    g = torch.Generator().manual_seed(11)
    return torch.randn(8, 8, generator=g), torch.randn(8, 5, generator=g)


def _rank_grads(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, c = _batch()
    per = len(x) // world
    heads = _Heads()
    loss = heads(x[rank * per:(rank + 1) * per], c[rank * per:(rank + 1) * per])
    loss.backward()
    for p in heads.parameters():  # what DeepSpeed / DDP do with the gradients: the mean over ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    if rank == 0:
        torch.save({"loss": loss.detach(), **{n: p.grad for n, p in heads.named_parameters()}}, out)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_give_the_one_process_loss_and_gradients_of_the_global_batch(tmp_path):
    out = tmp_path / "grads.pt"
    torch.multiprocessing.spawn(_rank_grads, args=(2, _free_port(), str(out)), nprocs=2)
    two = torch.load(out)
    heads = _Heads()
    x, c = _batch()
    loss = heads(x, c)
    loss.backward()
    assert two["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    for name, p in heads.named_parameters():
        assert torch.allclose(two[name], p.grad, rtol=1e-5, atol=1e-7), name


# ------------------------------------------------------------------------------------ training runs -----
def _tiny_sentence_encoder(folder, width=16):
    return tiny_bert(folder, ["a", "low", "high", "tone", "hum", "whistle", "beep"], width)


@torch.no_grad()
def _mean_pooled(tok, model, texts):
    batch = tok(texts, padding=True, return_tensors="pt")
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return ((h * m).sum(1) / m.sum(1)).numpy()


CAPTIONS = {0: ["a low tone", "a low hum"], 1: ["a high whistle"], 2: ["a high beep", "a high tone"], 3: ["a hum"]}


def _captioned_clips(tmp_path, n=8):
    """Tones with captions.csv: each clip's kind described in several captions."""
    return tone_folder(tmp_path, n, 0.8, lambda i: 200 + 300 * (i % 4), "captions.csv", "file_name,caption",
                       lambda i: [f"c{i}.wav,{text}" for text in CAPTIONS[i % 4]])


def _clap_overrides(tmp_path, folder, encoder):
    return [f"data.train={folder}", "offline.task=clap", f"offline.captions={folder / 'captions.csv'}",
            f"offline.text_encoder={encoder}", f"offline.caption_cache={tmp_path / 'cache'}",
            "data.norm_stats=[-8,4]", "train.batch_size=4", "model.lambda_off=0.01"]


def test_clap_task_trains_and_zero_shot_reads_what_it_wrote(tmp_path, tiny_config, monkeypatch):
    from fastm2d.checkpoint import export_original, load_model, read_checkpoint
    from fastm2d.transfer.clap import ZeroShot
    from fastm2d.transfer.runtime import load_encoder
    tok, bert = _tiny_sentence_encoder(tmp_path / "text")
    folder = _captioned_clips(tmp_path)
    tr = pretrain(tiny_config(*_clap_overrides(tmp_path, folder, tmp_path / "text"), "train.max_steps=3"))
    m = tr.model
    assert (m.cfg.off_dim, m.cfg.off_loss, m.cfg.text_encoder) == (16, "clip", str(tmp_path / "text"))
    rows = read_metrics(tr.out_dir)
    assert all(np.isfinite(r["loss_off"]) and r["loss_off"] > 0 for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_m2d"] + 0.01 * rows[-1]["loss_off"], rel=1e-5)
    # each crop's target is one of ITS captions, encoded independently here (mean pooling), drawn by the seed
    want = {i: _mean_pooled(tok, bert, CAPTIONS[i % 4]) for i in range(8)}
    drawn = set()
    for seed in range(12):
        got = tr.data.dataset[(2, seed, 0)]["offline"].numpy()
        k = int(np.argmin(np.abs(want[2] - got).max(axis=1)))
        assert np.allclose(want[2][k], got, atol=1e-5)
        drawn.add(k)
    assert drawn == {0, 1}  # both captions of clip 2 are used
    assert np.allclose(tr.data.dataset[(2, 5, 0)]["offline"], tr.data.dataset[(2, 5, 0)]["offline"])  # exact resume
    # the original's M2D-CLAP layout: audio_proj.0/2 (D -> D -> D), text_proj a Linear from the caption width
    state, cfg, _, _ = read_checkpoint(tr.out_dir)
    assert state["audio_proj.0.weight"].shape == (64, 64) and state["audio_proj.2.weight"].shape == (64, 64)
    assert state["text_proj.weight"].shape == (64, 16) and "text_proj.bias" in state
    assert state["logit_scale"].shape == () and "offline_predictor.weight" not in state
    assert load_model(tr.out_dir).cfg.off_loss == "clip"  # the full model reloads (to resume or init_from)
    # zero-shot: the recorded text encoder, no argument needed; scores as computed here from the weights
    zs = ZeroShot(tr.out_dir)
    wav = torch.randn(2, 16000) * 0.1
    labels = ["a low tone", "a high whistle"]
    rt = load_encoder(tr.out_dir)
    with torch.no_grad():
        tokens = rt.patch_tokens(rt.encode(wav, 16000))
        a = torch.nn.functional.normalize(m.audio_proj(tokens.mean(1)), dim=-1)
        t = torch.nn.functional.normalize(m.text_proj(torch.from_numpy(_mean_pooled(tok, bert, labels))), dim=-1)
    assert torch.allclose(zs.similarity(wav, 16000, labels), a @ t.T, atol=1e-4)
    # exported in the original's naming: an m2d_clap folder the original's portable runtime parses
    out = export_original(tr.out_dir, tmp_path / "export", encoder_only=True)
    assert out.parent.name.startswith("m2d_clap_vit_tiny-80x64p16x16-")
    exported = torch.load(out, weights_only=True)["model"]
    assert {k for k in exported if k.startswith(("audio_proj", "text_proj"))} == \
        {"audio_proj.0.weight", "audio_proj.0.bias", "audio_proj.2.weight", "audio_proj.2.bias", "text_proj.weight",
         "text_proj.bias"}
    # a second run encodes nothing: every caption comes from the cache (the text model is never loaded)
    import fastm2d.transfer.clap
    monkeypatch.setattr(fastm2d.transfer.clap, "TextEncoder", None)
    tr2 = Trainer(tiny_config(*_clap_overrides(tmp_path, folder, tmp_path / "text"), "train.max_steps=1",
                              f"out_dir={tmp_path / 'run2'}"))
    assert np.array_equal(tr2.offline.targets.table, tr.offline.targets.table)


def test_clap_from_precomputed_embeddings_with_an_identity_text_projection(tmp_path, tiny_config):
    folder = _captioned_clips(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "capemb.npz", **{f"c{i}": rng.standard_normal((1 + i % 2, 64)).astype(np.float32)
                                         for i in range(8)})
    tr = pretrain(tiny_config(f"data.train={folder}", "offline.task=clap",
                              f"offline.caption_embeddings={tmp_path / 'capemb.npz'}", "data.norm_stats=[-8,4]",
                              "train.max_steps=2"))
    assert isinstance(tr.model.text_proj, torch.nn.Identity)  # 64-wide captions on a 64-wide encoder
    assert tr.model.cfg.off_dim == 64
    assert all(np.isfinite(r["loss_off"]) for r in read_metrics(tr.out_dir))


def test_the_temperature_is_clamped_after_each_step_as_the_original(tmp_path, tiny_config):
    folder = _captioned_clips(tmp_path)
    np.savez(tmp_path / "capemb.npz", **{f"c{i}": np.ones((1, 64), np.float32) * i for i in range(8)})
    tr = Trainer(tiny_config(f"data.train={folder}", "offline.task=clap", "data.norm_stats=[-8,4]",
                             f"offline.caption_embeddings={tmp_path / 'capemb.npz'}", "train.max_steps=1"))
    with torch.no_grad():
        tr.model.logit_scale.fill_(9.0)
    tr.fit()
    assert tr.model.logit_scale.item() <= LOGIT_SCALE_MAX + 1e-6


def test_clap_inputs_that_cannot_work_are_one_line_errors(tmp_path, tiny_config):
    folder = _captioned_clips(tmp_path)
    with pytest.raises(ConfigError, match="offline.text_encoder .* or offline.caption_embeddings"):
        Trainer(tiny_config(f"data.train={folder}", "offline.task=clap"))
    with pytest.raises(ConfigError, match="needs training files"):
        np.savez(tmp_path / "e.npz", c0=np.ones(4, np.float32))
        Trainer(tiny_config("offline.task=clap", f"offline.caption_embeddings={tmp_path / 'e.npz'}"))
    with pytest.raises(DataError, match="no embeddings for 7 of 8 training files"):
        Trainer(tiny_config(f"data.train={folder}", "offline.task=clap", "data.norm_stats=[-8,4]",
                            f"offline.caption_embeddings={tmp_path / 'e.npz'}"))
    (folder / "captions.csv").write_text("file_name,caption\nc0.wav,a tone\n")
    with pytest.raises(DataError, match="no caption for 7 of 8 training files"):
        Trainer(tiny_config(*_clap_overrides(tmp_path, folder, tmp_path / "nowhere")))
    (folder / "captions.csv").write_text("file_name,caption\nc0.wav,\n")
    with pytest.raises(DataError, match="captions.csv:2: c0.wav: empty caption"):
        Trainer(tiny_config(*_clap_overrides(tmp_path, folder, tmp_path / "nowhere")))
    rows = "\n".join(f"c{i}.wav,a tone" for i in range(8))
    (folder / "captions.csv").write_text(f"file_name,caption\n{rows}\n")
    with pytest.raises(ConfigError, match="offline.text_encoder: text encoder .*nowhere: not found locally"):
        Trainer(tiny_config(*_clap_overrides(tmp_path, folder, tmp_path / "nowhere")))


def test_targets_per_file_are_refused_with_the_dali_loader():
    """The DALI loader carries no per-file targets: labels, precomputed features and captions would silently
    train without their loss."""
    for task in (["offline.task=labels", "offline.labels=x.csv"], ["offline.task=clap", "offline.caption_embeddings=e.npz"],
                 ["offline.task=distill", "offline.features=f"]):
        with pytest.raises(ConfigError, match="DALI loader does not carry"):
            load_config(None, [*TINY_TRAIN, "data.train=clips", "data.loader=dali", *task])

