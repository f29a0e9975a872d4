"""`fastm2d export --format onnx`: the encoder as an ONNX graph for deployment (onnxruntime, TensorRT ...).

  <out>/<name>.onnx        normalised log-mel (batch, 1, 80, frames) -> frame features (batch, frames / patch, F'*D),
                           batch and frames dynamic (frames: a multiple of the patch width, up to the model's input
                           length; longer audio: run the graph on consecutive chunks and join them, as encode does)
  <out>/frontend.json      the pre-processing the graph expects, in numbers: sample rate, FFT / hop / mel
                           settings, log floor, normalisation statistics (fastm2d.LogMelSpectrogram computes it)

Exported with PyTorch's dynamo-based ONNX exporter (`pip install 'fastm2d[onnx]'`: onnx, onnxscript; onnxruntime
to run it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_file, write_atomic
from ..checkpoint.export import refuse_existing
from ..errors import CheckpointError


class EncoderGraph(nn.Module):
    """encode_patches + eq. 4 on one chunk: what the ONNX file computes."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        z = self.encoder.encode_patches(lms)
        b, n, d = z.shape
        f = self.encoder.grid[0]
        return z.reshape(b, f, n // f, d).transpose(1, 2).flatten(2)


class ClassifierGraph(nn.Module):
    """A fine-tuned head over one chunk: normalised log-mel -> clip logits (Tagger.logits_lms)."""

    def __init__(self, tagger):
        super().__init__()
        self.tagger = tagger

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        return self.tagger.logits_lms(lms)


def export_onnx(weights, out_dir, name: str = "m2d_encoder") -> Path:
    from ..checkpoint import read_checkpoint
    from .classifier import tagger_from_checkpoint
    from ..frontend import FRONTEND_PARAMS, LOG_EPS, N_MELS
    from .runtime import runtime_from_state
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise CheckpointError(f"ONNX export needs onnx and onnxscript ({e}): pip install 'fastm2d[onnx]'") from None
    state, model_cfg, sr, obj = read_checkpoint(weights)  # read once: the encoder and, where there is one, the head
    tagger = tagger_from_checkpoint(state, model_cfg, sr, obj, weights, attention="sdpa")
    rt = tagger.runtime if tagger is not None else runtime_from_state(state, model_cfg, sr, weights, attention="sdpa")
    enc, cfg = rt.encoder.eval(), rt.cfg
    graph = EncoderGraph(enc).eval()
    patch_t, n_t = cfg.patch_size[1], enc.grid[1]
    example = torch.zeros(2, 1, cfg.input_size[0], patch_t * min(2, n_t))
    batch = torch.export.Dim("batch", min=1, max=4096)
    patches = torch.export.Dim("patches", min=1, max=n_t)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.onnx"
    refuse_existing(path)
    shapes = {"lms": {0: batch, 3: patch_t * patches}}
    _export(graph, example, path, "frames", shapes)
    head = {}
    if tagger is not None:  # weights with a fine-tuned head: the classifier too, beside the encoder
        _export(ClassifierGraph(tagger).eval(), example, out / "m2d_classifier.onnx", "logits", shapes)
        head = {"classifier": "m2d_classifier.onnx: lms -> clip logits (batch, classes) of one chunk; for longer "
                              "audio average the chunks' frames first (the encoder graph) or the logits",
                "activation": "sigmoid" if tagger.multi_label else "softmax", "classes": tagger.classes}
    write_atomic(out / "frontend.json", json.dumps({
        "input": "lms: (batch, 1, n_mels, frames) float32, frames a multiple of patch_frames up to max_frames",
        "sample_rate": rt.sample_rate, "n_mels": N_MELS, **FRONTEND_PARAMS[rt.sample_rate], "window": "hann (periodic)",
        "center": True, "power": 2.0, "mel_scale": "slaney", "mel_norm": "slaney",
        "log": f"natural log of (mel + {LOG_EPS})", "norm_stats": rt.encoder.norm_stats.tolist(),
        "normalise": "(log_mel - norm_stats[0]) / norm_stats[1]", "patch_frames": patch_t,
        "max_frames": patch_t * n_t, "feature_dim": rt.feature_dim, "frame_ms": rt.frame_seconds * 1000, **head},
        indent=1))
    return path


def _export(graph: torch.nn.Module, example: torch.Tensor, path: Path, output: str, shapes: dict) -> None:
    """The dynamo exporter's program, serialised in memory and written atomically (a kill or a full disk never
    leaves a torn .onnx beside a complete frontend.json)."""
    program = torch.onnx.export(graph, (example,), None, dynamo=True, input_names=["lms"], output_names=[output],
                                dynamic_shapes=shapes, verbose=False)
    with atomic_file(path) as f:
        f.write(program.model_proto.SerializeToString())
