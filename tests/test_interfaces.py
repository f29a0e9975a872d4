"""The HEAR 2021 API and s3prl's upstream interface around the Runtime, checked against the interfaces' own rules
(and the published HEAR validator where it can be fetched)."""
from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import tiny_bert


def test_hear_api_shapes_times_and_batching(tiny_run):
    from fastm2d import load_encoder
    from fastm2d.transfer.interfaces import hear
    model = hear.load_model(str(tiny_run))
    assert model.sample_rate == 16000 and model.scene_embedding_size == model.timestamp_embedding_size == 5 * 64
    torch.manual_seed(0)
    audio = (torch.rand(hear.BATCH + 3, 16000 * 3) * 2 - 1) * 0.5  # more sounds than one batch
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.shape[:2] == ts.shape and emb.shape[0] == len(audio) and emb.shape[2] == model.timestamp_embedding_size
    # frames of 16 hops (160 ms), centred: 80, 240, ... ms, the same for every sound
    assert ts[0].tolist() == pytest.approx([160 * k + 80 for k in range(ts.shape[1])])
    assert (ts == ts[0]).all()
    rt = load_encoder(tiny_run)
    with torch.no_grad():
        alone = rt.encode(audio[-1:], 16000)  # the last sound on its own, in the second batch
    assert torch.allclose(emb[-1:], alone, atol=1e-5)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (len(audio), model.scene_embedding_size) and torch.allclose(scene, emb.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(audio[0], model)


def test_hear_load_model_needs_weights(monkeypatch):
    from fastm2d.transfer.interfaces import hear
    monkeypatch.delenv("FASTM2D_HEAR_WEIGHTS", raising=False)
    with pytest.raises(ValueError, match="downloads nothing"):
        hear.load_model("")


def _hearvalidator():
    """The published validator (PyPI hearvalidator 2021.0.2), fetched without its tensorflow dependency: its
    PyTorch checks never touch tensorflow but `isinstance(model, tf.Module)`, given here by a stand-in class."""
    cache = Path.home() / ".cache" / "fastm2d" / "hearvalidator"
    wheels = sorted(cache.glob("hearvalidator-2021.0.2-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "hearvalidator==2021.0.2",
                            "-d", str(cache)], capture_output=True, text=True, timeout=120)
        wheels = sorted(cache.glob("hearvalidator-2021.0.2-*.whl"))
        if r.returncode or not wheels:
            pytest.skip(f"hearvalidator cannot be fetched from PyPI here: {r.stderr.strip()[-200:]}")
    return wheels[0]


def test_the_published_hear_validator_passes(tiny_run, monkeypatch):
    wheel = _hearvalidator()
    monkeypatch.syspath_prepend(str(wheel))  # a pure-Python wheel imports as a zip
    if "tensorflow" not in sys.modules:
        monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(Module=type("Module", (), {})))
    from hearvalidator.validate import ValidateModel
    ValidateModel("fastm2d.transfer.interfaces.hear", str(tiny_run), device="cpu")()  # raises ModelError on any failure


def test_s3prl_upstream_handles_padding_and_reports_its_rate(tiny_run):
    from fastm2d import load_encoder
    from fastm2d.transfer.interfaces.s3prl import UpstreamExpert, m2d_local
    expert = m2d_local(str(tiny_run))
    assert isinstance(expert, UpstreamExpert) and expert.get_downsample_rates("hidden_states") == 2560
    torch.manual_seed(1)
    wavs = [torch.randn(16000 * 2) * 0.1, torch.randn(16000 * 1) * 0.1, torch.randn(16000 * 2) * 0.1]
    out = expert(wavs)
    hidden, last = out["hidden_states"], out["last_hidden_state"]
    assert len(hidden) == 2 and last is hidden[-1] and last.shape[:2] == (3, 13)
    rt = load_encoder(tiny_run)
    with torch.no_grad():
        short = rt.encode(wavs[1][None], 16000, return_layers=True)
    n = short[0].shape[1]
    assert n == 7 and all(torch.allclose(h[1, :n], s[0], atol=1e-5) for h, s in zip(hidden, short))  # as if alone
    assert all((h[1, n:] == 0).all() for h in hidden)  # nothing past its own frames
    assert abs(last.shape[1] * expert.get_downsample_rates("x") - 32000) <= 2560


