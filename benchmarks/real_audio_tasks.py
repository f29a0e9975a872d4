"""A real-audio evaluation of our own, built from sound collections that Debian packages.

    python benchmarks/real_sounds.py fetch --all          # once (apt-get download + dpkg-deb -x)
    python benchmarks/real_audio_tasks.py build OUT      # offline from then on

writes OUT/clips/ (16 kHz mono WAV segments, at most 2 s: the short real clips the "Real clips" issue is about),
five CSV tasks per label set for `fastm2d linear-eval OUT/TASK-foldK.csv --weights W` (file_name, label, split; fold K tests
on the K-th fifth of the recordings, validates on the next, trains on the rest: the test sets are small, so
scores are averaged over the folds), and OUT/pretrain.csv: every clip, labels dropped, for
`data.train=OUT/pretrain.csv` (self-supervised pre-training sees the probe's audio, never its labels, as in the
paper's transductive setting for small data; the probes' folds cover every clip in turn).

Tasks (labels from folder or package names; folds split by SOURCE RECORDING, so segments of one recording never
sit on both sides):
  lmms-family   LMMS's sample library by folder: drums, basses, instruments, strings & pads, bass loops, beats,
                effects, latin, misc (its synthetic single-cycle `waveforms` and `shapes` left out)
  collection    which collection a sound comes from: LMMS samples, freedesktop / Oxygen / Deepin desktop sounds,
                SuperTux, Frozen Bubble, Pingus, Chromium B.S.U. game effects
  music-theme   SuperTux's music by level theme (forest, antarctic, misc, retro, ...), 2 s segments
Speech (SuperTux's speech folder), voice packs, soundfonts and drum-kit packages are not used.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.real_sounds import MORE_PACKAGES, TEST_PACKAGES, missing_reason, sound_files  # noqa: E402
from fastm2d.frontend import AudioReadError, read_audio  # noqa: E402

SR = 16000
SEGMENT_S = 2.0  # the clips are at most this long
MAX_SEGMENTS = {"effects": 4, "music": 12}  # per source recording
LMMS_FOLDERS = ("drums", "basses", "instruments", "stringsnpads", "bassloops", "beats", "effects", "latin", "misc")
GAME = {"supertux-data": ("supertux", "usr/share/games/supertux2/sounds"),
        "frozen-bubble-data": ("frozen-bubble", ""), "pingus-data": ("pingus", ""),
        "chromium-bsu-data": ("chromium-bsu", "")}
DESKTOP = {"sound-theme-freedesktop": "freedesktop", "oxygen-sounds": "oxygen", "deepin-sound-theme": "deepin"}


FOLDS = 5


def fifth_of(source: str) -> int:
    """Which fifth of the recordings a source falls in, by a hash of its name: the same on every machine."""
    return int(hashlib.sha1(source.encode()).hexdigest()[:8], 16) % FOLDS


def split_of(fifth: int, fold: int) -> str:
    """Fold k: test on fifth k, valid on fifth k+1, train on the other three (60 / 20 / 20 %)."""
    return "test" if fifth == fold else "valid" if fifth == (fold + 1) % FOLDS else "train"


def segments(path: Path, max_segments: int) -> List[np.ndarray]:
    """A recording -> up to `max_segments` consecutive clips of at most SEGMENT_S (a short one stays whole);
    digitally silent segments are dropped."""
    wav = read_audio(path, SR).numpy()
    n = int(SEGMENT_S * SR)
    out = [wav[i:i + n] for i in range(0, max(len(wav), 1), n)][:max_segments]
    return [s for s in out if len(s) >= SR // 5 and np.abs(s).max() > 1e-3]  # >= 200 ms, not silence


def sources() -> List[Tuple[Path, Dict[str, str], int]]:
    """(recording, {task: label}, max segments) for every recording used."""
    found = []
    for f in sound_files("lmms-common", "usr/share/lmms/samples"):
        if f.parent.name in LMMS_FOLDERS:
            found.append((f, {"lmms-family": f.parent.name, "collection": "lmms"}, MAX_SEGMENTS["effects"]))
    for package, name in DESKTOP.items():
        for f in sound_files(package):
            found.append((f, {"collection": name}, MAX_SEGMENTS["effects"]))
    for package, (name, under) in GAME.items():
        for f in sound_files(package, under):
            found.append((f, {"collection": name}, MAX_SEGMENTS["effects"]))
    for f in sound_files("supertux-data", "usr/share/games/supertux2/music"):
        found.append((f, {"music-theme": f.parent.name}, MAX_SEGMENTS["music"]))
    return found


def build(out: Path) -> Dict[str, Counter]:
    missing = [p for p in [*TEST_PACKAGES, *MORE_PACKAGES] if missing_reason(p)]
    if missing:
        raise SystemExit(f"not fetched: {missing}; run: python benchmarks/real_sounds.py fetch --all")
    clips = out / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rows: Dict[str, List[Tuple[str, str, int]]] = {}
    pretrain, skipped = [], 0
    for path, labels, max_seg in sources():
        source = f"{path.parent.name}/{path.name}"
        try:
            segs = segments(path, max_seg)
        except AudioReadError as e:
            print(f"skipped: {e}", file=sys.stderr)
            skipped += 1
            continue
        fifth = fifth_of(source)
        for k, seg in enumerate(segs):
            name = f"clips/{path.parent.name}__{path.stem}__{k}.wav"
            if not (out / name).is_file():
                sf.write(str(out / name), seg, SR, subtype="PCM_16")
            for task, label in labels.items():
                rows.setdefault(task, []).append((name, label, fifth))
            pretrain.append(name)
    counts = {}
    for task, task_rows in rows.items():
        # a class must have recordings in every fifth to be probed in every fold
        keep = set.intersection(*({lab for _, lab, f in task_rows if f == k} for k in range(FOLDS)))
        task_rows = [r for r in task_rows if r[1] in keep]
        for fold in range(FOLDS):
            with open(out / f"{task}-fold{fold}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file_name", "label", "split"])
                w.writerows((n, lab, split_of(fifth, fold)) for n, lab, fifth in task_rows)
        counts[task] = Counter((lab, split_of(fifth, 0)) for _, lab, fifth in task_rows)
    with open(out / "pretrain.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name"])
        w.writerows([n] for n in sorted(set(pretrain)))
    lengths = [sf.info(str(out / n)).duration for n in sorted(set(pretrain))]
    print(f"pretrain.csv: {len(set(pretrain))} clips, {np.median(lengths):.2f} s median "
          f"({np.percentile(lengths, 10):.2f}-{np.percentile(lengths, 90):.2f} s 10-90 %); {skipped} unreadable")
    for task, c in counts.items():
        classes = sorted({lab for lab, _ in c})
        print(f"{task}-fold0.csv: {len(classes)} classes ({', '.join(classes)}), " + ", ".join(
            f"{s} {sum(v for (lab, sp), v in c.items() if sp == s)}" for s in ("train", "valid", "test")))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write OUT/clips, OUT/<task>.csv and OUT/pretrain.csv")
    b.add_argument("out", type=Path)
    args = ap.parse_args()
    build(args.out)


if __name__ == "__main__":
    main()
