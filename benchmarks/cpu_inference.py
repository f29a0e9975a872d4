"""CPU inference, side by side in one process: the original runtime against ours and each speed lever.

    python benchmarks/cpu_inference.py [--original PATH/portable_m2d.py] [--clips 4] [--rounds 5] [--out FILE.md]

One ViT-B file (768 wide, 12 blocks, 80x608 16x16; random weights: speed does not depend on them), `--clips` clips
of 10 s. Rows, timed round by round in turn (a drift of the machine's speed hits every row alike; medians quoted):
- original: nttcslab/m2d's examples/portable_m2d.py (`PortableM2D(file).encode`), when `--original` names a copy
  (pip install nnAudio einops; it is imported from that path, nothing of it is in this repository);
- ours fp32: `Runtime.encode` (`load_encoder(W)`), the README's first call;
- levers: one thread; torch.compile of the encoder (Inductor's CPU code); dynamic int8 of the linear layers
  (`Runtime.use_int8`, `--precision int8`); onnxruntime on the waveform-in graph (`export --format onnx`) in fp32 and
  with onnxruntime's dynamic int8 of its matrix products; bf16 autocast where the CPU reports bf16 units.
Each row's features against ours fp32: the largest difference relative to the features' scale and the lowest
per-clip cosine. The int8 and bf16 rows also give a linear probe's accuracy on the built-in synthetic tasks
(`linear-eval synthetic:N`, embedded both ways), the tolerance a lower precision must meet besides the cosine.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model_cases import cpu_name  # noqa: E402
from fastm2d import devices  # noqa: E402


def vit_b_files(folder: Path) -> Path:
    """Our checkpoint of a random ViT-B, and the same encoder in the original's release layout and folder name (its
    loader reads the sizes from the folder's name): -> our file."""
    from benchmarks.model_cases import random_checkpoint
    from fastm2d.checkpoint import read_checkpoint
    from fastm2d.model import ViTEncoder
    ours = random_checkpoint(folder / "vit_b.pth")
    state, cfg, _, _ = read_checkpoint(ours)
    encoder_keys = set(ViTEncoder(cfg).state_dict())
    original = folder / "m2d_vit_base-80x608p16x16-221006-mr7_enconly" / "checkpoint-300.pth"
    original.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v for k, v in state.items() if k in encoder_keys}}, original)
    return ours


