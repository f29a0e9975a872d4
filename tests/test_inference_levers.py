"""CPU inference levers (benchmarks/cpu_inference.py measures their speed): dynamic int8 of the encoder's linear
layers, opt-in through the API (`Runtime.use_int8`) and the commands (`--precision int8`), held to a feature and a
probe-accuracy tolerance against fp32; its outputs never mixed with fp32 ones."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastm2d import load_encoder
from fastm2d.cli import main

from .conftest import write_tone


def test_int8_features_stay_within_tolerance_of_fp32(tiny_run):
    """Every linear layer of the encoder becomes a dynamic int8 one; each clip's frame features keep a cosine of at
    least 0.995 to fp32's (ViT-B measured 0.9997, benchmarks/results/*_cpu_inference.md)."""
    fp32 = load_encoder(tiny_run).set_precision("fp32")
    int8 = load_encoder(tiny_run).set_precision("int8")
    assert int8.int8 and int8.precision == "fp32"
    assert not any(type(m) is torch.nn.Linear for m in int8.encoder.modules())
    if "fbgemm" in torch.backends.quantized.supported_engines:  # x86: fbgemm itself, ~10 % faster than "x86"
        assert torch.backends.quantized.engine == "fbgemm"
    wav = torch.randn(3, 16000 * 3) * 0.1
    with torch.no_grad():
        a, b = fp32.encode(wav, 16000), int8.encode(wav, 16000)
    assert a.shape == b.shape and not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min() >= 0.995
    with pytest.raises(ValueError, match="expected auto, fp32, bf16 or int8"):
        fp32.set_precision("int4")


def test_int8_probe_accuracy_stays_within_tolerance(tiny_run, tmp_path):
    """`linear-eval --precision int8` on the synthetic tasks: each task's accuracy within 5 points of fp32's, its
    rows and embedding cache kept apart from fp32's."""
    out = tmp_path / "eval"
    for precision in ("fp32", "int8"):
        assert main(["linear-eval", "synthetic:240", "--weights", str(tiny_run), "--out", str(out), "--seeds", "2",
                     "--precision", precision, "--quiet"]) == 0
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    for task in ("synthetic-event", "synthetic-pitch"):
        assert abs(results[task]["mean"] - results[task + "-int8"]["mean"]) <= 0.05, task
    cached = sorted(p.name for p in (out / "cache").glob("*.npy"))  # the two tasks share their clips: one file each
    assert len(cached) == 2 and sum("-int8-" in name for name in cached) == 1
    assert (out / "results.md").read_text().count("(int8)") == 2


def test_embed_int8_arrays_are_not_reused_as_fp32(tiny_run, tmp_path, capsys):
    """`embed --precision int8` writes int8 features and says so in the manifest; a later fp32 run replaces them
    instead of keeping them as its own."""
    clip = write_tone(tmp_path / "a.wav", seconds=2.0)
    out = tmp_path / "feats"
    assert main(["embed", "--weights", str(tiny_run), "--out", str(out), "--precision", "int8", "--quiet",
                 str(clip)]) == 0
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])
    assert row["made_with"]["int8"] is True
    int8 = np.load(out / "a.npy")
    assert main(["embed", "--weights", str(tiny_run), "--out", str(out), "--precision", "fp32", "--quiet",
                 str(clip)]) == 0
    assert "replacing 1 array" in capsys.readouterr().err
    fp32 = np.load(out / "a.npy")
    assert not np.array_equal(fp32, int8) and "int8" not in json.loads(
        (out / "manifest.jsonl").read_text().splitlines()[-1])["made_with"]
