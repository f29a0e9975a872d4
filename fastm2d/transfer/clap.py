"""M2D-CLAP zero-shot: text labels ranked against audio in the shared space (the projection heads themselves are
model/projections.py; the text encoders come from Hugging Face transformers, loaded from local files only)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import CheckpointError
from ..frontend import first_line
from ..model.projections import sub_state
from ..checkpoint import read_checkpoint
from .runtime import runtime_from_state
from .batching import length_batches

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


class TextEncoder(nn.Module):
    """A Hugging Face text model from a local folder (or the local cache: never the network), pooled as the
    release was trained: mean over tokens (GTE) or the [CLS] token (BERT)."""

    def __init__(self, source: str, pooling: str):
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise CheckpointError("zero-shot needs transformers: pip install 'fastm2d[clap]'") from None
        # A model folder is data: its custom code (`auto_map`) is never run and never asked about
        # (trust_remote_code=False: transformers would otherwise prompt, and run it on "y").
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
            self.model = AutoModel.from_pretrained(source, local_files_only=True, trust_remote_code=False).eval()
        except OSError as e:
            raise CheckpointError(f"text encoder {source}: not found locally ({str(e).splitlines()[0][:160]}); "
                                  f"download it once (huggingface-cli download {source}) or pass --text-encoder "
                                  f"DIR") from None
        except Exception as e:  # noqa: BLE001 - custom code, a pickle that would run code, a broken config
            raise CheckpointError(f"text encoder {source}: refused ({type(e).__name__}: {first_line(e)}); fastm2d "
                                  f"reads a text model's config and weights as data only: no custom code, no "
                                  f"pickled objects (safetensors weights are the safe form)") from None
        custom = getattr(self.model.config, "auto_map", None) or \
            getattr(self.tokenizer, "init_kwargs", {}).get("auto_map")
        if custom:  # its code was not run, and the stock class read in its place would compute something else
            raise CheckpointError(f"text encoder {source}: its config names custom code ({custom}); fastm2d reads "
                                  f"a text model's config and weights as data only: no custom code, no pickled "
                                  f"objects")
        self.pooling = pooling

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

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

        zs = ZeroShot(W)            # the text encoder a fastm2d run recorded, or the one a release's name declares
        sims = zs.similarity(waveform, 16000, ["dog barking", "rain"])   # (B, labels)
    """

    def __init__(self, weights, text_encoder: Optional[str] = None, device="cpu"):
        super().__init__()
        state, cfg, sr, _ = read_checkpoint(weights)  # read once: encoder, projections and any text encoder
        self.runtime = runtime_from_state(state, cfg, sr, weights, text_encoder_used=True).to(device)
        if getattr(self.runtime, "audio_proj", None) is None:
            raise CheckpointError(f"{weights}: no audio_proj: not an M2D-CLAP model")
        if cfg.text_encoder:  # trained by fastm2d: the caption encoder and pooling the run recorded
            source, pooling = cfg.text_encoder, cfg.text_pooling
            self.text_encoder_name = source
        else:  # a release: the encoder its name declares
            self.text_encoder_name, source, pooling = TEXT_ENCODERS[declared_text_encoder(weights)]
        self.text = TextEncoder(text_encoder or source, pooling).to(device)
        inside = sub_state(state, "text_encoder.")
        if inside:  # 'TI' releases carry the fine-tuned text encoder (under the original's wrapper names)
            inside = {k.split(".", 1)[1] if k.split(".", 1)[0] in ("text_encoder", "model") else k: v
                      for k, v in inside.items()}
            try:
                self.text.model.load_state_dict(inside)
            except RuntimeError as e:
                raise CheckpointError(f"{weights}: its text_encoder.* weights do not fit {text_encoder or source} "
                                      f"({str(e).splitlines()[0][:160]})") from None
        # No text_proj in the file: the original's text projection is the identity (a caption encoder as wide as
        # the audio side); any other width cannot share the space.
        self.text_proj = getattr(self.runtime, "text_proj", None) or nn.Identity()
        if isinstance(self.text_proj, nn.Identity):
            text_width, audio_width = self.text.width, self.audio_width()
            if text_width != audio_width:
                raise CheckpointError(f"{weights}: no text_proj, and the text encoder's width {text_width} differs "
                                      f"from the audio embedding's {audio_width}: another text encoder was meant")

    def audio_width(self) -> int:
        """The audio embedding's width: the projection's output (the encoder's width for the releases)."""
        proj = self.runtime.audio_proj
        if isinstance(proj, nn.Identity):
            return self.runtime.cfg.embed_dim
        last = [m for m in proj.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))][-1]
        return last.normalized_shape[0] if isinstance(last, nn.LayerNorm) else last.out_features

    def audio(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        with self.runtime.inference():
            return nn.functional.normalize(self.runtime.clap_audio(waveform, sample_rate).float(), dim=-1)

    @torch.no_grad()
    def texts(self, labels) -> torch.Tensor:
        return nn.functional.normalize(self.text_proj(self.text(labels)), dim=-1)

    def similarity(self, waveform: torch.Tensor, sample_rate: int, labels) -> torch.Tensor:
        return self.audio(waveform, sample_rate) @ self.texts(labels).T


def zeroshot_files(zs: ZeroShot, files, labels, topk: int = 5, on_skip=None, batch_size: int = 16,
                   workers: int = 2):
    """`fastm2d zeroshot`: for each readable file, in the order given, {'file', 'labels' (the top k, best first),
    'similarity'}; files decoded in workers and clips of one length embedded together (transfer/batching.py); an
    unreadable file goes to on_skip(message)."""
    texts = zs.texts(labels)
    sr = zs.runtime.sample_rate
    rows = {}
    for idx, wav in length_batches(files, sr, batch_size, workers, lambda i, error: on_skip and on_skip(error)):
        for i, sims in zip(idx, zs.audio(wav.to(texts.device), sr) @ texts.T):
            order = torch.argsort(sims, descending=True)[:topk].tolist()
            rows[i] = {"file": str(files[i]), "labels": [labels[j] for j in order],
                       "similarity": [round(float(sims[j]), 5) for j in order]}
    for i in sorted(rows):
        yield rows[i]
