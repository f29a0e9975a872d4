"""The training-step rungs: first what users run, then the decomposition that attributes every gain.

What users run: the shipped ViT-B recipe exactly as `fastm2d pretrain --config configs/m2d_vit_base.yaml` runs it
(its micro-batch, its accumulation, precision / attention / kernels `auto`, eager), the same with torch.compile, and
under DeepSpeed ZeRO-2 in one process. The decomposition: eager fp32 (explicit-softmax attention, reference kernels)
-> +bf16 -> +fused attention (each backend) -> +torch.compile -> +Triton kernels -> +CUDA graphs (compile mode
reduce-overhead). Each rung reports samples/s, MFU (train/flops.py's one definition), peak memory and the first
step (compilation) apart.

One config builder (`rung_config`) serves the GPU run, its CPU dry run and the test that constructs every GPU
rung's exact config on CPU: the dry run changes the sizes (`DRY_RUN`), the device, the peak the MFU is taken
against (this CPU's measured one) and the compile backend of all compiled rungs but one (`eager` traces the same
graphs; DRY_RUN_INDUCTOR compiles with Inductor in the GPU rung's mode, custom ops included).
"""
from __future__ import annotations

import gc
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from fastm2d.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "m2d_vit_base.yaml"

BASE = ["model.attention=reference", "model.kernels=reference", "train.precision=fp32"]
BF16_SDPA = ["train.precision=bf16", "model.attention=sdpa"]
RECIPE_NAME = "ViT-B recipe (configs/m2d_vit_base.yaml)"
# (name, overrides, built on the shipped recipe?). What a user asks first: the recipe exactly as
# `fastm2d pretrain --config configs/m2d_vit_base.yaml` runs it (eager, precision / attention / kernels `auto`),
# the same compiled, the same under DeepSpeed.
RECIPE_RUNGS = [
    (RECIPE_NAME, [], True),
    ("ViT-B recipe + torch.compile", ["train.compile=true"], True),
    ("ViT-B recipe, DeepSpeed ZeRO-2, 1 process", ["train.engine=deepspeed"], True),
]
# Then the decomposition: each rung adds one speed feature, so every gain is attributed.
DECOMPOSITION_RUNGS = [
    ("eager fp32", [], False),
    ("+bf16", ["train.precision=bf16"], False),
    ("+fused attention (sdpa)", BF16_SDPA, False),
    ("+fused attention (xformers)", ["train.precision=bf16", "model.attention=xformers"], False),
    ("+compile", [*BF16_SDPA, "train.compile=true"], False),
    ("+Triton kernels", [*BF16_SDPA, "train.compile=true", "model.kernels=triton"], False),
    ("+CUDA graphs", [*BF16_SDPA, "train.compile=true", "model.kernels=triton", "train.compile_mode=reduce-overhead"],
     False),
]
RUNGS = RECIPE_RUNGS + DECOMPOSITION_RUNGS
# The one rung the CPU dry run compiles with Inductor itself, in the GPU rung's mode (reduce-overhead: CUDA graphs,
# which Inductor skips for CPU tensors) with the Triton kernels' custom ops in the graph; the other compiled rungs
# trace with the `eager` backend there (an Inductor compile costs ~40 s of the 2 CI cores even for the dry model).
DRY_RUN_INDUCTOR = "+CUDA graphs"
MODELS = {
    "vit_base": ["model.size=base"],
    "demo": ["model.size=tiny", "model.decoder_embed_dim=128", "model.decoder_depth=2", "model.decoder_num_heads=4"],
    # The dry run's: small enough that its one Inductor compile (DRY_RUN_INDUCTOR) takes ~40 s on 2 cores, where
    # the demo model at 80x608 took 73 s and its interpreted Triton steps 10 s each.
    "dry": ["model.size=tiny", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
            "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
            "model.input_size=[80,64]"],
}
GPU_RUN = {"model": "vit_base", "batch": 512}  # the ladder's rungs fill an 80 GB card; the recipe keeps its own
DRY_RUN = {"model": "dry", "batch": 4}


def rung_config(overrides: List[str], recipe: bool, model: str, batch: int, out_dir: str,
                dry_run: bool = False, device: Optional[str] = None, name: str = "",
                peak_tflops: Optional[float] = None) -> Config:
    """The exact config a rung trains with. The data set is synthetic and repeated to a full batch
    (`data.min_epoch_items`): the step reads random tensors, but the Trainer checks the list can fill a batch."""
    data = ["data.train=synthetic", "data.synthetic_clips=32", "data.synthetic_seconds=2.0", "data.num_workers=0",
            f"data.min_epoch_items={batch * 4}"]
    run = [f"out_dir={out_dir}", "train.max_steps=1000", "train.progress=false", "train.tensorboard=false",
           "train.eval_every=0"]
    sizes = ([] if model == "vit_base" else MODELS[model]) if recipe else MODELS[model]
    # The recipe keeps its micro-batch x accumulation (512 x 4) on the GPU; the dry run shrinks both sides alike.
    batch_override = [f"train.batch_size={batch}"] if (dry_run or not recipe) else []
    ladder_base = [] if recipe else [*BASE, "data.norm_stats=[-7.1,4.2]"]
    extra = ["train.compile_backend=eager"] if dry_run and name != DRY_RUN_INDUCTOR else []
    extra += [f"train.device={device}"] if device else []
    extra += [f"train.peak_tflops={peak_tflops}"] if peak_tflops else []  # the dry run's MFU: this CPU's measured peak
    return load_config(RECIPE if recipe else None,
                       [*run, *data, *sizes, *ladder_base, *overrides, *batch_override, *extra])


