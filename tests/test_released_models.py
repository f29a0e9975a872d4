"""Every released M2D weight file, built here in its exact folder / file naming and key layout (random weights,
reduced width and depth), loads, and gives the features the original runtime computes from the same file.

The layouts follow the original code (github.com/nttcslab/m2d: examples/portable_m2d.py, m2d/runtime_audio.py,
util/to_encoder_only_weight.py, the README's weight tables): the encoder is timm's VisionTransformer (the
original's LocalViT) with `norm_stats`; pre-training files hold {'model': encoder + predictor + target [+ offline
predictor, CLAP projections], 'epoch', 'args'}; encoder-only files are the bare encoder state dict; fine-tuned
files are the original's EVAR state dict (`module.ar.runtime.backbone.*` + `module.head.*`). The reference
features below are computed by the original's algorithm written out in this file on the timm modules, never
through fastm2d's loader.
"""
from __future__ import annotations

import argparse
import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

D, DEPTH, DEC_D = 64, 2, 32  # reduced widths: 64 / 64 = one head, the original's 64 channels per head
# (folder, file, kind, extras): the README's three tables, plus M2D-CLAP 2025
RELEASES = [
    ("m2d_clap_vit_base-80x1001p16x16-240128_AS-FT_enconly", "weights_ep67it3124-0.48558.pth", "finetuned",
     ("clap2024",)),
    ("m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly", "weights_ep69it3124-0.48494.pth", "finetuned", ()),
    ("m2d_vit_base-80x1001p16x16-221006-mr7_as_46ab246d", "weights_ep69it3124-0.47929.pth", "finetuned", ()),
    ("m2d_vit_base-80x200p16x4-230529", "checkpoint-300.pth", "full", ()),
    ("m2d_clap_vit_base-80x608p16x16-240128", "checkpoint-300.pth", "full", ("clap2024",)),
    ("m2d_as_vit_base-80x608p16x16-240213", "checkpoint-300.pth", "full", ("offline527",)),
    ("m2d_vit_base-80x608p16x16-221006-mr7", "checkpoint-300.pth", "full", ("no_norm_stats",)),
    ("m2d_vit_base-80x608p16x16-221006-mr6", "checkpoint-300.pth", "full", ("no_norm_stats",)),
    ("m2d_vit_base-80x608p16x16-221006-mr7_enconly", "checkpoint-300.pth", "enconly", ("no_norm_stats",)),
    ("m2d_vit_base-80x608p16x16-220930-mr7_enconly", "checkpoint-300.pth", "enconly", ("no_norm_stats",)),
    ("m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly", "weights_ep69it3124-0.48.pth", "finetuned", ()),
    ("m2d_as_vit_base-80x608p16x16p32k-240413_enconly", "checkpoint-300.pth", "enconly", ()),
    ("m2d_s_vit_base-80x608p80x2-230220", "checkpoint-300.pth", "full", ("offline768",)),
    ("m2d_s_vit_base-80x512p80x2-230301", "checkpoint-300.pth", "full", ("offline768",)),
    ("m2d_s_vit_base-80x400p80x2-230201", "checkpoint-300.pth", "full", ("offline768",)),
    ("m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025", "checkpoint-30.pth", "enconly", ("clap2025",)),
]


def _sizes(folder):
    field = folder.split("-")[1].split("p")
    return [int(a) for a in field[0].split("x")], [int(a) for a in field[1].split("x")]


