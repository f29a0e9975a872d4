"""`fastm2d report RUN`: PNG figures of a run's metrics.jsonl (loss terms, lr and tau, samples/s and MFU,
monitor curves) and a one-page markdown summary that embeds them, for comparing pre-training runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from ..data.sources import DataError
from ..atomic import write_atomic
from ..run_folder import RunFolder
from .metrics import read_metrics
from .profiling import phase_markdown, plot_profile


def _plot(path: Path, rows: List[Dict], series: List[str], title: str, right: List[str] = ()) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [s for s in series if any(s in r for r in rows)]
    right = [s for s in right if any(s in r for r in rows)]
    if not series and not right:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for s in series:
        pts = [(r["step"], r[s]) for r in rows if s in r]
        ax.plot(*zip(*pts), label=s, marker="o" if len(pts) < 30 else None, markersize=3)
    ax.set_xlabel("optimiser step")
    if right:
        ax2 = ax.twinx()
        for s in right:
            pts = [(r["step"], r[s]) for r in rows if s in r]
            ax2.plot(*zip(*pts), label=s, linestyle="--", color="tab:red")
        ax2.set_ylabel(", ".join(right))
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    ax.legend(loc="upper left" if right else "best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _profile_section(folder: Path, out: Path) -> List[str]:
    """Where a profiled window's step time went (train.profile.steps): rank 0's tables and their picture."""
    path = folder / "phases-rank0.json"
    if not path.is_file():
        return []
    try:
        summary = json.loads(path.read_text())
        table = phase_markdown(summary)
        plot_profile(summary, out / "profile.png")
    except (ValueError, KeyError, TypeError) as e:  # a damaged table is a line in the report, not its end
        return ["", "## Where the step's time goes", "", f"{path}: unreadable ({type(e).__name__}: {e})"]
    return ["", "## Where the step's time goes", "", *table, "", "![profile](profile.png)", "",
            f"The trace (Perfetto / chrome://tracing / TensorBoard): {folder / 'trace-rank0.json.gz'}"]


def write_report(run: str | Path) -> Path:
    run = Path(run)
    folder = RunFolder(run)
    if not folder.metrics.is_file():
        raise DataError(f"{run}: no metrics.jsonl (not a fastm2d run folder?)")
    rows, mons = read_metrics(run), read_metrics(run, monitors=True)
    if not rows:
        raise DataError(f"{run}/metrics.jsonl: no training rows yet")
    out = folder.report
    out.mkdir(exist_ok=True)
    figures = []
    if _plot(out / "loss.png", rows, ["loss", "loss_m2d", "loss_off"], "loss terms"):
        figures.append(("Loss", "loss.png"))
    if _plot(out / "schedule.png", rows, ["lr"], "learning rate and EMA tau", right=["tau"]):
        figures.append(("Schedules", "schedule.png"))
    if _plot(out / "speed.png", rows, ["samples_per_s"], "throughput", right=["mfu"]):
        figures.append(("Speed", "speed.png"))
    probes = sorted({k for r in mons for k in r if k.startswith("probe_")})
    if mons and _plot(out / "monitors.png", mons, ["rank_me"], "monitors", right=probes + ["valid_loss"]):
        figures.append(("Monitors", "monitors.png"))

    last = rows[-1]
    lines = [f"# Run report: {run.name}", "",
             f"{last['step']} optimiser steps, epoch {last.get('epoch', 0):.2f}; final loss {last['loss']:.4f}"
             + (f" (m2d {last['loss_m2d']:.4f}" if "loss_m2d" in last else "")
             + (f", offline {last['loss_off']:.4f})" if "loss_off" in last else (")" if "loss_m2d" in last else "")),
             ""]
    speeds = sorted(r["samples_per_s"] for r in rows if "samples_per_s" in r)
    if speeds:
        lines.append(f"Median throughput {speeds[len(speeds) // 2]:.1f} samples/s"
                     + (f", MFU {last['mfu']:.1%} of {last['peak_tflops']:.0f} TFLOP/s" if "mfu" in last else "") + ".")
    if mons:
        m = mons[-1]
        cost = sum(r.get("monitor_seconds", 0) for r in mons)
        lines += ["", "| monitor | first | last |", "| --- | --- | --- |"]
        for k in ["rank_me", "components_90", "valid_loss", *probes]:
            if k in m:
                lines.append(f"| {k} | {mons[0].get(k, float('nan')):.4g} | {m[k]:.4g} |")
        lines.append(f"\nMonitors took {cost:.1f} s in all ({len(mons)} calls).")
    results = sorted(folder.eval.glob("*.json")) if folder.eval.is_dir() else []
    if results:
        lines += ["", "| linear evaluation | metric | % (95 % CI) | seeds |", "| --- | --- | --- | --- |"]
        for p in results:
            r = json.loads(p.read_text())
            lines.append(f"| {p.stem} | {r['metric']} | {100 * r['mean']:.2f} +- {100 * r['ci95']:.2f} | {r['seeds']} |")
    for title, name in figures:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    lines += _profile_section(folder.profile, out)
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