def test_hubconf_exposes_the_upstream(tiny_run):
    hub = torch.hub.load(str(Path(__file__).resolve().parent.parent), "m2d_local", ckpt=str(tiny_run), source="local")
    assert hub.get_downsample_rates("last_hidden_state") == 2560


def _tiny_bert(folder, width=16):
    return tiny_bert(folder, ["dog", "barking", "rain", "siren", "a", "car", "engine"], width)


def test_clap_zero_shot_ranks_labels_as_the_computation_written_here(tmp_path, capsys):
    from fastm2d.cli import main
    from fastm2d.transfer.clap import ZeroShot

    from .conftest import write_tone
    from .test_released_models import D, build_release
    tok, bert = _tiny_bert(tmp_path / "bert")
    folder = "m2d_clap_vit_base-80x608p16x16p16kpB-240128"  # 'B': BERT, [CLS] pooling
    path, vit, parts, _ = build_release(tmp_path / "w", folder, "checkpoint-300.pth", "full", ("clap2024",))
    text_proj = torch.nn.Linear(16, D)  # this test's BERT is 16 wide: a file with a text projection
    state = torch.load(path, weights_only=False)
    state["model"].update({f"text_proj.{k}": v for k, v in text_proj.state_dict().items()})
    torch.save(state, path)
    labels = ["dog barking", "rain", "siren", "car engine"]
    zs = ZeroShot(path, text_encoder=str(tmp_path / "bert"))
    assert zs.text_encoder_name == "BERT-base"
    wav = torch.randn(2, 16000 * 3) * 0.1
    sims = zs.similarity(wav, 16000, labels)
    with torch.no_grad():
        batch = tok(labels, padding=True, return_tensors="pt")
        t = torch.nn.functional.normalize(text_proj(bert(**batch).last_hidden_state[:, 0]), dim=-1)
        assert (t[:, None] - t[None]).abs().amax(-1).fill_diagonal_(1).min() > 1e-4  # four different labels
        frames = zs.runtime.encode(wav, 16000)  # eq. 4 frames (B, T', F'*D): their D-wide tokens' mean
        a = torch.nn.functional.normalize(parts["audio_proj"](frames.reshape(2, -1, D).mean(1)), dim=-1)
    assert torch.allclose(zs.audio(wav, 16000).norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(sims, a @ t.T, atol=1e-5)
    assert (sims.argsort(dim=1) == (a @ t.T).argsort(dim=1)).all()
    clip = tmp_path / "a.wav"
    write_tone(clip, seconds=2.0)
    assert main(["zeroshot", str(clip), "--weights", str(path), "--labels", ",".join(labels), "--text-encoder",
                 str(tmp_path / "bert"), "--device", "cpu", "--topk", "2"]) == 0
    import json
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(row["labels"]) == 2 and row["similarity"] == sorted(row["similarity"], reverse=True)
    assert main(["zeroshot", str(clip), "--weights", str(path), "--labels", "dog", "--text-encoder",
                 str(tmp_path / "bert")]) == 2
    # no local text encoder: one line naming it, never a download
    assert main(["zeroshot", str(clip), "--weights", str(path), "--labels", "a,b"]) == 2
    assert "not found locally" in capsys.readouterr().err

    # several files: clips of one length embedded together, rows in the order given, each as that file alone
    from fastm2d import read_audio
    from fastm2d.transfer.clap import zeroshot_files
    files = [write_tone(tmp_path / f"z{i}.wav", seconds=s, freq=300 + 200 * i) for i, s in enumerate((2, 1, 2, 2))]
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    calls, audio = [], zs.audio
    zs.audio = lambda w, sr: calls.append(len(w)) or audio(w, sr)
    skipped = []
    rows = list(zeroshot_files(zs, [files[0], tmp_path / "bad.wav", *files[1:]], labels, topk=4,
                               on_skip=skipped.append, workers=0))
    assert [r["file"] for r in rows] == [str(f) for f in files] and len(skipped) == 1 and sorted(calls) == [1, 3]
    for r, f in zip(rows, files):
        alone = zs.similarity(read_audio(f, 16000)[None], 16000, labels)[0]
        assert r["labels"] == [labels[i] for i in alone.argsort(descending=True).tolist()]
        assert np.allclose(r["similarity"], alone.sort(descending=True).values.numpy(), atol=1e-5)


CLAP_RELEASES = [("m2d_clap_vit_base-80x608p16x16-240128", "checkpoint-300.pth", "full", ("clap2024",)),
                 ("m2d_clap_vit_base-80x1001p16x16-240128_AS-FT_enconly", "weights_ep67it3124-0.48558.pth",
                  "finetuned", ("clap2024",)),
                 ("m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025", "checkpoint-30.pth", "enconly", ("clap2025",))]


@pytest.mark.parametrize("folder, file, kind, extras", CLAP_RELEASES, ids=[r[0] for r in CLAP_RELEASES])
def test_zero_shot_on_each_released_clap_layout(tmp_path, folder, file, kind, extras):
    """The three released M2D-CLAP files, in their exact key layout and shapes (D-wide audio projections, no text
    projection): ZeroShot and `fastm2d zeroshot` score them as the original computes (flat tokens -> audio_proj;
    the caption encoder's pooled output as it is), the text side an identity because it is as wide."""
    from fastm2d.transfer.clap import ZeroShot
    from fastm2d.frontend import LogMelSpectrogram

    from .test_released_models import D, _sizes, build_release, original_clap_audio, original_frames
    tok, bert = _tiny_bert(tmp_path / "text", width=D)  # as wide as the audio side, as GTE-base / BERT-base are
    text_state = None
    if "clap2025" in extras:  # 'TI': the file carries its own fine-tuned text encoder, unlike the stock one given
        with torch.no_grad():
            bert = type(bert)(bert.config).eval()  # other weights: the file's must be used, not the folder's
            for p in bert.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        text_state = bert.state_dict()
    path, vit, parts, norm_stats = build_release(tmp_path / "w", folder, file, kind, extras, text_state=text_state)
    labels = ["dog barking", "rain", "siren"]
    zs = ZeroShot(path, text_encoder=str(tmp_path / "text"))
    wav = torch.randn(2, 16000 * 3) * 0.1
    sims = zs.similarity(wav, 16000, labels)
    input_size, patch = _sizes(folder)
    with torch.no_grad():
        lms = (LogMelSpectrogram(16000)(wav).unsqueeze(1) - norm_stats[0]) / norm_stats[1]  # the log-mel, normalised
        a = original_clap_audio(parts["audio_proj"], original_frames(vit, lms, input_size, patch, flat=True),
                                "clap2025" in extras)
        batch = tok(labels, padding=True, return_tensors="pt")
        hidden = bert(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        t = hidden[:, 0] if "pB" in folder else (hidden * mask).sum(1) / mask.sum(1)  # BERT: [CLS]; GTE: the mean
    want = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    assert sims.shape == (2, 3) and torch.allclose(sims, want, atol=1e-4), (sims, want)
    import soundfile as sf

    from fastm2d.cli import main
    sf.write(str(tmp_path / "a.wav"), wav[0].numpy(), 16000)
    assert main(["zeroshot", str(tmp_path / "a.wav"), "--weights", str(path), "--labels", ",".join(labels),
                 "--text-encoder", str(tmp_path / "text"), "--device", "cpu"]) == 0


def test_zero_shot_refuses_a_text_encoder_of_another_width(tmp_path):
    from fastm2d.checkpoint import CheckpointError
    from fastm2d.transfer.clap import ZeroShot

    from .test_released_models import build_release
    _tiny_bert(tmp_path / "text", width=16)
    path, *_ = build_release(tmp_path / "w", *CLAP_RELEASES[0])
    with pytest.raises(CheckpointError, match="width 16 differs from the audio embedding's 64"):
        ZeroShot(path, text_encoder=str(tmp_path / "text"))


def test_onnx_export_runs_in_onnxruntime_like_pytorch(tiny_run, tmp_path):
    """Dynamic batch and length (any multiple of the patch width up to the position table), the same frames as
    PyTorch's Runtime to 1e-4 (measured max error ~1e-6); frontend.json states the pre-processing."""
    ort = pytest.importorskip("onnxruntime", reason="running the export needs onnxruntime (the onnx extra)")
    pytest.importorskip("onnxscript", reason="exporting needs onnx and onnxscript (the onnx extra)")
    import json

    from fastm2d import load_encoder
    from fastm2d.cli import main
    assert main(["export", "--weights", str(tiny_run), "--out", str(tmp_path), "--format", "onnx"]) == 0
    session = ort.InferenceSession(str(tmp_path / "m2d_encoder.onnx"))
    front = json.loads((tmp_path / "frontend.json").read_text())
    assert front["max_frames"] == 64 and front["hop_length"] == 160 and len(front["norm_stats"]) == 2
    rt = load_encoder(tiny_run)
    worst = 0.0
    for batch, frames in ((1, 16), (3, 48), (2, 64)):
        x = torch.randn(batch, 1, 80, frames)
        got = session.run(None, {"lms": x.numpy()})[0]
        with torch.no_grad():
            want = rt.encode_lms(x).numpy()
        assert got.shape == want.shape
        worst = max(worst, float(abs(got - want).max()))
    assert worst < 1e-4, worst


def _s3prl_source():
    """s3prl 0.4.18's source (PyPI sdist), for its Featurizer: it needs only torch and numpy."""
    import tarfile
    cache = Path.home() / ".cache" / "fastm2d" / "s3prl"
    src = cache / "s3prl-0.4.18"
    if not (src / "s3prl" / "upstream" / "interfaces.py").is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "s3prl==0.4.18", "-d", str(cache)], capture_output=True, text=True, timeout=180)
        archives = sorted(cache.glob("s3prl-0.4.18.tar.gz"))
        if r.returncode or not archives:
            pytest.skip(f"s3prl cannot be fetched from PyPI here: {r.stderr.strip()[-200:]}")
        with tarfile.open(archives[0]) as t:
            t.extractall(cache, filter="data")
    return src


