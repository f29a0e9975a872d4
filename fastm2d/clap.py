"""M2D-CLAP's projections: audio and text embeddings into one space (Niizumi et al., M2D-CLAP 2024 / 2025).

The released files carry them beside the encoder, in one of these forms (the layouts of the original's
examples/portable_m2d.py, rebuilt here from the tensor shapes alone):

  audio_proj.0/2.*                      an MLP: Linear, ReLU, Linear over the clip embedding (time mean)
  audio_proj.sem_token, .sem_blocks.N.*, .norm.*   the 2025 "semantic" head: a learnable token and N one-head
                                        transformer blocks over the frame features; the token's output is the embedding
  text_proj.weight / text_proj.0/2.*    a Linear or an MLP from the text encoder's width
  (text_proj without audio_proj: the audio side is the clip embedding itself)
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
from torch import nn

from .errors import CheckpointError


def _sub(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class SemanticProjector(nn.Module):
    """A learnable token prepended to the frame features, one-head blocks, the token's output normalised."""

    def __init__(self, dim: int, depth: int, mlp_ratio: float):
        super().__init__()
        from timm.models.vision_transformer import Block  # the original's own block: the same keys and maths
        self.sem_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.sem_blocks = nn.ModuleList([Block(dim, 1, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                                         for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.sem_token.expand(frames.shape[0], -1, -1), frames], dim=1)
        for block in self.sem_blocks:
            x = block(x)
        return self.norm(x[:, 0])


def build_projection(state: Dict[str, torch.Tensor], prefix: str) -> Optional[nn.Module]:
    """The projection stored under `prefix` (audio_proj. / text_proj.), loaded; None when the file has none."""
    sub = _sub(state, prefix)
    if not sub:
        return None
    if "sem_token" in sub:
        dim = sub["sem_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sub if k.startswith("sem_blocks."))
        module = SemanticProjector(dim, depth, sub["sem_blocks.0.mlp.fc1.weight"].shape[0] / dim)
    elif "0.weight" in sub and "2.weight" in sub:
        module = mlp(sub["0.weight"].shape[1], sub["0.weight"].shape[0], sub["2.weight"].shape[0])
    elif "weight" in sub:
        module = nn.Linear(sub["weight"].shape[1], sub["weight"].shape[0], bias="bias" in sub)
    else:
        raise CheckpointError(f"{prefix.rstrip('.')}: unknown projection layout (keys {sorted(sub)[:6]})")
    try:
        module.load_state_dict(sub)
    except RuntimeError as e:
        raise CheckpointError(f"{prefix.rstrip('.')}: weights do not fit ({str(e).splitlines()[0]})") from None
    return module.eval()


def attach_projections(module: nn.Module, state: Dict[str, torch.Tensor], path) -> None:
    """Set `module.audio_proj` / `module.text_proj` from a checkpoint's state (M2D-CLAP files only)."""
    for name in ("audio_proj", "text_proj"):
        try:
            proj = build_projection(state, name + ".")
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if proj is not None:
            setattr(module, name, proj)
    if getattr(module, "text_proj", None) is not None and getattr(module, "audio_proj", None) is None:
        module.audio_proj = nn.Identity()  # the 2025 ablations: text projected onto the clip embedding


def audio_embedding(frames: torch.Tensor, audio_proj: nn.Module) -> torch.Tensor:
    """Frame features (B, T', D) -> the audio embedding in the shared space (B, E), as the original computes it:
    the semantic head reads the frames; every other form reads their time mean."""
    if isinstance(audio_proj, SemanticProjector):
        return audio_proj(frames)
    return audio_proj(frames.mean(dim=1))


# ------------------------------------------------------------------------------------------- zero-shot -----
# The text encoder a release name declares (the letter after the sample rate: "...p16kpB..."), as the original's
# portable_m2d picks it, and how it pools tokens into one embedding.
TEXT_ENCODERS = {"A": ("GTE-base", "thenlper/gte-base", "mean"), "B": ("BERT-base", "google-bert/bert-base-uncased",
                                                                      "cls")}


def declared_text_encoder(weights) -> str:
    """'A' (GTE-base, also when the name says nothing: the 2024 models) or 'B' (BERT-base) from the release name."""
    from pathlib import Path
    for name in (Path(weights).parent.name, Path(weights).stem, Path(weights).name):
        parts = name.split("-")
        if len(parts) > 1 and "x" in parts[1]:
            extra = parts[1].split("p")[3:]
            kind = extra[0] if extra else "A"
            if kind not in TEXT_ENCODERS:
                raise CheckpointError(f"{weights}: text encoder {kind!r} ({'NV-Embed-v2' if kind == 'N' else '?'}) is "
                                      f"not supported; GTE-base (A) and BERT-base (B) are")
            return kind
    return "A"


@contextlib.contextmanager
def checkout_kernels_hidden():
    """Run from a checkout, the repository root is on sys.path and its kernels/ folder (installed as
    fastm2d.kernels) looks like the Hugging Face package `kernels` to transformers, which then imports it as a
    top-level module and fails. Hide the checkout's root while transformers loads its models."""
    import importlib
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        yield
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved


class TextEncoder(nn.Module):
    """A Hugging Face text model from a local folder (or the local cache: never the network), pooled as the
    release was trained: mean over tokens (GTE) or the [CLS] token (BERT)."""

    def __init__(self, source: str, pooling: str):
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise CheckpointError("zero-shot needs transformers: pip install 'fastm2d[clap]'") from None
        try:
            with checkout_kernels_hidden():
                self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
                self.model = AutoModel.from_pretrained(source, local_files_only=True).eval()
        except OSError as e:
            raise CheckpointError(f"text encoder {source}: not found locally ({str(e).splitlines()[0][:160]}); "
                                  f"download it once (huggingface-cli download {source}) or pass --text-encoder "
                                  f"DIR") from None
        self.pooling = pooling

    @torch.no_grad()
    def forward(self, texts):
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=512, return_tensors="pt").to(device)
        hidden = self.model(**batch).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)


