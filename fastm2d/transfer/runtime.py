"""Transfer: audio of any length -> frame features (paper eq. 4) and clip embeddings, with our or original weights.

Long inputs are cut into chunks of the training length, the tail padded to a multiple of the patch width;
each chunk is encoded on its own and the frames concatenated (docs/spec.md "Transfer": 10 s on 80x608 -> 63 frames).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import ENCODER_PREFIXES, TEXT_ENCODER_PREFIX, load_weights, read_checkpoint, resolve_checkpoint_file
from ..config import ModelConfig
from ..devices import autocast
from ..errors import DataError
from ..frontend import LogMelSpectrogram, normalize
from ..model import ViTEncoder
from ..model.projections import attach_projections, audio_embedding

log = logging.getLogger("fastm2d")
CHUNKS_PER_FORWARD = 64  # whole chunks per encoder call: ~0.3 GB of ViT-B activations, batches of 64 10-s clips whole


class Runtime(nn.Module):
    """An encoder plus its front end and normalisation statistics, ready for feature extraction."""

    def __init__(self, encoder: ViTEncoder, sample_rate: int = 16000):
        super().__init__()
        self.encoder = encoder.eval()
        self.frontend = LogMelSpectrogram(sample_rate)
        self.sample_rate = sample_rate
        self.weights_id: Optional[str] = None  # load_encoder's identity of the weights (outputs are keyed by it)
        self.precision = "auto"  # encode / scene_embedding / clap_audio: auto | fp32 | bf16 (fastm2d/devices.py)
        self.int8 = False  # use_int8(): the encoder's linear layers in dynamic int8

    def use_int8(self) -> "Runtime":
        """The encoder's linear layers in dynamic int8 on CPU (weights int8 per tensor, each batch's activations
        quantised on the fly: PyTorch's fbgemm / x86 kernels), the rest fp32. Opt-in, never `auto`: features move
        by a measured amount (benchmarks/cpu_inference.py reports the speed, the features' cosine to fp32 and a
        probe's accuracy both ways). Irreversible on this object: load the weights again for fp32."""
        if self.device.type != "cpu":
            raise ValueError(f"int8 inference runs on CPU; this model is on {self.device}")
        engines = torch.backends.quantized.supported_engines
        if torch.backends.quantized.engine == "x86" and "fbgemm" in engines:
            # PyTorch's x86 default dispatches dynamic linears ~10 % slower than fbgemm itself on ViT-B (2-core AVX2
            # EPYC, 2026-12-06); the engine packs the weights below and runs them, process-wide
            torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated for torchao, still in torch 2.11
            warnings.simplefilter("ignore", DeprecationWarning)
            self.encoder = torch.ao.quantization.quantize_dynamic(self.encoder, {nn.Linear}, dtype=torch.qint8)
        self.precision, self.int8 = "fp32", True  # quantised layers take fp32 activations
        return self

    def set_precision(self, setting: str) -> "Runtime":
        """The commands' --precision: auto | fp32 | bf16 (autocast, fastm2d/devices.py) or int8 (use_int8)."""
        if setting == "int8":
            return self.use_int8()
        if setting not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision {setting!r}: expected auto, fp32, bf16 or int8")
        self.precision = setting
        return self

    @property
    def device(self) -> torch.device:
        return self.encoder.pos_embed.device

    @contextlib.contextmanager
    def inference(self, grad: bool = False):
        """The one context a model is used in (encode, embed, tag, zero-shot, the interfaces, linear-eval's
        embeddings): the arithmetic `self.precision` chooses on the model's device (`auto`: bf16 on a GPU and on a
        CPU with bf16 units, fastm2d/devices.py; FASTM2D_PRECISION overrides), no autograd unless `grad` (and the
        caller's grad mode) asks for it: s3prl fine-tunes through `encode`."""
        with autocast(self.device, self.precision), torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            yield

    @property
    def cfg(self) -> ModelConfig:
        return self.encoder.cfg

    def check_layers(self, layers, option: str = "--layers") -> None:
        """Every block index a user passes, checked against this model's depth in one place (embed, linear-eval,
        the interfaces): one line naming the option and the range, never an IndexError inside a batch loop."""
        depth = self.cfg.depth
        if layers is not None and not all(type(k) is int and -depth <= k < depth for k in layers):
            raise DataError(f"{option} {','.join(map(str, layers))}: this model has {depth} blocks: layers 0 to "
                            f"{depth - 1} (or -1 to -{depth} from the last)")

    @property
    def feature_dim(self) -> int:
        return self.encoder.grid[0] * self.cfg.embed_dim

    def normalize(self, lms: torch.Tensor) -> torch.Tensor:
        return normalize(lms, *self.encoder.norm_stats)  # 0-dim tensors: no host sync

    def encode_lms(self, lms: torch.Tensor, return_layers: bool = False) -> torch.Tensor | List[torch.Tensor]:
        """Normalised log-mel (B, 1, F, T) or (B, F, T), any T -> (B, T', F'*D) frame features (eq. 4).

        With return_layers, a list with one such tensor per block (the last after the final norm). Whole chunks go
        through the encoder `CHUNKS_PER_FORWARD` at a time: a long input's activations stay bounded (an hour at
        once once took 9.9 GB); only the layers asked for are kept.
        """
        if lms.dim() == 3:
            lms = lms.unsqueeze(1)
        unit = self.cfg.input_size[1]
        chunks = -(-lms.shape[-1] // unit)  # counted before the padding, as the original (portable_m2d l. 412-415):
        pad = self.padded_frames(lms.shape[-1]) - lms.shape[-1]  # padding that crosses a chunk boundary (80x1001,
        if pad:  # 2000 frames: 2009) starts no chunk of its own
            lms = F.pad(lms, (0, pad))[..., :chunks * unit]
        n_f, b = self.encoder.grid[0], lms.shape[0]
        eq4 = lambda z, n: z.reshape(n, n_f, -1, z.shape[-1]).transpose(1, 2).flatten(2)  # noqa: E731
        # (B, F'*T', D) -> (B, F', T', D) -> (B, T', F'*D)   (eq. 4)
        encode = lambda x: (self.encoder.encode_patches(x, return_layers=True) if return_layers  # noqa: E731
                            else [self.encoder.encode_patches(x)])
        full = lms.shape[-1] // unit
        parts = []
        if full:  # every whole chunk of every clip batched together, not one after another
            x = lms[..., :full * unit].reshape(b, 1, lms.shape[2], full, unit).permute(0, 3, 1, 2, 4)
            x = x.reshape(b * full, 1, lms.shape[2], unit)
            outs = [encode(x[i:i + CHUNKS_PER_FORWARD]) for i in range(0, b * full, CHUNKS_PER_FORWARD)]
            chunked = [eq4(torch.cat([o[k] for o in outs]), b * full) for k in range(len(outs[0]))]
            parts.append([z.reshape(b, -1, z.shape[-1]) for z in chunked])
        if lms.shape[-1] > full * unit:  # the shorter tail chunk
            parts.append([eq4(z, b) for z in encode(lms[..., full * unit:])])
        layers = [torch.cat([p[i] for p in parts], dim=1) for i in range(len(parts[0]))]
        return layers if return_layers else layers[-1]

    def to_lms(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """(B, N) or (N,) waveform -> normalised (B, 1, 80, T) log-mel."""
        if sample_rate != self.sample_rate:
            raise ValueError(f"this model takes {self.sample_rate} Hz audio, got {sample_rate} Hz "
                             f"(resample with torchaudio.functional.resample or fastm2d.read_audio)")
        if waveform.dim() == 1:
            waveform = waveform.unsqueeze(0)
        return self.normalize(self.frontend(waveform)).unsqueeze(1)

    def encode(self, waveform: torch.Tensor, sample_rate: int, return_layers: bool = False):
        """Waveform (B, N) -> frame features (B, T', F'*D), one frame per patch width (160 ms for 16x16).

        Runs in the arithmetic the commands use (`self.precision`, `auto`: bf16 on a GPU and on a CPU with bf16
        units, fastm2d/devices.py; FASTM2D_PRECISION overrides), so the README's first call is as fast as `embed`;
        the features come back in fp32 either way."""
        with self.inference(grad=True):
            out = self.encode_lms(self.to_lms(waveform, sample_rate), return_layers=return_layers)
        return [o.float() for o in out] if return_layers else out.float()

    @property
    def frame_seconds(self) -> float:
        """Duration of one feature frame: one patch width (0.16 s for 16x16 at 16 kHz)."""
        return self.cfg.patch_size[1] * self.frontend.hop_length / self.sample_rate

    def padded_frames(self, lms_frames: int) -> int:
        """The original's rule: the last chunk padded to a whole number of patches (chunks of the input length)."""
        unit, patch_t = self.cfg.input_size[1], self.cfg.patch_size[1]
        return lms_frames + (patch_t - lms_frames % unit % patch_t) % patch_t

    def frame_times_ms(self, lms_frames: int) -> torch.Tensor:
        """The centre (ms) of each feature frame `encode_lms` gives for `lms_frames` log-mel frames: chunk by chunk,
        so a grid that leaves frames unseen (80x1001 at 16x16: 62 patches per 1001 frames) keeps true times."""
        unit, patch_t = self.cfg.input_size[1], self.cfg.patch_size[1]
        total = self.padded_frames(lms_frames)
        centres = [start + patch_t * (j + 0.5) for start in range(0, total, unit)
                   for j in range(min(unit, total - start) // patch_t)]
        return torch.tensor(centres, dtype=torch.float64) * (self.frontend.hop_length / self.sample_rate * 1000)

    def timestamp_embeddings(self, waveform: torch.Tensor, sample_rate: int):
        """HEAR-style: (frame features (B, T', F'*D), timestamps (B, T') in milliseconds, each frame's centre)."""
        lms = self.to_lms(waveform, sample_rate)
        feats = self.encode_lms(lms)
        ts = self.frame_times_ms(lms.shape[-1]).to(device=feats.device, dtype=torch.float32)
        return feats, ts.expand(feats.shape[0], -1)

    def clap_audio(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """M2D-CLAP: waveform -> the audio embedding in the audio-text space (B, E). The projection reads the
        encoder's patch tokens taken flat, each D wide (the original's `flat_features`, as M2D_CLAP_ViT trains
        it), not the F'*D-wide frames of eq. 4."""
        if getattr(self, "audio_proj", None) is None:
            raise ValueError("these weights have no audio_proj: not an M2D-CLAP model")
        return audio_embedding(self.patch_tokens(self.encode(waveform, sample_rate)), self.audio_proj)

    def patch_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """Eq. 4 frames (B, T', F'*D) -> every patch token (B, T'*F', D): each frame holds its F' tokens side by
        side ((f d) order), so this is a view."""
        b, t, _ = frames.shape
        return frames.reshape(b, t * self.encoder.grid[0], self.cfg.embed_dim)

    def scene_embedding(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Clip embedding: the mean of the frame features over time -> (B, F'*D)."""
        return self.encode(waveform, sample_rate).mean(dim=1)


def load_encoder(path: str | Path, input_frames: Optional[int] = None, attention: Optional[str] = None,
                 device: str | torch.device = "cpu", untrained_seed: Optional[int] = None) -> Runtime:
    """A `Runtime` from a fastm2d checkpoint or run folder, an original checkpoint, or an encoder-only file.

    input_frames: another training length for fine-tuning; the position table is trimmed or resampled.
    untrained_seed: the same architecture freshly initialised with this seed (its normalisation statistics kept): the
    baseline a pre-trained model must beat, in linear-eval and every interface.
    """
    state, cfg, sr, _ = read_checkpoint(path)
    runtime = runtime_from_state(state, cfg, sr, path, input_frames, attention)
    if untrained_seed is not None:
        torch.manual_seed(untrained_seed)
        runtime.encoder.init_weights()
    runtime.weights_id = weights_identity(path, untrained_seed, input_frames)
    return runtime.to(device)


def weights_identity(path, untrained_seed: Optional[int] = None, input_frames: Optional[int] = None) -> str:
    """Which weights made an output: the resolved file, its size and time, and what changed them after loading.
    Outputs are reused only under the same identity (`embed`'s manifest)."""
    import hashlib
    file = resolve_checkpoint_file(path).resolve()
    try:
        st = file.stat()
        stamp = f"{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        stamp = "?"
    text = f"{file}|{stamp}|untrained={untrained_seed}|frames={input_frames}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def runtime_from_state(state, cfg: ModelConfig, sr: int, path, input_frames: Optional[int] = None,
                       attention: Optional[str] = None, text_encoder_used: bool = False) -> Runtime:
    """`load_encoder` from what `read_checkpoint` returned (for callers that need the rest of the file too);
    `text_encoder_used`: the caller (zero-shot) reads the file's text encoder, so its keys are not left unsaid."""
    text_keys = [k for k in state if k.startswith(TEXT_ENCODER_PREFIX)]
    if text_keys and not text_encoder_used:
        log.warning("%s holds a text encoder (%d tensors: %s ...) that audio features do not use; zero-shot "
                    "(fastm2d.ZeroShot, `fastm2d zeroshot`) does", path, len(text_keys), text_keys[0])
    cfg.attention = attention or cfg.attention
    encoder = ViTEncoder(cfg)
    load_weights(encoder, {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}, path)
    if input_frames is not None and input_frames != cfg.input_size[1]:
        encoder.set_input_frames(input_frames)
    runtime = Runtime(encoder, sr)
    attach_projections(runtime, state, path)  # M2D-CLAP: audio_proj / text_proj travel with the encoder
    return runtime
