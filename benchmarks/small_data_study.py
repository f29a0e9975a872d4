"""The paper's small-data story (IV-E, Tables XII-XIII) at toy scale, on real sound: does further pre-training
a general model with background noise and the regularising teacher (`fastm2d adapt`) beat pre-training on the
small domain set from scratch?

    python benchmarks/real_audio_tasks.py build /tmp/real          # once
    python benchmarks/small_data_study.py --data /tmp/real --out /tmp/small

Domain: LMMS's instrument-family samples (the lmms-family probe's clips, labels dropped, about 200). General:
every clip of the real-audio set (the broad mix). Noise: the desktop and game sound effects. Rows, each probed on
the lmms-family folds (`--seeds` probe seeds x 5 folds, mean and 95 % CI over the folds' means):
  scratch            configs/demo.yaml on the domain clips only
  general            configs/demo.yaml on the broad mix
  adapt eta 0        fastm2d adapt from `general`, no noise, no offline loss (plain further pre-training)
  adapt noise        ... with background noise (eta 0.3)
  adapt eta 0 + reg  ... with the offline regularisation by the general model (M2D-X)
  adapt noise + reg  ... both: the paper's recipe
All at the demo's CPU scale (`--steps` steps of batch 16, base_lr 6e-3 as the real-audio demo); the adapt rows
override the recipe's 128 x 600 epochs.
"""
import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path


from fastm2d.cli import main as fastm2d
from fastm2d.eval.scores import confidence_interval

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.real_audio_learning import FOLDS  # noqa: E402

NOISE_PREFIXES = ("stereo__", "sounds__", "snd__", "wav__")  # desktop / game effect folders in clips/


def write_lists(data: Path, out: Path):
    with open(data / "lmms-family-fold0.csv") as f:
        domain = sorted({r["file_name"] for r in csv.DictReader(f)})
    with open(data / "pretrain.csv") as f:
        everything = [r["file_name"] for r in csv.DictReader(f)]
    noise = [n for n in everything if Path(n).name.startswith(NOISE_PREFIXES)]
    for name, files in (("domain", domain), ("noise", noise)):
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name"])
            w.writerows([str(data / n)] for n in files)
    return out / "domain.csv", data / "pretrain.csv", out / "noise.csv", len(domain), len(noise)


def probe(weights: Path, data: Path, out: Path, seeds: int) -> tuple:
    folds = []
    for k in range(FOLDS):
        assert fastm2d(["linear-eval", str(data / f"lmms-family-fold{k}.csv"), "--weights", str(weights), "--seeds", str(seeds),
                        "--out", str(out), "--quiet"]) == 0
        folds.append(100 * json.loads((out / f"lmms-family-fold{k}.json").read_text())["mean"])
    return confidence_interval(folds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated row names to run (default: all)")
    ap.add_argument("--base-lr", default="6e-3", help="every row's train.base_lr (6e-3: the real-audio demo's)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    domain, general_data, noise, n_domain, n_noise = write_lists(args.data, args.out)
    demo = ["--config", str(ROOT / "configs/demo.yaml"), "train.progress=false", "train.tensorboard=false",
            f"train.max_steps={args.steps}", f"train.base_lr={args.base_lr}"]
    small = ["train.batch_size=16", "train.accum_steps=1", f"train.max_steps={args.steps}", "data.min_epoch_items=0",
             f"train.base_lr={args.base_lr}", "train.warmup_epochs=1", "train.progress=false", "train.tensorboard=false",
             "data.num_workers=0", "train.log_every=20", f"train.save_every={args.steps}"]
    general = args.out / "general"  # the `general` row's run folder: the adapt rows start from it
    rows = {
        "scratch": ["pretrain", *demo, f"data.train={domain}"],
        "general": ["pretrain", *demo, f"data.train={general_data}"],
        "adapt eta 0": ["adapt", str(domain), "--weights", str(general), *small, "offline.task=none"],
        "adapt noise": ["adapt", str(domain), "--weights", str(general), "--noise", str(noise), *small,
                        "offline.task=none"],
        "adapt eta 0 + reg": ["adapt", str(domain), "--weights", str(general), *small],
        "adapt noise + reg": ["adapt", str(domain), "--weights", str(general), "--noise", str(noise), *small],
    }
    wanted = args.only.split(",") if args.only else list(rows)
    results = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
    for name in wanted:
        run = args.out / name.replace(" ", "_").replace("+", "reg")
        shutil.rmtree(run, ignore_errors=True)
        argv = rows[name]
        argv = [*argv, f"out_dir={run}"] if argv[0] == "pretrain" else [*argv, "--out", str(run)]
        t0 = time.perf_counter()
        assert fastm2d(argv) == 0, name
        mean, ci = probe(run, args.data, args.out / f"eval_{run.name}", args.seeds)
        results[name] = {"mean": mean, "ci95": ci, "wall_s": round(time.perf_counter() - t0)}
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"domain: {n_domain} LMMS clips; noise: {n_noise} desktop / game effect clips; {args.steps} steps of "
             f"batch 16; probe: lmms-family, {FOLDS} folds x {args.seeds} seeds (mean, 95 % CI over folds)", "",
             "| row | lmms-family accuracy % | wall |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['mean']:.1f} +- {v['ci95']:.1f} | {v['wall_s']} s |" for k, v in results.items()]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