def test_s3prl_featurizer_reads_the_upstream(tiny_run, monkeypatch):
    """s3prl's own Featurizer (what every SUPERB downstream calls) on the expert: it accepts the outputs, its
    weighted layer sum runs, and each waveform gets round(samples / downsample rate) frames."""
    monkeypatch.syspath_prepend(str(_s3prl_source()))
    from s3prl.upstream.interfaces import Featurizer

    from fastm2d.transfer.interfaces.s3prl import UpstreamExpert
    expert = UpstreamExpert(str(tiny_run))
    featurizer = Featurizer(expert, "hidden_states", upstream_device="cpu")
    wavs = [torch.randn(16000 * 3) * 0.1, torch.randn(16000 * 2) * 0.1]
    with torch.no_grad():
        feats = featurizer(wavs, expert(wavs))
    assert [f.shape[0] for f in feats] == [round(len(w) / 2560) for w in wavs]
    assert feats[0].shape[1] == featurizer.output_dim == 5 * 64


def test_a_tagger_is_a_module_and_exports_its_classifier_to_onnx(tmp_path):
    """load_classifier(W)(wav) gives the clip logits (scores = their sigmoid), it compiles like any module, and
    `export --format onnx` writes the classifier beside the encoder when the weights have a head."""
    ort = pytest.importorskip("onnxruntime", reason="running the export needs onnxruntime (the onnx extra)")
    pytest.importorskip("onnxscript", reason="exporting needs onnx and onnxscript (the onnx extra)")
    import json

    from fastm2d import load_classifier
    from fastm2d.cli import main

    from .test_released_models import RELEASES, build_release
    folder, file, kind, extras = RELEASES[1]  # m2d_as ... AS-FT: a 527-class head
    path, *_ = build_release(tmp_path / "w", folder, file, kind, extras)
    tagger = load_classifier(path)
    wav = torch.randn(2, 16000 * 2) * 0.1
    with torch.no_grad():
        logits = tagger(wav)
        assert logits.shape == (2, 527) and torch.allclose(torch.sigmoid(logits), tagger.scores(wav, 16000))
        torch._dynamo.reset()
        compiled = torch.compile(tagger.logits_lms, backend="eager")
        lms = tagger.runtime.to_lms(wav, 16000)
        assert torch.allclose(compiled(lms), logits, atol=1e-5)
    assert main(["export", "--weights", str(path), "--out", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    front = json.loads((tmp_path / "onnx" / "frontend.json").read_text())
    assert front["activation"] == "sigmoid" and len(front["classes"]) == 527
    session = ort.InferenceSession(str(tmp_path / "onnx" / "m2d_classifier.onnx"))
    lms = lms[..., :192]  # the graph's contract: a whole number of patch widths (frontend.json)
    got = session.run(None, {"lms": lms.numpy()})[0]
    with torch.no_grad():
        want = tagger.logits_lms(lms).numpy()
    assert got.shape == (2, 527) and abs(got - want).max() < 1e-4


def _xares_checker():
    """X-ARES's own checker (PyPI xares 0.1.3, audio_encoder_checker.py; it needs torch and loguru only), fetched
    with pip without the suite's other dependencies."""
    import zipfile
    cache = Path.home() / ".cache" / "fastm2d" / "xares"
    site = cache / "site"  # unpacked: xares has no __init__.py, and a namespace package does not import from a zip
    if not (site / "xares" / "audio_encoder_checker.py").is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "xares==0.1.3", "loguru",
                            "-d", str(cache)], capture_output=True, text=True, timeout=120)
        if r.returncode:
            pytest.skip(f"xares cannot be fetched from PyPI here: {r.stderr.strip()[-200:]}")
        for wheel in cache.glob("*.whl"):
            zipfile.ZipFile(wheel).extractall(site)
    return [str(site)]


