"""Tagging and event detection with a classifier head: the original's AudioSet fine-tuned files (`*_AS-FT*`, 527
classes) and `fastm2d finetune` output, through one `Tagger`.

The head is the original's: clip embedding (the time mean of the frame features) -> BatchNorm1d without affine
(running statistics only) -> Linear; the same head applied to each frame gives per-frame scores (event
detection). A head whose input is the encoder width D (not F' x D) reads "flat" features: the mean over every
patch token, as the original decides from the head's shape.
"""
from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from ..errors import AudioReadError, CheckpointError
from ..checkpoint import read_checkpoint
from .runtime import runtime_from_state
from .batching import length_batches
from .long_audio import encode_file, is_long

ASSETS = Path(__file__).resolve().parent.parent / "assets"  # fastm2d/assets


@functools.lru_cache(maxsize=1)
def audioset_classes() -> List[str]:
    """AudioSet's 527 class names in the order the released heads use: sorted by `mid` (see assets/README.md)."""
    with open(ASSETS / "audioset_class_labels_indices.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["display_name"] for r in sorted(rows, key=lambda r: r["mid"])]


class Tagger(nn.Module):
    """A Runtime plus a classifier head; `scores` per clip, `frame_scores` per feature frame (with times)."""

    def __init__(self, runtime, head_state: dict, classes: Optional[List[str]] = None, multi_label: bool = True):
        super().__init__()
        self.runtime = runtime
        weight = head_state["head.weight"]
        n_classes, d_in = weight.shape
        if d_in not in (runtime.feature_dim, runtime.cfg.embed_dim):
            raise CheckpointError(f"the classifier head reads {d_in}-wide features; this encoder gives "
                                  f"{runtime.feature_dim} (or {runtime.cfg.embed_dim} flat)")
        self.flat = d_in == runtime.cfg.embed_dim != runtime.feature_dim
        self.norm = nn.BatchNorm1d(d_in, affine=False)
        self.head = nn.Linear(d_in, n_classes)
        self.load_state_dict({"norm.running_mean": head_state["norm.running_mean"],
                              "norm.running_var": head_state["norm.running_var"],
                              "norm.num_batches_tracked": torch.tensor(0), "head.weight": weight,
                              "head.bias": head_state["head.bias"]}, strict=False)
        self.classes = list(classes) if classes is not None else \
            (audioset_classes() if n_classes == 527 else [str(i) for i in range(n_classes)])
        if len(self.classes) != n_classes:
            raise CheckpointError(f"{len(self.classes)} class names for a {n_classes}-class head")
        self.multi_label = multi_label
        self.eval()

    def _frames(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel -> the frame features the head reads: (B, T', F'*D), or (B, T', D) when flat."""
        return self.flat_frames(self.runtime.encode_lms(lms))

    def flat_frames(self, feats: torch.Tensor) -> torch.Tensor:
        """Eq. 4 frames (..., F'*D) -> what the head reads: the same, or the mean over the F' frequency patches of
        each time step (..., D) for a head trained on flat features."""
        if self.flat:
            feats = feats.reshape(*feats.shape[:-1], self.runtime.encoder.grid[0], -1).mean(-2)
        return feats

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    def logits_lms(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel (B, 1, F, T) -> clip logits (B, classes): the head over the time mean of the frames."""
        return self.head(self.norm(self._frames(lms).mean(1)))

    def forward(self, waveform: torch.Tensor, sample_rate: Optional[int] = None) -> torch.Tensor:
        """(B, N) waveform -> (B, classes) clip logits (`scores` applies the sigmoid / softmax), so a Tagger is a
        module like any other: called, compiled, exported."""
        return self.logits_lms(self.runtime.to_lms(waveform, sample_rate or self.runtime.sample_rate))

    @torch.no_grad()
    def scores(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """(B, N) waveform -> (B, classes) probabilities of the clip (sigmoid for multi-label heads)."""
        return self._activate(self(waveform, sample_rate))

    @torch.no_grad()
    def frame_scores(self, waveform: torch.Tensor, sample_rate: int):
        """-> (probabilities (B, T', classes), frame centres (T',) in ms): the head applied to every frame."""
        lms = self.runtime.to_lms(waveform, sample_rate)
        return self.probs(self._frames(lms)), self.runtime.frame_times_ms(lms.shape[-1])

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """Features the head reads, (..., width) -> activated class scores (..., classes): per frame, or on a clip's
        time mean."""
        lead = features.shape[:-1]
        return self._activate(self.head(self.norm(features.reshape(-1, features.shape[-1])))).reshape(*lead, -1)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Tagger:
    """A Tagger from a file with a classifier head: the original's AS-FT weights or `fastm2d finetune` output."""

    tagger = tagger_from_checkpoint(*read_checkpoint(path), path)  # read once: encoder and head from one file
    if tagger is None:
        raise CheckpointError(f"{path}: no classifier head (the original's *_AS-FT* files and `fastm2d finetune` "
                              f"output have one); for features use fastm2d.load_encoder")
    return tagger.to(device)


def tagger_from_checkpoint(state, cfg, sr, obj, path, attention: Optional[str] = None) -> Optional[Tagger]:
    """`load_classifier` from what `read_checkpoint` returned; None when the file has no classifier head."""

    head = {k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")}
    if not head:
        return None
    classes = obj.get("classes") if isinstance(obj, dict) else None
    multi_label = obj.get("multi_label", True) if isinstance(obj, dict) else True  # a boolean: read_checkpoint checks
    return Tagger(runtime_from_state(state, cfg, sr, path, attention=attention), head, classes, multi_label)


def tag_files(tagger: Tagger, files, topk: int = 5, frames: bool = False, batch_size: int = 16, workers: int = 2,
              on_skip=None, progress: bool = True) -> List[dict]:
    """`fastm2d tag`: rows {'file', ['time_ms'], 'labels', 'scores'} (top k), one per clip or per frame, in the
    order the files were given; clips of one length are tagged together; an unreadable file goes to
    on_skip(message) and is left out."""
    from tqdm import tqdm

    device = next(tagger.parameters()).device
    sr = tagger.runtime.sample_rate
    results = {}
    bar = tqdm(total=len(files), desc="tag", unit="file", disable=len(files) < 2 or not progress)

    def skipped(i: int, error: str) -> None:
        if on_skip is not None:
            on_skip(error)
        bar.update(1)

    def top(probs) -> dict:
        values, idx = probs.topk(min(topk, len(tagger.classes)))
        return {"labels": [tagger.classes[i] for i in idx.tolist()], "scores": [round(float(v), 5) for v in values]}

    def tag_long(i: int) -> None:
        """A recording longer than a window, read in windows (long_audio.encode_file): the head on each frame as
        it comes, or the clip's frames summed for its mean."""
        rows, total, n = [], 0.0, 0
        for window in encode_file(tagger.runtime, files[i]):
            f = window.layers[0]
            if frames:
                with tagger.runtime.inference():
                    probs = tagger.probs(tagger.flat_frames(f)).float().cpu()
                rows += [{"file": str(files[i]), "time_ms": round(float(t), 1), **top(q)}
                         for t, q in zip(window.times_ms.tolist(), probs)]
            total, n = total + f.sum(0, dtype=torch.float64), n + len(f)
        if not frames:
            with tagger.runtime.inference():  # the head over the time mean of the frames (logits_lms)
                clip = tagger.flat_frames((total / n).float())
                rows = [{"file": str(files[i]), **top(tagger.probs(clip).float().cpu())}]
        results[i] = rows

    long = {i for i, f in enumerate(files) if is_long(tagger.runtime, f)}  # memory bounded by a window
    for i in sorted(long):
        try:
            tag_long(i)
        except AudioReadError as e:
            skipped(i, str(e))
            continue
        bar.update(1)
    for idx, wav in length_batches(files, sr, batch_size, workers, skipped,
                                   order=[i for i in range(len(files)) if i not in long]):
        with tagger.runtime.inference():
            if frames:
                probs, times = tagger.frame_scores(wav.to(device), sr)
                for i, p in zip(idx, probs.float().cpu()):
                    results[i] = [{"file": str(files[i]), "time_ms": round(float(t), 1), **top(q)}
                                  for t, q in zip(times.tolist(), p)]
            else:
                for i, p in zip(idx, tagger.scores(wav.to(device), sr).float().cpu()):
                    results[i] = [{"file": str(files[i]), **top(p)}]
        bar.update(len(idx))
    bar.close()
    return [r for i in sorted(results) for r in results[i]]


def format_tag_rows(rows: List[dict], csv_out: bool) -> str:
    """JSON lines, or CSV (one row per label) for a .csv output."""
    if csv_out:
        import io
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "time_ms", "rank", "label", "score"])
        for r in rows:
            for rank, (label, score) in enumerate(zip(r["labels"], r["scores"]), 1):
                w.writerow([r["file"], r.get("time_ms", ""), rank, label, score])
        return buf.getvalue()
    import json
    return "".join(json.dumps(r) + "\n" for r in rows)
