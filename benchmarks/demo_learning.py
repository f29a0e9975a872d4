"""Does pre-training help? The demo (with optional overrides) against the same architecture untrained.

    python benchmarks/demo_learning.py --out /tmp/demo_learning                       # the shipped demo
    python benchmarks/demo_learning.py --out /tmp/lr train.base_lr=3e-3 --name lr3e-3  # one changed setting

Pre-trains `configs/demo.yaml` (+ overrides) into OUT/NAME, probes it with `fastm2d linear-eval` on the synthetic
tasks (`--clips` clips, `--seeds` probe seeds), probes `--init-seeds` untrained initialisations of the same
architecture (once per OUT), and appends one markdown row per run to OUT/table.md: wall time of the pre-training,
final loss, accuracy of each task with its 95 % CI, and the margin over the BEST untrained initialisation.
Wall times mean something only when nothing else shares the machine.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from fastm2d.cli import main as fastm2d
from fastm2d.train import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def probe(weights: Path, out: Path, clips: int, seeds: int, init_seed: Optional[int] = None) -> dict:
    """-> {task: (mean %, ci %)} from `fastm2d linear-eval`; `init_seed`: probe that untrained initialisation."""
    untrained = ["--untrained", "--untrained-seed", str(init_seed)] if init_seed is not None else []
    assert fastm2d(["linear-eval", f"synthetic:{clips}", "--weights", str(weights), "--seeds", str(seeds), "--out", str(out),
                    "--quiet", *untrained]) == 0
    suffix = f"-untrained-seed{init_seed}" if init_seed is not None else ""
    scores = {}
    for task in ("synthetic-event", "synthetic-pitch"):
        r = json.loads((out / f"{task}{suffix}.json").read_text())
        scores[task] = (100 * r["mean"], 100 * r["ci95"])
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="demo")
    ap.add_argument("--clips", type=int, default=1500)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--init-seeds", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="key=value for the demo config")
    args = ap.parse_args()
    run = args.out / args.name
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    assert fastm2d(["pretrain", "--config", str(ROOT / "configs/demo.yaml"), f"out_dir={run}", "train.progress=false",
                    "train.tensorboard=false", *args.overrides]) == 0
    wall = time.perf_counter() - t0
    loss = read_metrics(run)[-1]["loss"]  # training rows only
    trained = probe(run, args.out / f"eval_{args.name}", args.clips, args.seeds)

    baseline_file = args.out / "untrained.json"
    if not baseline_file.is_file():  # the same architecture, several fresh initialisations
        base = [probe(run, args.out / "eval_untrained", args.clips, args.seeds, init_seed=s)
                for s in range(args.init_seeds)]
        baseline_file.write_text(json.dumps(base))
    base = json.loads(baseline_file.read_text())

    table = args.out / "table.md"
    if not table.is_file():
        spread = {t: (min(b[t][0] for b in base), max(b[t][0] for b in base)) for t in trained}
        table.write_text(
            f"untrained, {len(base)} init seeds: event {spread['synthetic-event'][0]:.1f}-"
            f"{spread['synthetic-event'][1]:.1f} %, band {spread['synthetic-pitch'][0]:.1f}-"
            f"{spread['synthetic-pitch'][1]:.1f} % (synthetic:{args.clips}, {args.seeds} probe seeds)\n\n"
            "| run | overrides | wall | final loss | event % | band % | event margin over best untrained |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n")
    best = max(b["synthetic-event"][0] for b in base)
    (ev, ev_ci), (band, band_ci) = trained["synthetic-event"], trained["synthetic-pitch"]
    row = (f"| {args.name} | {' '.join(args.overrides) or '(shipped)'} | {wall:.0f} s | {loss:.3f} | "
           f"{ev:.1f} +- {ev_ci:.1f} | {band:.1f} +- {band_ci:.1f} | {ev - best:+.1f} |\n")
    with open(table, "a") as f:
        f.write(row)
    sys.stdout.write(table.read_text())


if __name__ == "__main__":
    main()