class ZeroShot(nn.Module):
    """M2D-CLAP zero-shot: audio and text embeddings in one space, l2-normalised; scores are cosine similarities.

        zs = ZeroShot(W)                                # the text encoder the release name declares
        sims = zs.similarity(waveform, 16000, ["dog barking", "rain"])   # (B, labels)
    """

    def __init__(self, weights, text_encoder: Optional[str] = None, device="cpu"):
        super().__init__()
        from .checkpoint import read_checkpoint
        from .runtime import load_encoder
        self.runtime = load_encoder(weights, device=device)
        if getattr(self.runtime, "text_proj", None) is None:
            raise CheckpointError(f"{weights}: no text_proj: not an M2D-CLAP model")
        kind = declared_text_encoder(weights)
        self.text_encoder_name = TEXT_ENCODERS[kind][0]
        self.text = TextEncoder(text_encoder or TEXT_ENCODERS[kind][1], TEXT_ENCODERS[kind][2]).to(device)
        state = read_checkpoint(weights)[0]
        inside = _sub(state, "text_encoder.")
        if inside:  # 'TI' releases carry the fine-tuned text encoder (under the original's wrapper names)
            inside = {k.split(".", 1)[1] if k.split(".", 1)[0] in ("text_encoder", "model") else k: v
                      for k, v in inside.items()}
            try:
                self.text.model.load_state_dict(inside)
            except RuntimeError as e:
                raise CheckpointError(f"{weights}: its text_encoder.* weights do not fit {text_encoder or kind} "
                                      f"({str(e).splitlines()[0][:160]})") from None

    @torch.no_grad()
    def audio(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        return nn.functional.normalize(self.runtime.clap_audio(waveform, sample_rate), dim=-1)

    @torch.no_grad()
    def texts(self, labels) -> torch.Tensor:
        return nn.functional.normalize(self.runtime.text_proj(self.text(labels)), dim=-1)

    def similarity(self, waveform: torch.Tensor, sample_rate: int, labels) -> torch.Tensor:
        return self.audio(waveform, sample_rate) @ self.texts(labels).T
