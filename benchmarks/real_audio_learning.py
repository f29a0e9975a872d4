"""Does pre-training on real short clips help? Pre-trained against the same architecture untrained, on real probes.

    python benchmarks/real_audio_tasks.py build /tmp/real                                   # once
    python benchmarks/real_audio_learning.py --data /tmp/real --out /tmp/rl                 # configs/demo.yaml
    python benchmarks/real_audio_learning.py --data /tmp/real --out /tmp/rl --name lr train.base_lr=6e-3

Pre-trains the config (+ overrides) on DATA/pretrain.csv (labels dropped) once per `--train-seeds` seed, probes
every DATA/<task>-fold<K>.csv with `fastm2d linear-eval` (`--seeds` probe seeds; a task's score is the mean over
its 5 folds, the embeddings computed once), probes `--init-seeds` untrained
initialisations of the same architecture (once per OUT), and appends one markdown row per pre-training seed to
OUT/table.md: each task's accuracy, the mean over tasks, and the margin over the mean and over the BEST untrained
initialisation (the noise floor). Wall times mean something only when nothing else shares the machine.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from fastm2d.cli import main as fastm2d
from fastm2d.train import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("lmms-family", "collection", "music-theme")


FOLDS = 5


def probe(weights: Path, data: Path, out: Path, seeds: int, init_seed: Optional[int] = None) -> dict:
    """-> {task: accuracy %, mean over folds} from `fastm2d linear-eval`; `init_seed`: that untrained init."""
    untrained = ["--untrained", "--untrained-seed", str(init_seed)] if init_seed is not None else []
    suffix = f"-untrained-seed{init_seed}" if init_seed is not None else ""
    scores = {}
    for task in TASKS:
        folds = []
        for k in range(FOLDS):
            name = f"{task}-fold{k}"
            assert fastm2d(["linear-eval", str(data / f"{name}.csv"), "--weights", str(weights), "--seeds", str(seeds), "--out",
                            str(out), "--quiet", *untrained]) == 0
            folds.append(100 * json.loads((out / f"{name}{suffix}.json").read_text())["mean"])
        scores[task] = float(np.mean(folds))
    scores["mean"] = float(np.mean([scores[t] for t in TASKS]))
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the folder real_audio_tasks.py built")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="demo")
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--train-seeds", default="42", help="comma-separated pre-training seeds")
    ap.add_argument("--seeds", type=int, default=3, help="probe seeds")
    ap.add_argument("--init-seeds", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="key=value for the config")
    args = ap.parse_args()
    runs: List[tuple] = []
    for seed in [int(s) for s in args.train_seeds.split(",")]:
        run = args.out / f"{args.name}-seed{seed}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        assert fastm2d(["pretrain", "--config", args.config, f"out_dir={run}", f"data.train={args.data / 'pretrain.csv'}",
                        f"train.seed={seed}", "train.progress=false", "train.tensorboard=false", *args.overrides]) == 0
        wall = time.perf_counter() - t0
        loss = read_metrics(run)[-1]["loss"]
        runs.append((seed, wall, loss, probe(run, args.data, args.out / f"eval_{args.name}-seed{seed}", args.seeds)))

    baseline_file = args.out / "untrained.json"
    if not baseline_file.is_file():  # the same architecture, several fresh initialisations
        base = [probe(args.out / f"{args.name}-seed{runs[0][0]}", args.data, args.out / "eval_untrained", args.seeds,
                      init_seed=s) for s in range(args.init_seeds)]
        baseline_file.write_text(json.dumps(base))
    base = json.loads(baseline_file.read_text())

    table = args.out / "table.md"
    if not table.is_file():
        spread = ", ".join(f"{t} {min(b[t] for b in base):.1f}-{max(b[t] for b in base):.1f}"
                           for t in (*TASKS, "mean"))
        table.write_text(f"untrained, {len(base)} init seeds: {spread} % ({args.seeds} probe seeds)\n\n"
                         f"| run | seed | overrides | wall | final loss | {' | '.join(TASKS)} | mean | "
                         f"margin over mean / best untrained |\n"
                         f"| --- | --- | --- | --- | --- | {' | '.join('---' for _ in TASKS)} | --- | --- |\n")
    base_mean = float(np.mean([b["mean"] for b in base]))
    base_best = max(b["mean"] for b in base)
    with open(table, "a") as f:
        for seed, wall, loss, s in runs:
            f.write(f"| {args.name} | {seed} | {' '.join(args.overrides) or '(config)'} | {wall:.0f} s | {loss:.3f} | "
                    + " | ".join(f"{s[t]:.1f}" for t in TASKS)
                    + f" | {s['mean']:.1f} | {s['mean'] - base_mean:+.1f} / {s['mean'] - base_best:+.1f} |\n")
    sys.stdout.write(table.read_text())


if __name__ == "__main__":
    main()