def _vit(input_size, patch, dim=D, depth=DEPTH, heads=None):
    return VisionTransformer(img_size=tuple(input_size), patch_size=tuple(patch), in_chans=1, embed_dim=dim,
                             depth=depth, num_heads=heads or max(1, dim // 64), mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0)


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def build_release(root, folder, file, kind, extras, seed=0, text_state=None):
    """One release file in its layout -> (path, the timm encoder, extra modules for the reference). `text_state`: the
    fine-tuned caption encoder a 2025 'TI' release carries (a placeholder tensor when not given)."""
    input_size, patch = _sizes(folder)
    vit = _randomise(_vit(input_size, patch), seed).eval()
    grid = vit.patch_embed.grid_size
    enc = {k: v for k, v in vit.state_dict().items() if not k.startswith("head")}
    if "no_norm_stats" not in extras:  # 2022 files have none: the AudioSet statistics apply
        enc["norm_stats"] = torch.tensor([-8.5, 4.5])
    parts = {}
    if kind == "full":
        dec = _randomise(_vit(input_size, patch, DEC_D, 1, heads=16), seed + 1)
        state = dict(enc)
        state.update({f"decoder_{k}": v for k, v in dec.state_dict().items() if k.startswith(("blocks.", "norm."))})
        state.update({"mask_token": torch.randn(1, 1, DEC_D), "decoder_pos_embed": torch.randn(1, 1 + grid[0] * grid[1], DEC_D),
                      "decoder_embed.weight": torch.randn(DEC_D, D), "decoder_embed.bias": torch.randn(DEC_D),
                      "decoder_pred.weight": torch.randn(D, DEC_D), "decoder_pred.bias": torch.randn(D)})
        state.update({f"target_{k}": v.clone() for k, v in enc.items() if k.startswith(("blocks.", "norm."))})
        for tag, width in (("offline527", 527), ("offline768", 768)):
            if tag in extras:
                state["offline_predictor.weight"] = torch.randn(width, grid[0] * D)
                state["offline_predictor.bias"] = torch.randn(width)
    else:
        state = dict(enc)
    # M2D-CLAP, as the original builds it (portable_m2d.make_it_CLAP, M2D_CLAP_ViT): the audio projection reads the
    # encoder's patch tokens taken flat, so it is D wide (768 in the releases, not the 3840 of eq. 4's frames); no
    # text_proj keys: the original's text projection is an identity when the caption encoder is as wide (GTE-base
    # in 2024, BERT-base in 2025: 768).
    if "clap2024" in extras:  # get_MLP_projector(D, D, D) over the token mean
        audio = _randomise(torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU(), torch.nn.Linear(D, D)), seed + 2)
        parts = {"audio_proj": audio}
        if kind == "full":  # the training checkpoint: M2D_CLAP_ViT's whole state, its CLIP temperature included
            state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    if "clap2025" in extras:  # AudioToSemantic(D): a token and one-head blocks over the flat tokens (2 here)
        sem = torch.nn.Module()
        sem.sem_token = torch.nn.Parameter(torch.randn(1, 1, D))
        sem.sem_blocks = torch.nn.ModuleList([Block(D, 1, 1, qkv_bias=True, norm_layer=torch.nn.LayerNorm)
                                              for _ in range(2)])
        sem.norm = torch.nn.LayerNorm(D)
        _randomise(sem, seed + 4)
        parts = {"audio_proj": sem}
    for name, module in parts.items():
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    if kind == "finetuned":  # EVAR: the runtime's backbone and the head, under DDP's module. prefix
        n = 527
        head = {"module.head.norm.running_mean": torch.randn(grid[0] * D),
                "module.head.norm.running_var": torch.rand(grid[0] * D) + 0.5,
                "module.head.norm.num_batches_tracked": torch.tensor(100),
                "module.head.mlp.mlp.0.weight": torch.randn(n, grid[0] * D) * 0.05,
                "module.head.mlp.mlp.0.bias": torch.randn(n) * 0.05}
        obj = {**{f"module.ar.runtime.backbone.{k}": v for k, v in state.items()}, **head}
        parts["head"] = {k.split("module.head.")[1]: v for k, v in head.items()}
    elif "clap2025" in extras:
        # The 2025 release as the original's loader reads it (nttcslab/m2d examples/portable_m2d.py):
        # get_backbone (l. 280-287) takes checkpoint['model'], then extract_weight(..., 'backbone.') -> the encoder
        # and audio_proj; the folder's 'pBpTI' means text encoder 'B' (BertXEncoder) Included
        # (parse_clap_text_encoder_weight, l. 271-277), and get_text_encoder (l. 561-578) loads
        # extract_weight(weights['model'], 'text_encoder.') into BertXEncoder, whose BERT is its `text_encoder`
        # attribute: the file's keys are text_encoder.text_encoder.<BERT key>.
        text = text_state if text_state is not None else {"embeddings.word_embeddings.weight": torch.randn(8, 4)}
        obj = {"model": {**{f"backbone.{k}": v for k, v in state.items()},
                         **{f"text_encoder.text_encoder.{k}": v for k, v in text.items()}}}
    elif kind == "enconly":
        obj = state  # torch.save(model.backbone.state_dict())
    else:
        obj = {"model": state, "epoch": 300, "optimizer": {}, "scaler": {},
               "args": argparse.Namespace(input_size=f"{input_size[0]}x{input_size[1]}", model=folder.split("-")[0])}
    path = root / folder / file
    path.parent.mkdir(parents=True)
    torch.save(obj, path)
    return path, vit, parts, enc.get("norm_stats", torch.tensor([-7.1, 4.2]))


def original_frames(vit, lms, input_size, patch, flat=False):
    """portable_m2d's encode_lms on the timm encoder: chunks of the input length, the tail padded to a whole
    patch, a short chunk reading the first columns of the position table, CLS dropped, (f t) d -> t (f d);
    `flat` (its flat_features, what encode_clap_audio reads): the patch tokens as they are, chunk after chunk."""
    unit, pt = input_size[1], patch[1]
    fbins = input_size[0] // patch[0]
    pad = (pt - (lms.shape[-1] % unit % pt)) % pt
    x_all = F.pad(lms, (0, pad))
    out = []
    for i in range((x_all.shape[-1] + unit - 1) // unit):
        x = vit.patch_embed.proj(x_all[..., i * unit:(i + 1) * unit]).flatten(2).transpose(1, 2)
        pos = vit.pos_embed[:, 1:, :]
        if x.shape[1] < pos.shape[1]:
            pos = pos.reshape(1, fbins, -1, pos.shape[-1])[:, :, :x.shape[1] // fbins].reshape(1, x.shape[1], -1)
        x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x + pos], dim=1)
        for blk in vit.blocks:
            x = blk(x)
        emb = vit.norm(x)[:, 1:]
        b, n, d = emb.shape
        if flat:
            out.append(emb)
            continue
        out.append(emb.reshape(b, fbins, n // fbins, d).permute(0, 2, 1, 3).reshape(b, n // fbins, fbins * d))
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def lms_12s():
    torch.manual_seed(3)
    return torch.randn(2, 1, 80, 1201)  # 12 s of normalised log-mel


@pytest.mark.parametrize("folder, file, kind, extras", RELEASES, ids=[r[0] for r in RELEASES])
def test_each_release_loads_and_gives_the_original_features(tmp_path, lms_12s, folder, file, kind, extras):
    from fastm2d import load_encoder, load_model
    path, vit, parts, norm_stats = build_release(tmp_path, folder, file, kind, extras)
    input_size, patch = _sizes(folder)
    rt = load_encoder(path)
    assert rt.sample_rate == (32000 if "p32k" in folder else 16000)
    assert rt.encoder.norm_stats.tolist() == pytest.approx(norm_stats.tolist())
    with torch.no_grad():
        ours, ref = rt.encode_lms(lms_12s), original_frames(vit, lms_12s, input_size, patch)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), (ours - ref).abs().max()
    if input_size == [80, 1001]:  # 12 s -> 62 + 13 frames (1001-frame chunks; 992-frame ones would give 76)
        assert ours.shape[1] == 75
        times = rt.frame_times_ms(1201)
        assert times[61].item() == pytest.approx((61 * 16 + 8) * 10) and times[62].item() == pytest.approx((1001 + 8) * 10)
    if kind == "full":
        model = load_model(path)
        assert (getattr(model, "audio_proj", None) is not None) == ("clap2024" in extras)
        clap = "clap2024" in extras  # the M2D-CLAP model as trained: caption width D, an identity text projection
        assert isinstance(getattr(model, "text_proj", None), torch.nn.Identity) == clap
        assert model.cfg.off_dim == {"offline527": 527, "offline768": 768, "clap2024": D}.get(next(iter(extras), ""), 0)
        assert (model.cfg.off_loss == "clip") == clap
    if "audio_proj" in parts:  # M2D-CLAP: the audio embedding, as portable_m2d's encode_clap_audio computes it
        from fastm2d.model.projections import SemanticProjector
        want = original_clap_audio(parts["audio_proj"], original_frames(vit, lms_12s, input_size, patch, flat=True),
                                   "clap2025" in extras)
        assert isinstance(rt.audio_proj, SemanticProjector) == ("clap2025" in extras)
        assert getattr(rt, "text_proj", None) is None  # the releases have none
        with torch.no_grad():
            from fastm2d.model.projections import audio_embedding
            got = audio_embedding(rt.patch_tokens(ours), rt.audio_proj)
        assert got.shape == (2, D) and torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def original_clap_audio(audio_proj, tokens, semantic: bool):
    """encode_clap_audio on flat tokens (B, N, D): the semantic head reads them all (AudioToSemantic.forward), every
    other projection their mean."""
    if not semantic:
        return audio_proj(tokens.mean(dim=-2))
    x = torch.cat([audio_proj.sem_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    for blk in audio_proj.sem_blocks:
        x = blk(x)
    return audio_proj.norm(x[:, 0])


@pytest.mark.parametrize("folder, file", [(r[0], r[1]) for r in RELEASES if r[2] == "finetuned"])
def test_fine_tuned_heads_tag_as_the_original(tmp_path, lms_12s, folder, file):
    """The AS-FT heads: clip scores = sigmoid(head(BN(time mean of the frames))), per-frame scores the same head
    on each frame; AudioSet's 527 names in the released order (sorted by mid)."""
    from fastm2d import audioset_classes, load_classifier
    path, vit, parts, _ = build_release(tmp_path, folder, file, "finetuned", ())
    input_size, patch = _sizes(folder)
    tagger = load_classifier(path)
    h = parts["head"]
    with torch.no_grad():
        ref = original_frames(vit, lms_12s, input_size, patch)
        bn = lambda x: (x - h["norm.running_mean"]) / torch.sqrt(h["norm.running_var"] + 1e-5)  # noqa: E731
        want = torch.sigmoid(bn(ref.mean(1)) @ h["mlp.mlp.0.weight"].T + h["mlp.mlp.0.bias"])
        got = torch.sigmoid(tagger.head(tagger.norm(tagger._frames(lms_12s).mean(1))))
        assert torch.allclose(got, want, atol=1e-5)
        frames = torch.sigmoid(bn(ref) @ h["mlp.mlp.0.weight"].T + h["mlp.mlp.0.bias"])
        wav = torch.randn(1, 16000 * 2) * 0.1
        sr = tagger.runtime.sample_rate
        probs, times = tagger.frame_scores(wav, sr)
        assert probs.shape[1] == len(times) and probs.shape[-1] == 527
        lms = tagger.runtime.to_lms(wav, sr)
        frames = torch.sigmoid(bn(original_frames(vit, lms, input_size, patch)) @ h["mlp.mlp.0.weight"].T
                               + h["mlp.mlp.0.bias"])
        assert torch.allclose(probs, frames, atol=1e-5)
    names = audioset_classes()
    assert tagger.classes == names and len(names) == 527 == len(set(names))
    import csv
    from fastm2d.transfer.classifier import ASSETS
    rows = list(csv.DictReader(open(ASSETS / "audioset_class_labels_indices.csv", encoding="utf-8")))
    assert [int(r["index"]) for r in rows] == list(range(527))
    assert names == [r["display_name"] for r in sorted(rows, key=lambda r: r["mid"])]  # the notebooks' sort_values
    assert names[:2] == ["Accordion", "Drum kit"] or names[0] != rows[0]["display_name"]  # not the index order


def test_tag_command_prints_scores_with_names_and_frame_times(tmp_path, capsys):
    from fastm2d.cli import main

    from .conftest import write_tone
    folder, file = RELEASES[1][:2]
    path, *_ = build_release(tmp_path, folder, file, "finetuned", ())
    wav = tmp_path / "tone.wav"
    write_tone(wav, seconds=3.0)
    assert main(["tag", str(wav), "--weights", str(path), "--topk", "3", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(row["labels"]) == 3 and row["scores"] == sorted(row["scores"], reverse=True)
    assert main(["tag", str(wav), "--weights", str(path), "--frames", "--out", str(tmp_path / "t.csv")]) == 0
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "file,time_ms,rank,label,score" and lines[1].split(",")[1] == "80.0"
    assert main(["tag", str(wav), "--weights", str(tmp_path / "nope.pth")]) == 2
    # many files, two lengths: batched by length, rows in the order given, each equal to tagging it alone
    others = [write_tone(tmp_path / f"o{i}.wav", seconds=2.0 if i % 2 else 3.0, freq=300 + 80 * i) for i in range(5)]
    capsys.readouterr()
    assert main(["tag", *map(str, others), "--weights", str(path), "--topk", "2", "--batch-size", "2", "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == list(map(str, others))
    from fastm2d import load_classifier, read_audio
    tagger = load_classifier(path)
    for r, f in zip(rows, others):
        alone = tagger.scores(read_audio(f, 16000)[None], 16000)[0]
        assert r["scores"] == pytest.approx(alone.topk(2).values.tolist(), abs=1e-5)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "pretrained"])
def test_round_trips_keep_every_setting_and_the_outputs(tmp_path, lms_12s, fmt):
    """export --format pth / safetensors and save_pretrained: the same model back (config, head, projections,
    class names), the same outputs to 1e-6; an AS-FT file and a CLAP file."""
    from fastm2d import from_pretrained, load_classifier, load_encoder, save_pretrained
    from fastm2d.checkpoint import export_original
    for folder, file, kind, extras in (RELEASES[1], RELEASES[15]):
        path, *_ = build_release(tmp_path / folder, folder, file, kind, extras)
        if fmt == "pretrained":
            out = save_pretrained(path, tmp_path / "hf" / folder)
            assert json.loads((out / "config.json").read_text())["frontend"]["hop_length"] == 160
            back = from_pretrained(out)
        else:
            out = export_original(path, tmp_path / "exp" / fmt / folder, fmt=fmt, date="261201")  # two models: two --out
            back = load_encoder(out)
        a, b = load_encoder(path), back
        with torch.no_grad():
            assert torch.allclose(a.encode_lms(lms_12s), b.encode_lms(lms_12s), atol=1e-6)
        assert b.cfg == a.cfg and b.sample_rate == a.sample_rate
        if kind == "finetuned":
            t1, t2 = load_classifier(path), load_classifier(out)
            wav = torch.randn(1, 16000) * 0.1
            assert torch.allclose(t1.scores(wav, 16000), t2.scores(wav, 16000), atol=1e-6) and t1.classes == t2.classes
        else:
            wav = torch.randn(1, 16000) * 0.1
            with torch.no_grad():
                assert torch.allclose(a.clap_audio(wav, 16000), b.clap_audio(wav, 16000), atol=1e-6)


def test_our_finetune_output_reloads_as_encoder_and_classifier(tmp_path, tiny_run):
    from fastm2d import load_classifier, load_encoder
    from fastm2d.eval.finetune import FinetuneConfig, finetune
    from fastm2d.eval.tasks import load_tasks
    task = load_tasks("synthetic:20")[0]
    finetune(str(tiny_run), task, tmp_path, FinetuneConfig(epochs=1, batch_size=4))
    out = tmp_path / f"finetuned-{task.name}.pth"
    rt = load_encoder(out)
    tagger = load_classifier(out)
    assert tagger.classes == list(task.classes) and tagger.multi_label == task.multi_label
    saved = torch.load(out, weights_only=True)["model"]
    assert torch.equal(tagger.head.weight, saved["head.weight"])
    assert torch.equal(rt.encoder.cls_token, saved["runtime.encoder.cls_token"])
    wav = torch.randn(1, 16000) * 0.1
    p = tagger.scores(wav, 16000)
    assert p.shape == (1, len(task.classes)) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-5)  # softmax


def test_export_keeps_a_small_predictor_and_its_loss(tmp_path, tiny_run):
    """The demo's settings (4 predictor heads) come back from an exported .pth: the same model, the same loss."""
    from fastm2d import load_model
    from fastm2d.checkpoint import export_original
    a = load_model(tiny_run)
    out = export_original(tiny_run, tmp_path / "exp", date="261201")
    b = load_model(out)
    assert b.cfg == a.cfg
    x = torch.randn(2, 1, *a.cfg.input_size)
    ids = a.ids_from_noise(torch.rand(2, a.mask_noise_shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert torch.allclose(a(x, ids)["loss"], b(x, ids)["loss"], atol=1e-6)


def test_hostile_model_folders_are_one_line_errors(tmp_path, capsys):
    from fastm2d.cli import main
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text('{"format": "something else"}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    assert main(["embed", "--weights", str(folder), "--out", str(tmp_path / "o"), str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
