"""`fastm2d export --format onnx`: the model as ONNX graphs for deployment (onnxruntime, TensorRT ...).

  <out>/m2d_waveform.onnx  waveform (batch, samples) at the model's rate -> frame features (batch, frames, F'*D),
                           and for weights with a head the clip scores (batch, classes): front end, normalisation and
                           chunking inside (WaveformGraph), batch and length dynamic; what most deployments want
  <out>/<name>.onnx        normalised log-mel (batch, 1, 80, frames) -> frame features (batch, frames / patch, F'*D),
                           batch and frames dynamic (frames: a multiple of the patch width, up to the model's input
                           length; longer audio: run the graph on consecutive chunks and join them, as encode does)
  <out>/frontend.json      the pre-processing the graph expects, in numbers: sample rate, FFT / hop / mel
                           settings, log floor, normalisation statistics (fastm2d.LogMelSpectrogram computes it)

The log-mel graphs are exported with PyTorch's dynamo-based ONNX exporter, the waveform graph with its
TorchScript-based one (see export_onnx) (`pip install 'fastm2d[onnx]'`: onnx, onnxscript; onnxruntime to run them).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_file, write_atomic
from ..checkpoint.export import refuse_existing
from ..errors import CheckpointError
from ..frontend import FRONTEND_PARAMS, LOG_EPS, N_MELS, LogMelByMatrices
from ..checkpoint import read_checkpoint
from .classifier import tagger_from_checkpoint
from .runtime import runtime_from_state


WAVEFORM_GRAPH = "m2d_waveform.onnx"


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


class WaveformGraph(nn.Module):
    """waveform (B, N) at the model's rate -> frame features (B, T', F'*D), and for weights with a head the clip
    scores (B, classes): the front end (LogMelByMatrices, from the LogMelSpectrogram training uses), the
    normalisation and the chunking all inside, so no deployment re-implements them.

    Chunking, as `Runtime.encode_lms` does it: chunks of the training length, the last padded to whole patches.
    Here every chunk of every clip is one batch row of the training length; the last chunk's padding columns are
    masked out of attention (`valid_columns`), so its tokens equal encoding it alone at its own length. Frames
    past the last chunk's audio are dropped, so T' is exactly `Runtime.encode`'s."""

    def __init__(self, runtime, tagger=None):
        super().__init__()
        self.logmel = LogMelByMatrices(runtime.frontend)
        self.encoder, self.tagger = runtime.encoder, tagger
        self.register_buffer("stats", runtime.encoder.norm_stats.detach().clone())
        self.unit, self.patch_t = runtime.cfg.input_size[1], runtime.cfg.patch_size[1]
        self.n_f, self.n_t = runtime.encoder.grid

    def forward(self, waveform: torch.Tensor):
        lms = (self.logmel(waveform) - self.stats[0]) / self.stats[1]  # (B, 80, T)
        b, f, t = lms.shape
        chunks = (t + self.unit - 1) // self.unit
        rest = t - (chunks - 1) * self.unit  # the last chunk's frames
        last = (rest + self.patch_t - 1) // self.patch_t  # its patch columns
        if self.unit > self.n_t * self.patch_t:  # a grid that leaves a chunk's last frames unseen (80x1001 at 16x16)
            last = last.clamp(max=self.n_t) if isinstance(last, torch.Tensor) else min(last, self.n_t)  # traced: a tensor
        x = nn.functional.pad(lms, (0, chunks * self.unit - t)).reshape(b, f, chunks, self.unit)
        x = x[..., :self.n_t * self.patch_t].permute(0, 2, 1, 3).reshape(b * chunks, 1, f, self.n_t * self.patch_t)
        starts = torch.arange(chunks, device=lms.device) * self.unit
        valid = ((t - starts + self.patch_t - 1) // self.patch_t).clamp(max=self.n_t).repeat(b)
        z = self.encoder.encode_patches(x, valid_columns=valid)  # (B * chunks, F' * T', D), frequency-major
        d = z.shape[-1]
        frames = z.reshape(b * chunks, self.n_f, self.n_t, d).transpose(1, 2).reshape(b, chunks * self.n_t,
                                                                                       self.n_f * d)
        frames = frames[:, :(chunks - 1) * self.n_t + last]  # (eq. 4)
        if self.tagger is None:
            return frames
        norm = self.tagger.norm  # in eval mode, written out: the TorchScript exporter needs BatchNorm's width static
        pooled = (self.tagger.flat_frames(frames).mean(1) - norm.running_mean) * torch.rsqrt(norm.running_var + norm.eps)
        return frames, self.tagger._activate(self.tagger.head(pooled))  # Tagger.scores


class ClassifierGraph(nn.Module):
    """A fine-tuned head over one chunk: normalised log-mel -> clip logits (Tagger.logits_lms)."""

    def __init__(self, tagger):
        super().__init__()
        self.tagger = tagger

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        return self.tagger.logits_lms(lms)


def export_onnx(weights, out_dir, name: str = "m2d_encoder") -> Path:
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
    refuse_existing(out / WAVEFORM_GRAPH)
    shapes = {"lms": {0: batch, 3: patch_t * patches}}
    _export(graph, example, path, "frames", shapes)
    head = {}
    if tagger is not None:  # weights with a fine-tuned head: the classifier too, beside the encoder
        _export(ClassifierGraph(tagger).eval(), example, out / "m2d_classifier.onnx", "logits", shapes)
        head = {"classifier": "m2d_classifier.onnx: lms -> clip logits (batch, classes) of one chunk; for longer "
                              "audio average the chunks' frames first (the encoder graph) or the logits",
                "activation": "sigmoid" if tagger.multi_label else "softmax", "classes": tagger.classes}
    # The waveform-in graph: the TorchScript-based exporter keeps its shape arithmetic (chunk count, the last
    # chunk's columns) symbolic; the dynamo exporter's guards fixed the length to the example's (checked).
    wave_graph = WaveformGraph(rt, tagger).eval()
    outputs = ["frames"] + (["scores"] if tagger is not None else [])
    with torch.no_grad(), atomic_file(out / WAVEFORM_GRAPH) as f:
        torch.onnx.export(wave_graph, (torch.zeros(2, 3 * cfg.input_size[1] * rt.frontend.hop_length + 777),), f,
                          dynamo=False, opset_version=18, input_names=["waveform"], output_names=outputs,
                          dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "frames": {0: "batch", 1: "frames"},
                                        **({"scores": {0: "batch"}} if tagger is not None else {})})
    write_atomic(out / "frontend.json", json.dumps({
        "input": "lms: (batch, 1, n_mels, frames) float32, frames a multiple of patch_frames up to max_frames",
        "sample_rate": rt.sample_rate, "n_mels": N_MELS, **FRONTEND_PARAMS[rt.sample_rate], "window": "hann (periodic)",
        "center": True, "power": 2.0, "mel_scale": "slaney", "mel_norm": "slaney",
        "log": f"natural log of (mel + {LOG_EPS})", "norm_stats": rt.encoder.norm_stats.tolist(),
        "normalise": "(log_mel - norm_stats[0]) / norm_stats[1]", "patch_frames": patch_t,
        "max_frames": patch_t * n_t, "feature_dim": rt.feature_dim, "frame_ms": rt.frame_seconds * 1000,
        "waveform_graph": f"{WAVEFORM_GRAPH}: waveform (batch, samples) float32 at sample_rate, mono, at least "
                          f"{rt.frontend.mel.spectrogram.n_fft // 2 + 1} samples -> frames (batch, frames, "
                          f"feature_dim)" + (" and scores (batch, classes), activated" if tagger is not None else "")
                          + "; the front end, normalisation and chunking inside", **head},
        indent=1))
    return path


def _export(graph: torch.nn.Module, example: torch.Tensor, path: Path, output: str, shapes: dict) -> None:
    """The dynamo exporter's program, serialised in memory and written atomically (a kill or a full disk never
    leaves a torn .onnx beside a complete frontend.json)."""
    program = torch.onnx.export(graph, (example,), None, dynamo=True, input_names=["lms"], output_names=[output],
                                dynamic_shapes=shapes, verbose=False)
    with atomic_file(path) as f:
        f.write(program.model_proto.SerializeToString())