def _one_process_group_env() -> dict:
    """What a launcher would set for a single process (DeepSpeed needs a process group even for one)."""
    if "RANK" in os.environ:
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def _release() -> None:
    """Free what a rung held, so the next starts clean (also after an OOM or a compile error); the caller drops its
    own references to the trainer and the batches first, or the memory they hold outlives the cache flush."""
    from fastm2d.train.engine import release_process_groups
    release_process_groups()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _drive_rung(name: str, cfg: Config, body) -> dict:
    """`body(trainer, micro_batches)` -> this rung's row, on a Trainer built for `cfg` with in-memory micro-batches.
    Any failure (a backend missing here, an OOM, a compile or CUDA-graph error) is the rung's row, never the ladder's
    end; afterwards everything the rung held is released (the body's references are gone once it returns)."""
    from fastm2d.train import Trainer

    env = _one_process_group_env() if cfg.train.engine == "deepspeed" else {}
    os.environ.update(env)
    trainer = micro = None
    try:
        trainer = Trainer(cfg)
        t = cfg.train
        micro = [torch.randn(t.batch_size, 1, *cfg.model.input_size, device=trainer.device)
                 for _ in range(t.accum_steps)]
        return body(trainer, micro)
    except Exception as e:
        return {"rung": name, "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    finally:
        if trainer is not None:
            trainer.close()
        trainer = micro = None  # before the flush: the model, optimiser and batches must be garbage by then
        _release()
        for k in env:
            os.environ.pop(k, None)


def measure_rung(name: str, cfg: Config, steps: int = 5) -> dict:
    """Samples/s of `steps` optimiser steps after two (compilation, autotuning) that are timed apart."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def timed(trainer, micro) -> dict:
        t = cfg.train
        t0 = trainer.sync_time()
        trainer.train_step(micro)  # compilation / autotuning happen here
        first = trainer.sync_time() - t0
        trainer.train_step(micro)
        t0 = trainer.sync_time()
        for _ in range(steps):
            trainer.train_step(micro)
        sec = (trainer.sync_time() - t0) / steps
        samples = t.batch_size * t.accum_steps
        rate = samples / sec
        return {"rung": name, "batch": samples, "ms": sec * 1e3, "samples_s": rate, "first_step_s": first,
                "mfu": rate * trainer.flops_per_sample / trainer.peak_flops if trainer.peak_flops else None,
                "precision": str(trainer.amp_dtype or "fp32").replace("torch.", ""),
                "attention": next(m.backend for m in trainer.model.modules() if hasattr(m, "backend")),
                "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None}
    return _drive_rung(name, cfg, timed)


def profiled_steps(cfg: Config, out: Path, max_file_mb: float = 15.0, name: str = RECIPE_NAME) -> dict:
    """The rung's step under train.profile (warm-up steps first, then the profiled ones), driven like measure_rung;
    the profiler's trace, tables and memory snapshot are copied into `out` (a GPU slot brings back files of at most
    16 MiB: a larger one is left behind and said so)."""
    import shutil

    from fastm2d.phases import phase
    from fastm2d.train.profiling import phase_markdown

    def profiled(trainer, micro) -> dict:
        p = cfg.train.profile
        summary = None
        while summary is None and trainer.step < p.start + p.steps:
            trainer.profiler.before_step(trainer.step)
            with phase("data wait"):  # in memory here: the loaders have their own rows
                batches = list(micro)
            trainer.train_step(batches)
            summary = trainer.profiler.after_step(trainer.step)
        row = {"rung": name, "step_ms": summary["step_ms"], "mfu": summary.get("mfu"),
               "table": phase_markdown(summary), "files": [], "left_behind": []}
        for f in sorted(trainer.run.profile.glob("*-rank0.*")):
            if f.name.startswith("phases") and f.suffix == ".json":
                continue  # its content is the row's table
            mb = f.stat().st_size / 2**20
            if mb > max_file_mb:
                row["left_behind"].append(f"{f.name} ({mb:.0f} MiB)")
            else:
                shutil.copy(f, out / f.name)
                row["files"].append(f"{f.name} ({mb:.1f} MiB)")
        return row
    return _drive_rung(name, cfg, profiled)


def cuda_usable() -> bool:
    """False once a rung left the CUDA context broken (an illegal address is sticky): later rungs would only fail."""
    if not torch.cuda.is_available():
        return True
    try:
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def ladder(sizes: dict, rungs=RUNGS, steps: int = 5, dry_run: bool = False, stop: Callable[[], bool] = lambda: False,
           on_row: Callable[[dict], None] = lambda row: None) -> list:
    """Every rung in turn; `on_row` gets each row as it finishes (the device suite writes it out at once)."""
    rows: list = []
    base_rate = None
    for name, overrides, recipe in rungs:
        if stop():
            row = {"rung": name, "note": "skipped: time budget"}
        elif not cuda_usable():
            row = {"rung": name, "note": "skipped: an earlier rung left the CUDA context unusable"}
        else:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                row = measure_rung(name, rung_config(overrides, recipe, sizes["model"], sizes["batch"], tmp,
                                                     dry_run=dry_run, name=name), steps)
            row["wall_s"] = time.perf_counter() - t0
            if "samples_s" in row and not recipe:
                base_rate = base_rate or row["samples_s"]
                row["x_vs_eager"] = row["samples_s"] / base_rate
        rows.append(row)
        on_row(row)
    return rows
