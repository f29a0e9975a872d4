"""Profiling built in: `train.profile.steps=N` records torch.profiler over N optimiser steps from step
`train.profile.start` (default 5: after warm-up and compilation), one trace per rank, and says where the step's time
goes.

What a profiled run leaves in RUN/profile/ (every rank its own `-rank{r}` files):
  trace-rank0.json.gz    Chrome / Perfetto JSON, gzipped (ui.perfetto.dev, chrome://tracing, TensorBoard's profiler
                         plugin); the step's phases are named ranges `fastm2d/<phase>` (fastm2d/phases.py), also as
                         NVTX ranges on CUDA for nsys / ncu
  top_ops-rank0.txt      the operators by self time (printed by rank 0)
  phases-rank0.json/.md  time per phase and per operator class, with the model FLOPs: the MFU gap attributed
  memory-rank0.pickle    CUDA: a memory snapshot of the profiled steps (pytorch.org/memory_viz), peaks per phase
An out-of-memory error on CUDA writes RUN/profile/oom-memory-rank{r}.pickle before the one-line error.

The phase table: each phase's host (CPU) time per step, and on CUDA its device time (the ranges as the GPU ran
them); the ranges never overlap, so phases + "between phases" = the step exactly; "between phases" (Python between
the ranges) is stated beside them. Operator classes: device kernels on CUDA, operators' self time on CPU.
"""
from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .. import phases
from ..atomic import write_atomic
from ..config import ProfileConfig
from ..errors import OutOfDeviceMemory

log = logging.getLogger("fastm2d.train")

# Operator classes, by the first pattern an operator's or kernel's name matches (case-insensitive).
CLASSES: List[Tuple[str, str]] = [
    ("fastm2d kernels", r"fastm2d::|_move_rows|_loss_rows|_mix_|noise_mix|l2norm|gather_rows|scatter_rows"),
    ("attention", r"scaled_dot_product|flash|efficient_attention|fmha|memory_efficient|attention"),
    ("matrix products", r"\bmm\b|addmm|bmm|matmul|linear|gemm|cutlass|xmma|cublas|nvjet|sm90_|sm80_|conv"),
    ("communication", r"nccl|gloo|all_?reduce|all_?gather|reduce_?scatter|broadcast|c10d"),
    ("optimizer", r"adam|foreach|lerp"),
    ("copies", r"copy|memcpy|memset|_to_copy|contiguous|clone|cat\b|index|gather|scatter"),
]
GLUE = "elementwise glue"  # layer norms, GELU, residual adds, bias, reductions: whatever matches nothing above


def classify(name: str) -> str:
    for label, pattern in CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return GLUE


class StepProfiler:
    """Opens torch.profiler at step `start`, closes it after `steps` steps and writes the files above. With profiling
    off every call returns at once (the phase ranges stay the shared null context)."""

    def __init__(self, cfg: ProfileConfig, folder: Path, rank: int, device: torch.device, flops_per_step: float,
                 peak_flops: Optional[float]):
        self.cfg, self.folder, self.rank, self.device = cfg, Path(folder), rank, device
        self.window = (cfg.start, cfg.steps) if cfg.steps > 0 else None
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.prof = None
        self._step_range = None
        self.summary: Optional[dict] = None
        self.cuda = device.type == "cuda"

    def file(self, kind: str, suffix: str) -> Path:
        return self.folder / f"{kind}-rank{self.rank}{suffix}"

    def before_step(self, step: int) -> None:
        if self.window is None:
            return
        start, count = self.window
        if self.prof is None and start <= step < start + count:
            self._open()
        if self.prof is not None:
            self._sync()  # each profiled step's range holds its own device work
            self._step_range = phases.phase(phases.STEP)
            self._step_range.__enter__()

    def after_step(self, step_done: int) -> Optional[dict]:
        """Called with the number of steps done; returns the summary when the window has just closed."""
        if self.prof is None:
            return None
        self._sync()
        self._step_range.__exit__(None, None, None)
        self._step_range = None
        self.prof.step()
        if step_done >= sum(self.window):
            return self.close()
        return None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _open(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.cfg.memory:  # every allocation's stack from here on, for the snapshot
                torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=self.cfg.shapes,
                                           with_stack=self.cfg.stacks)
        self.prof.__enter__()
        phases.start_recording(self.cuda)

    def close(self) -> Optional[dict]:
        """End the window (also when the run ends inside it) and write its files; rank 0 prints the tables."""
        if self.prof is None:
            return None
        if self._step_range is not None:  # ended by an error inside a step
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        phases.stop_recording()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.file("trace", ".json.gz")
        prof.export_chrome_trace(str(trace))
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        top = prof.key_averages().table(sort_by=key, row_limit=self.cfg.top)
        write_atomic(self.file("top_ops", ".txt"), top + "\n")
        if self.cuda and self.cfg.memory:
            torch.cuda.memory._dump_snapshot(str(self.file("memory", ".pickle")))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.summary = phase_table(read_trace(trace), self.flops_per_step, self.peak_flops,
                                   memory=dict(phases.peaks))
        write_atomic(self.file("phases", ".json"), json.dumps(self.summary, indent=1))
        write_atomic(self.file("phases", ".md"), "\n".join(phase_markdown(self.summary)) + "\n")
        if self.rank == 0:
            print(f"profile of steps {self.window[0]}..{sum(self.window) - 1}: {trace}\n{top}\n"
                  + "\n".join(phase_markdown(self.summary)), flush=True)
        return self.summary

    def out_of_memory(self, error: BaseException, step: int) -> OutOfDeviceMemory:
        """The one-line error for a CUDA out-of-memory, after writing what the allocator held (with the allocation
        history when a profiled window with memory recording was open) for pytorch.org/memory_viz."""
        import pickle
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.file("oom-memory", ".pickle")
        where = ""
        try:
            write_atomic(path, pickle.dumps(torch.cuda.memory._snapshot()))
            where = f"; what the allocator held is in {path} (open it at pytorch.org/memory_viz)"
        except Exception as e:  # the error line matters more than the snapshot
            where = f"; no memory snapshot ({type(e).__name__}: {e})"
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else "out of memory"
        return OutOfDeviceMemory(f"out of device memory in step {step} ({first}){where}; lower train.batch_size and "
                                 f"raise train.accum_steps to keep the effective batch, then --resume")


