"""Real recorded sound for tests and benchmarks, from sound collections that Debian packages.

    python benchmarks/real_sounds.py fetch            # the small set the tests use (~9 MB)
    python benchmarks/real_sounds.py fetch --all      # + the collections the real-audio evaluation uses

Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a cache folder
($FASTM2D_SOUNDS, default ~/.cache/fastm2d/sounds); no audio goes into the repository. Speech synthesisers, game
voice packs, General MIDI soundfonts and drum-kit packages are left aside on purpose (kept for other checks).
`fetch` never fails the command that calls it: where apt is missing or offline it says so, and the tests that
need the sound skip with that reason.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

# package -> what it holds (all real recordings or produced sample libraries; folders name the categories)
TEST_PACKAGES = {
    "lmms-common": "LMMS sample library: samples/{drums,instruments,basses,stringsnpads,effects,bassloops,beats,...}",
    "sound-theme-freedesktop": "freedesktop.org desktop sounds (bells, alerts, clicks)",
}
MORE_PACKAGES = {
    "oxygen-sounds": "KDE Oxygen desktop sounds",
    "deepin-sound-theme": "Deepin desktop sounds",
    "frozen-bubble-data": "Frozen Bubble game sound effects",
    "pingus-data": "Pingus game sound effects",
    "chromium-bsu-data": "Chromium B.S.U. game sound effects",
    "supertux-data": "SuperTux game sound effects and music",
}
AUDIO_SUFFIXES = (".wav", ".ogg", ".oga", ".flac")


def cache_dir() -> Path:
    return Path(os.environ.get("FASTM2D_SOUNDS", Path.home() / ".cache" / "fastm2d" / "sounds"))


def package_root(package: str) -> Optional[Path]:
    """The unpacked package's folder, or None when it has not been fetched."""
    root = cache_dir() / package
    return root if (root / ".unpacked").is_file() else None


def sound_files(package: str, under: str = "") -> List[Path]:
    root = package_root(package)
    if root is None:
        return []
    return sorted(p for p in (root / under).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def missing_reason(package: str) -> Optional[str]:
    """Why a test needing `package` must skip, or None."""
    if package_root(package) is None:
        return (f"real sound package {package} not fetched into {cache_dir()} "
                f"(run: python benchmarks/real_sounds.py fetch)")
    return None


def _download(packages: List[str], debs: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", *packages], cwd=debs, capture_output=True, text=True)


def fetch(packages: List[str]) -> int:
    """Fetch and unpack what is not there yet; returns how many packages are missing afterwards."""
    todo = [p for p in packages if package_root(p) is None]
    if not todo:
        return 0
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        print(f"real_sounds: apt-get / dpkg-deb not found; tests needing {todo} will skip", file=sys.stderr)
        return len(todo)
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    result = _download(todo, debs)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = _download(todo, debs)
    if result.returncode != 0:
        print(f"real_sounds: apt-get download failed ({result.stderr.strip().splitlines()[-1:]}); "
              f"tests needing {todo} will skip", file=sys.stderr)
    missing = 0
    for package in todo:
        found = sorted(debs.glob(f"{package}_*.deb"))
        target = cache_dir() / package
        if not found or subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(target)]).returncode != 0:
            missing += 1
            continue
        (target / ".unpacked").write_text(found[-1].name + "\n")
        found[-1].unlink()
        print(f"real_sounds: {package}: {len(sound_files(package))} sound files in {target}")
    return missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and unpack the sound packages (skips those already there)")
    f.add_argument("--all", action="store_true", help="also the collections of the real-audio evaluation")
    args = ap.parse_args()
    packages = list(TEST_PACKAGES) + (list(MORE_PACKAGES) if args.all else [])
    fetch(packages)  # never fails the caller: tests skip with the reason instead


if __name__ == "__main__":
    main()
