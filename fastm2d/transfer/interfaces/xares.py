"""The X-ARES encoder contract (github.com/jimbozhang/xares, PyPI `xares`), the 2025 benchmark many audio encoders
report on:

    from fastm2d.transfer.interfaces.xares import M2DEncoder
    encoder = M2DEncoder("m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth")
    frames = encoder(audio)            # audio (B, T) at encoder.sampling_rate -> (B, T', encoder.output_dim)

An nn.Module whose class name ends in `Encoder`, with `sampling_rate`, `output_dim` (eq. 4's F'*D) and
`hop_size_in_ms`: one feature frame per patch width, 10 ms log-mel hops x the patch's time width: 16x16 -> 160 ms,
16x4 -> 40 ms, 80x2 -> 20 ms. Any length: audio longer than the model's input (X-ARES tasks run to 10 minutes) is
encoded chunk by chunk at the model's own length, as `Runtime.encode` does. Any weights `load_encoder` reads;
`untrained_seed`: the same architecture freshly initialised, a baseline row beside the model.

X-ARES's runner (`python -m xares.run ENCODER.py TASKS.py`) builds the class with no arguments and keeps
embeddings, probes and scores under the class's name, so `fastm2d export --format xares` writes the file it
expects (`write_encoder_file`): one class ending in `Encoder`, named for the weights' SHA-256, built with none.
`python -m fastm2d.transfer.interfaces.xares ENCODER.py TASKS.py --max-jobs 0` runs X-ARES's own runner with
soundfile decoding where torchaudio cannot decode (torchaudio 2.11's `load` needs TorchCodec and FFmpeg).
"""
from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import CheckpointError
from ...checkpoint import resolve_checkpoint_file
from ..runtime import load_encoder
from ...atomic import write_atomic


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class M2DEncoder(nn.Module):
    def __init__(self, weights, device: str = "cpu", untrained_seed: Optional[int] = None,
                 expected_sha256: Optional[str] = None):
        super().__init__()
        if expected_sha256 is not None:  # an exported encoder file: X-ARES's caches are keyed by these weights
            path = resolve_checkpoint_file(weights)
            found = file_sha256(path) if path.is_file() else "missing"
            if found != expected_sha256:
                raise CheckpointError(f"{path}: not the weights this encoder file was written for (SHA-256 "
                                      f"{found[:12]}, expected {expected_sha256[:12]}); X-ARES would file its "
                                      f"results under the wrong model: export the encoder file again")
        self.runtime = load_encoder(weights, untrained_seed=untrained_seed).to(device).eval()
        self.sampling_rate = self.runtime.sample_rate
        self.output_dim = self.runtime.feature_dim
        self.hop_size_in_ms = self.runtime.frame_seconds * 1000

    @torch.no_grad()
    def forward(self, audio: Tensor) -> Tensor:
        if audio.dim() == 1:
            audio = audio[None]
        if audio.dim() != 2:
            raise ValueError(f"X-ARES audio is (batch, samples), got shape {tuple(audio.shape)}")
        return self.runtime.encode(audio, self.sampling_rate)  # rt.inference()'s arithmetic, fp32 out


def encoder_class_name(weights, untrained_seed: Optional[int] = None, name: Optional[str] = None) -> str:
    """A class name unique to the weights (their file's SHA-256) and the baseline seed, ending in `Encoder`."""
    digest = file_sha256(resolve_checkpoint_file(weights))[:10]
    label = re.sub(r"\W+", "_", name or resolve_checkpoint_file(weights).parent.name or "m2d").strip("_")[:40]
    label = label if label and label[0].isalpha() else f"M2D_{label}"
    seed = f"_untrained{untrained_seed}" if untrained_seed is not None else ""
    return f"{label}_{digest}{seed}Encoder"


def write_encoder_file(weights, out, name: Optional[str] = None, untrained_seed: Optional[int] = None) -> Path:
    """The X-ARES encoder file for these weights: `out` (a .py path, or a folder for <class name>.py); a file already
    there is refused (another model's results must not be filed under it)."""
    weights_file = resolve_checkpoint_file(weights).resolve()
    load_encoder(weights_file)  # readable, and a model: refused here rather than inside X-ARES's workers
    cls = encoder_class_name(weights_file, untrained_seed, name)
    out = Path(out)
    path = out if out.suffix == ".py" else out / f"{cls.lower()}.py"
    if not re.fullmatch(r"[A-Za-z_]\w*", path.stem):
        raise ValueError(f"{path}: X-ARES imports the file by its name: use letters, digits and _ only")
    if path.exists():
        raise FileExistsError(f"{path} exists: an encoder file is never replaced (X-ARES keys its caches by the "
                              f"class inside); choose another --out")
    text = f'''"""X-ARES encoder for {weights_file}
(SHA-256 {file_sha256(weights_file)}{f", untrained: init seed {untrained_seed}" if untrained_seed is not None else ""}),
written by `fastm2d export --format xares` on {time.strftime("%Y-%m-%d")}.

    python -m xares.run {path.name} TASKS.py --max-jobs 0      # --max-jobs 0 on a CPU-only machine
    python -m fastm2d.transfer.interfaces.xares {path.name} TASKS.py --max-jobs 0   # where torchaudio cannot decode

X-ARES builds this class with no arguments and files embeddings, probes and scores under its name, which is unique
to these weights: another model's results are never read as this one's.
"""
import torch

import fastm2d.transfer.interfaces.xares as _xares

WEIGHTS = {str(weights_file)!r}
WEIGHTS_SHA256 = {file_sha256(weights_file)!r}


class {cls}(_xares.M2DEncoder):
    def __init__(self):
        super().__init__(WEIGHTS, device="cuda" if torch.cuda.is_available() else "cpu",
                         untrained_seed={untrained_seed!r}, expected_sha256=WEIGHTS_SHA256)
'''
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path


def _soundfile_load(uri, *args, **kwargs):
    """torchaudio.load's answer (channels-first float32, sample rate) from soundfile, for file paths and file
    objects: what webdataset's torch_audio decoder calls."""
    import soundfile as sf
    data, sr = sf.read(uri, dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sr


def run_xares(argv) -> None:
    """X-ARES's own runner (`python -m xares.run ...`), with soundfile decoding where torchaudio cannot decode."""
    import runpy

    import torchaudio
    try:
        import torchcodec  # noqa: F401  (torchaudio 2.9+ decodes through it)
    except Exception:
        torchaudio.load = _soundfile_load
    sys.argv = ["xares.run", *argv]
    runpy.run_module("xares.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run_xares(sys.argv[1:])
