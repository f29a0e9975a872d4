"""ONE command for a GPU machine: the numbers a user asks first, then the rest, each in its own process with a hard
deadline -> markdown + JSON, and a one-line summary to paste.

    python benchmarks/device_suite.py --out "$OUT"          # on the GPU machine (about 6 minutes, below)
    python benchmarks/device_suite.py --out /tmp/ds --tiny   # the CPU dry run (CI): the same sections, rungs,
                                                             # processes and config arithmetic at small sizes

Sections, in the order a researcher with one hour on a rented H100 asks for them, each with its share of
--budget-s (time a section leaves unused passes to the next; within a section each item gets its weight's part of
what is left, so a hung compile costs its own row and never the rows after it):

  recipe    the shipped ViT-B recipe exactly as `fastm2d pretrain --config configs/m2d_vit_base.yaml` runs it
            (512 x 4, precision / attention / kernels `auto`, eager), the same compiled, the same under DeepSpeed
  trace     a torch.profiler trace of the recipe's step (gzipped Chrome JSON) and its phase / operator table
  kernels   the copy bandwidth, then each kernel x provider (Triton / eager reference / torch.compile of it) x mode
  ladder    the decomposition: eager fp32 -> bf16 -> SDPA / xformers -> compile -> Triton kernels -> CUDA graphs
  gpu_tests pytest -m gpu (the whole log in gpu_tests.log)
  data      prepare, the reference and shard loaders on this machine's cores, DALI where installed, embed

Every training rung, kernel, the trace and the data rows run in a child process (`--child SECTION:ITEM`) killed at
its deadline (with its process group: an OOM, a CUDA error or a hung compile ends there). Rows are written to $OUT
as they finish (device_suite.json / .md). Exit status: 1 when no training row produced an MFU (a green run without
numbers is a failed run) or the GPU tests failed, else 0. The last line printed is `SUMMARY: card | recipe ...`.

How long, on one H100 / H200 (estimates until a GPU has run it): recipe ~25 s eager, ~90 s compiled (Inductor on
ViT-B forward + backward), ~30 s DeepSpeed; trace ~25 s; kernels ~60 s; the ladder ~150 s; GPU tests ~60 s; data
~30 s; --budget-s (default 360) caps the whole at 6 minutes plus the last child's kill.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KERNELS = ("l2norm_mse", "noise_mix", "gather_visible", "ema")  # kernel_cases.CASES, named without importing torch


def _rung_items(rungs) -> list:
    return [(name, 3.0 if any("compile=true" in o for o in overrides) else 1.0) for name, overrides, _ in rungs]


def sections() -> list:
    """(section, share of the budget, [(item, weight)]) in the order the suite runs them."""
    from ladder import DECOMPOSITION_RUNGS, RECIPE_RUNGS
    return [("recipe", 0.33, _rung_items(RECIPE_RUNGS)),
            ("trace", 0.07, [("recipe step, profiled", 1.0)]),
            ("kernels", 0.16, [("copy bandwidth", 0.2), *((k, 1.0) for k in KERNELS)]),
            ("ladder", 0.25, _rung_items(DECOMPOSITION_RUNGS)),
            ("gpu_tests", 0.12, [("pytest -m gpu", 1.0)]),
            ("data", 0.07, [("data paths", 1.0)])]


# ------------------------------------------------------------------------------------ the parent's side -----
def run_child(cmd: List[str], seconds: float, row_file: Path, env: Optional[dict] = None) -> dict:
    """Run `cmd` in its own process group; past `seconds` the whole group is killed and that is the row. The child
    writes its row (a dict, or a list of rows) to `row_file`."""
    row_file.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)
    try:
        out, _ = proc.communicate(timeout=max(1.0, seconds))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the compile workers and loader workers it started too
        out, _ = proc.communicate()
        return {"note": f"killed: over its {seconds:.0f} s deadline", "wall_s": round(time.monotonic() - t0, 1),
                "pid": proc.pid, "log_tail": (out or "")[-600:]}
    wall = round(time.monotonic() - t0, 1)
    if row_file.exists():
        row = json.loads(row_file.read_text())
        for r in row if isinstance(row, list) else [row]:
            r.setdefault("wall_s", wall)
            r["pid"] = proc.pid
        return row
    tail = (out or "").strip().splitlines()[-1:] or ["(no output)"]
    return {"note": f"failed: the process exited {proc.returncode}: {tail[0][:200]}", "wall_s": wall, "pid": proc.pid,
            "log_tail": (out or "")[-1500:]}


def cpu_peak_tflops() -> float:
    """The dry run's stand-in for a card's data-sheet peak: this CPU's fp32 matrix-product rate, so the dry run
    computes an MFU by the GPU run's arithmetic (and the exit rule has something to check)."""
    import torch
    a = torch.randn(512, 512)
    torch.mm(a, a)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mm(a, a)
    return round(10 * 2 * 512 ** 3 / (time.perf_counter() - t0) / 1e12, 4)


def header(tiny: bool) -> dict:
    import torch
    import triton
    if torch.cuda.is_available():
        card = torch.cuda.get_device_name(0)
    else:
        card = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"card": card, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": tiny,
            **({"peak_tflops": cpu_peak_tflops()} if tiny else {})}