def original_encoder(path: str, folder: Path) -> Callable:
    spec = importlib.util.spec_from_file_location("portable_m2d", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the benchmark's user named this file: the original, to compare with
    model = module.PortableM2D(str(folder / "m2d_vit_base-80x608p16x16-221006-mr7_enconly" / "checkpoint-300.pth"))
    return lambda wav: model.encode(wav)


def onnx_sessions(weights: Path, folder: Path, threads: int) -> Dict[str, Callable]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from fastm2d.transfer.onnx_export import WAVEFORM_GRAPH, export_onnx
    export_onnx(weights, folder / "onnx")
    graph = folder / "onnx" / WAVEFORM_GRAPH
    front_end = ["/logmel/Conv", "/logmel/MatMul"]  # the DFT and mel products stay fp32: int8 there ruins the log
    quantize_dynamic(str(graph), str(folder / "int8.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=front_end,
                     extra_options={"MatMulConstBOnly": True})  # weights only: attention's products stay fp32
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    out = {}
    for name, file in (("onnxruntime fp32", graph), ("onnxruntime int8", folder / "int8.onnx")):
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        out[name] = (lambda s: lambda wav: torch.from_numpy(s.run(None, {"waveform": wav.numpy()})[0]))(session)
    return out


def compare(x: torch.Tensor, ref: torch.Tensor) -> str:
    rel = float((x.float() - ref).abs().max() / ref.abs().max())
    cos = float(torch.nn.functional.cosine_similarity(x.float().flatten(1), ref.flatten(1)).min())
    return f"{100 * rel:.2g} % / {cos:.5f}"


def probe_accuracy(weights: Path, folder: Path, precision: str, clips: int) -> str:
    """linear-eval on the synthetic tasks (`clips` clips), embeddings in `precision`: mean accuracy per task."""
    from fastm2d.eval.linear import ProbeConfig
    from fastm2d.eval.probe import probe_weights
    rows = probe_weights(str(weights), f"synthetic:{clips}", folder / f"probe-{precision}", ProbeConfig(), seeds=3,
                         progress=False, precision=precision)
    return ", ".join(f"{r.split('|')[2].strip().removeprefix('synthetic-')} {r.split('|')[4].split('+-')[0].strip()} %"
                     for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", help="a copy of the original's examples/portable_m2d.py (needs nnAudio, einops)")
    ap.add_argument("--clips", type=int, default=4, help="10-s clips per call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--probe-clips", type=int, default=600, help="synthetic clips of the probe rows (0: none)")
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out (compile, onnx, probe)")
    ap.add_argument("--out", help="write the markdown table here")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    warnings.filterwarnings("ignore")
    from benchmarks.model_cases import emit
    from fastm2d.transfer.runtime import load_encoder
    torch.manual_seed(0)
    wav = torch.randn(args.clips, 160000) * 0.1
    threads = torch.get_num_threads()
    rows: Dict[str, Callable] = {}
    notes: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = vit_b_files(folder)
        if args.original:
            rows["original (portable_m2d.py), fp32"] = original_encoder(args.original, folder)
        fp32 = load_encoder(weights).set_precision("fp32")
        rows["ours fp32 (Runtime.encode)"] = lambda w: fp32.encode(w, 16000)

        def one_thread(w):
            torch.set_num_threads(1)
            try:
                return fp32.encode(w, 16000)
            finally:
                torch.set_num_threads(threads)
        rows["ours fp32, 1 thread"] = one_thread
        if "compile" not in skip:
            compiled = load_encoder(weights).set_precision("fp32")
            compiled.encoder.encode_patches = torch.compile(compiled.encoder.encode_patches, dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled.encode(wav, 16000)
            notes["ours fp32 + torch.compile"] = f"compiles in {time.perf_counter() - t0:.0f} s (once per shape)"
            rows["ours fp32 + torch.compile"] = lambda w: compiled.encode(w, 16000)
        int8 = load_encoder(weights).set_precision("int8")
        rows["ours int8 (--precision int8)"] = lambda w: int8.encode(w, 16000)
        bf16_units = devices.cpu_bf16_units()
        if bf16_units:
            bf16 = load_encoder(weights).set_precision("bf16")
            rows["ours bf16 autocast"] = lambda w: bf16.encode(w, 16000)
        if "onnx" not in skip:
            rows.update(onnx_sessions(weights, folder, threads))
        with torch.no_grad():
            ref = rows["ours fp32 (Runtime.encode)"](wav).float()
            outputs = {name: fn(wav) for name, fn in rows.items()}  # warm-up, and the features to compare
            times: Dict[str, List[float]] = {name: [] for name in rows}
            for _ in range(args.rounds):
                for name, fn in rows.items():
                    t0 = time.perf_counter()
                    fn(wav)
                    times[name].append(time.perf_counter() - t0)
        probes = {}
        if "probe" not in skip and args.probe_clips:
            for precision in ["fp32", "int8"] + (["bf16"] if bf16_units else []):
                probes[precision] = probe_accuracy(weights, folder, precision, args.probe_clips)
    base_name = next(iter(rows))
    base = statistics.median(times[base_name])
    ours = statistics.median(times["ours fp32 (Runtime.encode)"])
    lines = [f"CPU inference, {platform.machine()} ({cpu_name()}), {threads} threads, torch {torch.__version__}, "
             f"bf16 units: {'yes' if bf16_units else 'no'}, {time.strftime('%Y-%m-%d')}; ViT-B 80x608, "
             f"{args.clips} clips of 10 s per call, median of {args.rounds} rounds", "",
             f"| what | clips/s | vs {base_name.split(',')[0]} | vs ours fp32 | features vs ours fp32 (max diff / "
             f"min cosine) | note |", "|---|---|---|---|---|---|"]
    for name in rows:
        t = statistics.median(times[name])
        lines.append(f"| {name} | {args.clips / t:.2f} | {base / t:.2f}x | {ours / t:.2f}x | "
                     f"{compare(outputs[name], ref)} | {notes.get(name, '')} |")
    if probes:
        lines += ["", f"Linear probe (3 seeds) on `synthetic:{args.probe_clips}`, the same ViT-B embedded in each "
                      f"precision: " + "; ".join(f"{p}: {v}" for p, v in probes.items())]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