# ------------------------------------------------------------------------------------ reading a trace -----
def read_trace(path: Path) -> List[dict]:
    """The complete ('X') events of a Chrome trace, gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]


def _inside(e: dict, window: Tuple[float, float]) -> bool:
    return window[0] <= e["ts"] and e["ts"] + e["dur"] <= window[1] + 1e-3


def _self_times(ops: List[dict]) -> List[Tuple[dict, float]]:
    """Each operator with its self time: its duration less its direct children's, per thread."""
    result = []
    by_thread: Dict[Tuple, List[dict]] = {}
    for e in ops:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: List[list] = []  # [event, time of its children]
        for e in events:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                done = stack.pop()
                result.append((done[0], max(0.0, done[0]["dur"] - done[1])))
            if stack:
                stack[-1][1] += e["dur"]
            stack.append([e, 0.0])
        result += [(e, max(0.0, e["dur"] - child)) for e, child in stack]
    return result


def phase_table(events: List[dict], flops_per_step: float, peak_flops: Optional[float],
                memory: Optional[dict] = None) -> dict:
    """Per profiled step (means over the steps): time per phase, per operator class, the FLOPs and what they imply."""
    prefix = phases.PREFIX
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"] == prefix + phases.STEP),
                   key=lambda e: e["ts"])
    if not steps:
        raise ValueError("the trace holds no fastm2d/step range (not a fastm2d training profile?)")
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in steps]
    n = len(steps)
    step_us = sum(e["dur"] for e in steps) / n
    device = "cuda" if any(e.get("cat") == "kernel" for e in events) else "cpu"
    per_phase: Dict[str, Dict[str, float]] = {}
    for e in events:
        name = e["name"]
        if not name.startswith(prefix) or name == prefix + phases.STEP:
            continue
        column = {"user_annotation": "host_ms", "gpu_user_annotation": "device_ms"}.get(e.get("cat"))
        if column and any(_inside(e, w) or column == "device_ms" for w in windows):
            row = per_phase.setdefault(name[len(prefix):], {"host_ms": 0.0})
            row[column] = row.get(column, 0.0) + e["dur"] / 1e3 / n
    phase_rows = [{"phase": p, **{k: round(v, 3) for k, v in per_phase[p].items()},
                   "share": per_phase[p]["host_ms"] * 1e3 / step_us, **(memory or {}).get(p, {})}
                  for p in phases.PHASES if p in per_phase]
    between_ms = step_us / 1e3 - sum(r["host_ms"] for r in phase_rows)
    # Operator classes: device kernels on CUDA; on CPU, the operators' self time.
    if device == "cuda":
        timed = [(e, float(e["dur"])) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                 and any(_inside(e, w) for w in windows)]
    else:
        timed = _self_times([e for e in events if e.get("cat") == "cpu_op" and any(_inside(e, w) for w in windows)])
    classes: Dict[str, float] = {}
    for e, us in timed:
        label = classify(e["name"])
        classes[label] = classes.get(label, 0.0) + us / 1e3 / n
    busy_ms = sum(classes.values())
    class_rows = [{"class": c, "ms": round(ms, 3), "share": ms * 1e3 / step_us}
                  for c, ms in sorted(classes.items(), key=lambda kv: -kv[1])]
    class_rows.append({"class": "idle / outside operators", "ms": round(max(0.0, step_us / 1e3 - busy_ms), 3),
                       "share": max(0.0, 1 - busy_ms * 1e3 / step_us)})
    step_s = step_us / 1e6
    matmul_s = classes.get("matrix products", 0.0) / 1e3
    summary = {"device": device, "steps": n, "step_ms": round(step_us / 1e3, 3), "phases": phase_rows,
               "between_phases_ms": round(between_ms, 3), "classes": class_rows, "flops_per_step": flops_per_step,
               "achieved_tflops": flops_per_step / step_s / 1e12,
               "matmul_tflops": flops_per_step / matmul_s / 1e12 if matmul_s else None}
    if peak_flops:
        summary["peak_tflops"] = peak_flops / 1e12
        summary["mfu"] = flops_per_step / step_s / peak_flops
        summary["mfu_if_only_matmuls"] = flops_per_step / matmul_s / peak_flops if matmul_s else None
    return summary