def summary(result: dict) -> str:
    """One line a reader can paste: card, the recipe's samples/s and MFU, the compiled and DeepSpeed recipe, the rest."""
    from fastm2d.train.flops import MFU_MILESTONE, MFU_TARGET

    def rate(row: Optional[dict]) -> str:
        if not row or "samples_s" not in row:
            return (row or {}).get("note", "not run")[:60]
        mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ", no MFU"
        return f"{row['samples_s']:.1f} samples/s{mfu}"

    rows = {r.get("rung"): r for r in result["recipe"]}
    names = [n for n, _ in sections()[0][2]]
    kernels_ok = sum(1 for r in result["kernels"] if "ms" in r)
    return (f"SUMMARY: {result['header']['card']}{' (dry run)' if result['header']['dry_run'] else ''} | "
            f"recipe {rate(rows.get(names[0]))} | compiled {rate(rows.get(names[1]))} | "
            f"DeepSpeed {rate(rows.get(names[2]))} | target {MFU_TARGET:.0%} MFU, milestone {MFU_MILESTONE:.0%} | "
            f"kernel rows {kernels_ok} | GPU tests: {result['gpu_tests'].get('summary', 'not run')}")


def exit_status(result: dict) -> int:
    """1 when no training row produced an MFU, or the GPU tests failed; else 0."""
    train = [*result["recipe"], *result["ladder"]]
    if not any(r.get("mfu") for r in train):
        return 1
    return 1 if result["gpu_tests"].get("rc") not in (None, 0) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/latest"))
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (the dry run)")
    ap.add_argument("--budget-s", type=float, default=360, help="the whole suite's time; each section has a share")
    ap.add_argument("--only", help="comma-separated sections to run (default: all, in order)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # SECTION:ITEM, run by the suite itself
    ap.add_argument("--row-file", help=argparse.SUPPRESS)
    ap.add_argument("--peak-tflops", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.tiny:
        os.environ.pop("TRITON_INTERPRET", None)
    else:  # the dry run's Triton rungs: kernels interpreted on CPU, as in the tests
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.child:
        from suite_children import run_item
        row = run_item(args.child, args.tiny, Path(args.out), args.peak_tflops)
        Path(args.row_file).write_text(json.dumps(row))
        return 0
    import torch
    if not torch.cuda.is_available() and not args.tiny:
        print("device_suite: no CUDA device here; the GPU run needs one (use --tiny for the CPU dry run)",
              file=sys.stderr)
        return 2
    from suite_report import markdown
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"header": header(args.tiny), "plan": [], "copy_GB_s": float("nan"), "gpu_tests": {"summary": "not run"},
              **{name: [] for name, _, _ in sections() if name != "gpu_tests"}}

    def save() -> None:  # after every row: a kill, or a lease that ends, keeps what was measured
        (out / "device_suite.json").write_text(json.dumps(result, indent=1))
        (out / "device_suite.md").write_text(markdown(result))

    only = set(args.only.split(",")) if args.only else None
    plan = [s for s in sections() if only is None or s[0] in only]
    start = time.monotonic()
    spent_share = 0.0
    for section, share, items in plan:
        spent_share += share / sum(s for _, s, _ in plan)
        section_end = start + args.budget_s * spent_share  # what a section leaves passes on
        result["plan"].append({"section": section, "share": share, "budget_s": round(args.budget_s * share),
                               "items": [name for name, _ in items]})
        for i, (name, weight) in enumerate(items):
            left = section_end - time.monotonic()
            seconds = left * weight / sum(w for _, w in items[i:])
            if seconds < 1.0:
                row = {"note": "skipped: time budget"}
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{section}:{name}",
                       "--out", str(out), "--row-file", str(out / "row.json")]
                cmd += ["--tiny", "--peak-tflops", str(result["header"]["peak_tflops"])] if args.tiny else []
                row = run_child(cmd, seconds, out / "row.json")
            file_rows(result, section, name, row)
            save()
    (out / "row.json").unlink(missing_ok=True)
    save()
    print(markdown(result))
    print(summary(result))
    return exit_status(result)


def file_rows(result: dict, section: str, item: str, row) -> None:
    """Put a child's row(s) where its section keeps them; a failed or skipped child is a row that says so."""
    rows = row if isinstance(row, list) else [row]
    if section in ("recipe", "ladder"):
        for r in rows:
            r.setdefault("rung", item)
        result[section] += rows
    elif section == "kernels" and item == "copy bandwidth":
        result["copy_GB_s"] = rows[0].get("GB_s", float("nan"))
        result["kernels_note"] = rows[0].get("note")
    elif section == "kernels":
        for r in rows:
            r.setdefault("kernel", item)
            r.setdefault("provider", "-")
            r.setdefault("mode", "-")
            if "note" in r and "error" not in r:
                r["error"] = r.pop("note")
            if "GB_s" in r and result["copy_GB_s"] == result["copy_GB_s"]:  # not NaN
                r["pct_copy_bw"] = 100 * r["GB_s"] / result["copy_GB_s"]
        result["kernels"] += rows
    elif section == "gpu_tests":
        result["gpu_tests"] = rows[0] if "summary" in rows[0] else {"summary": rows[0].get("note"), "rc": None}
    elif section == "trace":
        result["trace"] += rows
    else:
        for r in rows:
            r.setdefault("path", item)
            r.setdefault("workers", "-")
            r.setdefault("unit", "")
        result[section] += rows


if __name__ == "__main__":
    sys.exit(main())
