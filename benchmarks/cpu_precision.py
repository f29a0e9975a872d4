"""bf16 against fp32 on this CPU, side by side in one process: what precision `auto` (fastm2d/devices.py) buys.

    python benchmarks/cpu_precision.py [--rounds 5] [--out FILE.md]

Rows: a 2048x2048 matrix product (GFLOP/s), and a ViT-B encoder (768 wide, 12 blocks, 80x608 16x16; random
weights: speed does not depend on them) encoding a batch of 10 s clips with `Runtime.encode`, as embed, tag and the
interfaces do. fp32 and bf16 alternate round by round, so a drift of the machine's speed hits both; the figure to
quote is the median of the per-round ratios. Also states the measurement `auto` decides by on this CPU.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastm2d import devices


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_rows(rounds: int) -> dict:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ah, bh = a.bfloat16(), b.bfloat16()
    torch.mm(a, b), torch.mm(ah, bh)
    t32, t16 = [], []
    for _ in range(rounds):
        t32.append(_time(lambda: torch.mm(a, b)))
        t16.append(_time(lambda: torch.mm(ah, bh)))
    flop = 2 * 2048 ** 3
    return {"what": "2048x2048 matrix product", "fp32": f"{flop / statistics.median(t32) / 1e9:.0f} GFLOP/s",
            "bf16": f"{flop / statistics.median(t16) / 1e9:.0f} GFLOP/s",
            "ratio": statistics.median(x / y for x, y in zip(t32, t16))}


def encode_rows(rounds: int, clips: int) -> dict:
    from fastm2d.checkpoint import atomic_save
    from fastm2d.config import ModelConfig
    from fastm2d.model import M2D
    from fastm2d.transfer.runtime import load_encoder
    with tempfile.TemporaryDirectory() as tmp:
        model = M2D(ModelConfig().resolved())
        atomic_save({"model": model.state_dict(), "model_config": model.cfg.__dict__}, Path(tmp) / "vit_b.pth")
        rt = load_encoder(Path(tmp) / "vit_b.pth")
    wav = torch.randn(clips, 160000) * 0.1
    cpu = torch.device("cpu")

    def encode(setting):
        with torch.no_grad(), devices.autocast(cpu, setting):
            return rt.encode(wav, 16000).float()

    ref, low = encode("fp32"), encode("bf16")  # warm-up, and the difference
    t32, t16 = [], []
    for _ in range(rounds):
        t32.append(_time(lambda: encode("fp32")))
        t16.append(_time(lambda: encode("bf16")))
    return {"what": f"ViT-B encode, {clips} clips of 10 s", "fp32": f"{clips / statistics.median(t32):.2f} clips/s",
            "bf16": f"{clips / statistics.median(t16):.2f} clips/s",
            "ratio": statistics.median(x / y for x, y in zip(t32, t16)),
            "rel_error": ((low - ref).norm() / ref.norm()).item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    speedup, units = devices.cpu_bf16_speedup(), devices.cpu_bf16_units()
    rows = [matmul_rows(args.rounds), encode_rows(args.rounds, args.clips)]
    lines = [f"CPU precision, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, {time.strftime('%Y-%m-%d')}; bf16 units reported: {units}; a 1024x1024 bf16 product "
             f"at {speedup:.2f}x fp32's speed; `auto` -> {devices.cpu_precision()}", "",
             "| what | fp32 | bf16 | bf16 / fp32 speed (median of per-round ratios) |", "|---|---|---|---|"]
    for r in rows:
        extra = f" (features within {100 * r['rel_error']:.2f} % of fp32's)" if "rel_error" in r else ""
        lines.append(f"| {r['what']} | {r['fp32']} | {r['bf16']} | {r['ratio']:.2f}x{extra} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