def phase_markdown(s: dict) -> List[str]:
    """The phase and operator-class tables, and the MFU gap in one sentence."""
    device_col = any("device_ms" in r for r in s["phases"])
    mem_col = any("allocated_GiB" in r for r in s["phases"])
    lines = [f"{s['steps']} profiled step(s) on {s['device']}, {s['step_ms']:.1f} ms per step", "",
             "| phase | host ms | " + ("device ms | " if device_col else "") + "% of step |"
             + (" peak allocated GiB | peak reserved GiB |" if mem_col else ""),
             "|---|---|" + ("---|" if device_col else "") + "---|" + ("---|---|" if mem_col else "")]
    for r in s["phases"]:
        lines.append(f"| {r['phase']} | {r['host_ms']:.2f} | " + (f"{r.get('device_ms', 0):.2f} | " if device_col else "")
                     + f"{r['share']:.1%} |" + (f" {r.get('allocated_GiB', 0):.2f} | {r.get('reserved_GiB', 0):.2f} |"
                                                if mem_col else ""))
    lines.append(f"| between phases (Python) | {s['between_phases_ms']:.2f} | " + ("| " if device_col else "")
                 + f"{s['between_phases_ms'] / s['step_ms']:.1%} |" + (" | |" if mem_col else ""))
    lines += ["", "| operator class | ms per step | % of step |", "|---|---|---|"]
    lines += [f"| {r['class']} | {r['ms']:.2f} | {r['share']:.1%} |" for r in s["classes"]]
    gap = f"{s['achieved_tflops']:.3g} TFLOP/s achieved"
    if s.get("matmul_tflops"):
        gap += f"; the matrix products alone run at {s['matmul_tflops']:.3g} TFLOP/s"
    if s.get("mfu") is not None:
        gap += f"; MFU {s['mfu']:.1%} of {s['peak_tflops']:.4g} TFLOP/s"
        if s.get("mfu_if_only_matmuls"):
            gap += f", {s['mfu_if_only_matmuls']:.1%} if the step were its matrix products alone"
    return lines + ["", f"Model FLOPs {s['flops_per_step'] / 1e9:.3g} GFLOP per step: {gap}."]


def plot_profile(s: dict, path: Path) -> None:
    """Two stacked bars, the step by phase and by operator class: where people would rather look than read."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 2.8))
    bars = [("phases", [(r["phase"], r["host_ms"]) for r in s["phases"]]
             + [("between phases", max(0.0, s["between_phases_ms"]))]),
            ("operator classes", [(r["class"], r["ms"]) for r in s["classes"]])]
    cmap = plt.get_cmap("tab20")
    for y, (label, parts) in enumerate(bars):
        left = 0.0
        for i, (name, ms) in enumerate(parts):
            ax.barh(y, ms, left=left, color=cmap(i % 20), edgecolor="white")
            if ms > 0.06 * s["step_ms"]:
                ax.text(left + ms / 2, y, name, ha="center", va="center", fontsize=7)
            left += ms
    ax.set_yticks([0, 1], [b[0] for b in bars])
    ax.set_xlabel(f"ms per step ({s['device']}, {s['steps']} steps profiled)")
    ax.set_title("where the training step's time goes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