@pytest.mark.parametrize("folder, file, kind, hop_ms", [
    ("m2d_vit_base-80x608p16x16-221006-mr7_enconly", "checkpoint-300.pth", "enconly", 160),
    ("m2d_vit_base-80x200p16x4-230529", "checkpoint-300.pth", "full", 40),
    ("m2d_s_vit_base-80x608p80x2-230220", "checkpoint-300.pth", "full", 20)])
def test_the_xares_checker_passes_and_the_hop_matches_the_frames(tmp_path, monkeypatch, folder, file, kind, hop_ms):
    """X-ARES's check_audio_encoder accepts the encoder; hop_size_in_ms is the patch width in time (16x16: 160 ms,
    16x4: 40 ms, 80x2: 20 ms), and the frames produced step by it: a clip of n log-mel frames (10 ms each) gives
    ceil(n / patch width) frames, also past the model's input length (chunked)."""
    for wheel in _xares_checker():
        monkeypatch.syspath_prepend(wheel)
    from xares.audio_encoder_checker import check_audio_encoder

    from fastm2d.transfer.interfaces.xares import M2DEncoder

    from .test_released_models import build_release
    path, *_ = build_release(tmp_path, folder, file, kind, ())
    encoder = M2DEncoder(path)
    assert type(encoder).__name__.endswith("Encoder") and check_audio_encoder(encoder)
    assert encoder.hop_size_in_ms == pytest.approx(hop_ms) and encoder.sampling_rate == 16000
    patch_t = {160: 16, 40: 4, 20: 2}[hop_ms]
    for seconds in (3.1, 13.7):  # within one chunk, and several chunks
        n = int(16000 * seconds) // 160 + 1
        frames = encoder(torch.randn(2, int(16000 * seconds)) * 0.1)
        assert frames.shape[0] == 2 and frames.shape[2] == encoder.output_dim
        input_t = int(folder.split("-")[1].split("p")[0].split("x")[1])
        chunks, tail = divmod(n, input_t)
        assert frames.shape[1] == chunks * (input_t // patch_t) + math.ceil(tail / patch_t)
        assert abs(frames.shape[1] * encoder.hop_size_in_ms - seconds * 1000) <= encoder.hop_size_in_ms + 10


def test_a_text_encoder_in_the_file_is_never_dropped_silently(tmp_path, caplog):
    """The 2025 'TI' release, in the original's layout: zero-shot uses its text encoder (above); audio features do not
    and say so, naming the keys; tensors beside backbone.* and text_encoder.* are dropped with a warning naming them."""
    from fastm2d import load_encoder

    from .test_released_models import build_release
    path, *_ = build_release(tmp_path / "w", *CLAP_RELEASES[2])
    with caplog.at_level("WARNING", logger="fastm2d"):
        load_encoder(path)
    assert "text_encoder.text_encoder.embeddings.word_embeddings.weight" in caplog.text and "zero-shot" in caplog.text
    obj = torch.load(path, weights_only=True)
    obj["model"]["optimizer_state.step"] = torch.zeros(1)
    torch.save(obj, path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastm2d"):
        load_encoder(path)
    assert "optimizer_state.step" in caplog.text and "not used" in caplog.text


def _xares_task(root, n=12):  # kNN takes 10 neighbours
    """A two-class task in X-ARES's own layout, written by X-ARES's own writer (write_audio_tar): tones against noise,
    train / valid / test tars, and the task file its runner imports."""
    import numpy as np
    import soundfile as sf
    from xares.audiowebdataset import write_audio_tar
    task = root / "env" / "tinytask"
    task.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        paths, labels = [], []
        for i in range(n):
            t = np.arange(16000) / 16000
            wav = 0.3 * np.sin(2 * np.pi * (300 + 40 * i) * t) if i % 2 else 0.2 * rng.standard_normal(16000)
            path = root / "audio" / split / f"{split}_{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, wav.astype(np.float32), 16000)
            paths.append(str(path))
            labels.append(str(i % 2))
        write_audio_tar(paths, labels, str(task / f"{split}-*.tar"), num_shards=1)
    (task / ".audio_tar_ready").touch()
    (root / "tiny_task.py").write_text(
        "from xares.task import TaskConfig\n\n\n"
        "def tiny_config(encoder) -> TaskConfig:\n"
        f"    return TaskConfig(name='tinytask', env_root={str(root / 'env')!r}, encoder=encoder, output_dim=2,\n"
        "                      label_processor=lambda x: int(x['label']), epochs=2, batch_size_encode=4,\n"
        "                      batch_size_train=4, num_encoder_workers=0, torch_num_threads=1)\n")
    return task


@pytest.mark.slow
def test_xares_runs_the_exported_encoder_file_and_keeps_two_models_apart(tiny_run, tmp_path):
    """`fastm2d export --format xares` writes the file X-ARES's runner builds with no arguments; run through X-ARES's
    own pipeline (encode to shards, MLP, kNN) on a task written by X-ARES's own writer. The untrained baseline of
    the same weights gets its own class name, so its own embeddings and scores, never the model's."""
    pytest.importorskip("xares.run", reason="X-ARES's runner: pip install xares (in the test extra)")
    from fastm2d.cli import main
    task = _xares_task(tmp_path)
    files = []
    for extra in ([], ["--untrained-seed", "0"]):
        assert main(["export", "--format", "xares", "--weights", str(tiny_run), "--out", str(tmp_path), *extra]) == 0
    files = sorted(tmp_path.glob("*encoder.py"))
    assert len(files) == 2
    for f in files:
        r = subprocess.run([sys.executable, "-m", "fastm2d.transfer.interfaces.xares", f.name, "tiny_task.py",
                            "--max-jobs", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "Results:" in r.stdout, (r.stdout[-3000:], r.stderr[-3000:])
    classes = sorted(p.name for p in (task / "embeddings").iterdir() if p.name != "Unknown")  # its download stage's
    assert len(classes) == 2 and all(c.endswith("Encoder") for c in classes) and "untrained0" in classes[1]
    for c in classes:
        assert list((task / "embeddings" / c).glob("wds-encoded-test*.tar"))
        assert (task / "checkpoints" / c / "mlp_score.txt").is_file()
    # an encoder file is never replaced, and refuses weights that changed since it was written
    assert main(["export", "--format", "xares", "--weights", str(tiny_run), "--out", str(files[0])]) != 0


def test_an_xares_encoder_file_refuses_weights_changed_since_it_was_written(tiny_run, tmp_path):
    import importlib.util
    import shutil

    from fastm2d.checkpoint import resolve_checkpoint_file
    from fastm2d.errors import CheckpointError
    from fastm2d.transfer.interfaces.xares import write_encoder_file
    weights = tmp_path / "w" / "checkpoint-2.pth"
    weights.parent.mkdir()
    shutil.copy(resolve_checkpoint_file(tiny_run), weights)
    path = write_encoder_file(weights, tmp_path / "my_encoder.py")
    spec = importlib.util.spec_from_file_location("my_encoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (cls,) = [getattr(module, n) for n in dir(module) if n.endswith("Encoder")]  # X-ARES's rule: exactly one
    frames = cls()(torch.randn(1, 16000))
    assert frames.shape[-1] == cls().output_dim
    torch.save(torch.load(weights, weights_only=True) | {"epoch": 3}, weights)  # other bytes at the same path
    with pytest.raises(CheckpointError, match="not the weights this encoder file was written for"):
        cls()
    with pytest.raises(FileExistsError):
        write_encoder_file(weights, path)
