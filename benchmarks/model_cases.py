"""What the inference benchmarks share: a checkpoint of random weights at a size (speed and memory do not depend on
the weights), and the markdown table they print and write."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import List, Optional

import torch

TINY = dict(size="tiny", embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)  # the tests' tiny model: the decoding side of a benchmark dominates


def random_checkpoint(path: Path, model: str = "vit_b", seed: int = 0) -> Path:
    """A fastm2d checkpoint of a random M2D: `vit_b` (the paper's ViT-B 80x608) or `tiny` -> its path."""
    from fastm2d.checkpoint import atomic_save
    from fastm2d.config import ModelConfig
    from fastm2d.model import M2D
    torch.manual_seed(seed)
    m = M2D(ModelConfig(**(TINY if model == "tiny" else {})).resolved())
    atomic_save({"model": m.state_dict(), "model_config": m.cfg.__dict__}, path)
    return path


def emit(lines: List[str], out: Optional[str]) -> None:
    """The table: printed, and written to `out` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


def cpu_name() -> str:
    """The CPU's model name, for a results file's first line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_vector_flags() -> str:
    """The CPU's vector and matrix extensions that decide low-precision speed (AVX2, AVX-512, VNNI, bf16, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                wanted = ("avx2", "avx512", "vnni", "bf16", "amx")
                return " ".join(f for f in line.split(":", 1)[1].split() if f.startswith(wanted) or f in wanted) \
                    or "no AVX2/AVX-512/VNNI/bf16/AMX"
    except OSError:
        pass
    return "flags unknown"
