"""M2D-X offline targets that travel with each training item: clip labels (M2D-AS) or precomputed teacher
features aligned to the crop (M2D-S). Teacher models run on the device instead (fastm2d/train/offline.py).

Both are checked against the training list at start-up, so a missing file, an unknown class, an empty label
list or features of the wrong width or length is one `DataError` naming the file, never a failure mid-run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .sources import DataError, file_value_rows, sample_name

LABEL_COLUMNS = ("labels", "label", "positive_labels")


def read_label_rows(path: Path, root: Optional[Path] = None) -> Dict[Path, List[str]]:
    """CSV of file_name and labels (comma-separated names or indices) -> {resolved path: [labels]}."""
    out: Dict[Path, List[str]] = {}
    for line, cell, file, value in file_value_rows(path, "offline.labels", LABEL_COLUMNS, "labels", root):
        names = split_labels(value)
        if not names:
            raise DataError(f"{path}:{line}: {cell}: empty label list (every training clip needs a label)")
        out[file] = names
    return out


def read_classes(path: Path) -> List[str]:
    """offline.classes: one class name per line."""
    if not Path(path).is_file():
        raise DataError(f"offline.classes={path}: file not found")
    return [c.strip() for c in Path(path).read_text().splitlines() if c.strip()]


def split_labels(value) -> List[str]:
    """A label cell or JSON value: 'a,b' / 'a;b' or a list -> ['a', 'b']."""
    items = value if isinstance(value, list) else str(value).replace(";", ",").split(",")
    return [str(n).strip() for n in items if str(n).strip()]


class LabelTargets:
    """Item -> multi-hot float32 (C,), or a one-hot (C,) for single-label data (cross-entropy takes either)."""

    def __init__(self, files: Sequence[Path], labels_csv: Path, classes_file: Optional[Path] = None,
                 root: Optional[Path] = None, single_label: bool = False):
        rows = read_label_rows(labels_csv, root)
        if classes_file is not None:
            self.classes = read_classes(classes_file)
        else:
            self.classes = sorted({n for names in rows.values() for n in names})
        index = {c: i for i, c in enumerate(self.classes)}
        self.matrix = np.zeros((len(files), len(self.classes)), dtype=np.float32)
        for i, f in enumerate(files):
            names = rows.get(Path(f).resolve())
            if names is None:
                raise DataError(f"{f}: a training file with no row in {labels_csv}")
            for n in names:
                k = index.get(n)
                if k is None and n.isdigit() and classes_file is not None and int(n) < len(self.classes):
                    k = int(n)  # an index into the class list
                if k is None:
                    raise DataError(f"{labels_csv}: {f}: unknown class {n!r} (not in "
                                    f"{classes_file or 'the classes found in the CSV'})")
                self.matrix[i, k] = 1.0
            if single_label and len(names) != 1:
                raise DataError(f"{labels_csv}: {f}: {len(names)} labels, but offline.single_label=true")
        self.dim = len(self.classes)

    def __call__(self, item: int, crop_start: int, seed: int = 0) -> np.ndarray:
        return self.matrix[item]

    def balanced_weights(self) -> np.ndarray:
        """Per-item sampling weight: the sum of 1 / (class frequency) over its labels, so rare classes are drawn
        as often as common ones (the original's AudioSet option)."""
        freq = self.matrix.sum(0)
        return (self.matrix / np.maximum(freq, 1.0)).sum(1)


class ShardLabels:
    """A streamed sample -> multi-hot float32 (C,) from the labels in its JSON member (`labels`, `label` or
    `positive_labels`: names of offline.classes, or indices into it). A sample without labels or with an unknown
    class raises DataError naming it: listed and skipped like an undecodable one."""

    def __init__(self, classes_file: Path, single_label: bool = False):
        self.classes = read_classes(classes_file)
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.dim, self.single_label, self.classes_file = len(self.classes), single_label, classes_file

    def __call__(self, sample: dict, seed: int = 0) -> np.ndarray:
        import json
        name = sample_name(sample)
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError as e:
            raise DataError(f"{name}: its JSON member is not JSON ({e})") from None
        value = next((meta[k] for k in LABEL_COLUMNS if isinstance(meta, dict) and k in meta), None)
        names = split_labels(value) if value is not None else []
        if not names:
            raise DataError(f"{name}: no labels in its JSON member ({', '.join(LABEL_COLUMNS)})")
        if self.single_label and len(names) != 1:
            raise DataError(f"{name}: {len(names)} labels, but offline.single_label=true")
        out = np.zeros(self.dim, dtype=np.float32)
        for n in names:
            k = self.index.get(n)
            if k is None and n.isdigit() and int(n) < self.dim:
                k = int(n)
            if k is None:
                raise DataError(f"{name}: unknown class {n!r} (not in offline.classes={self.classes_file})")
            out[k] = 1.0
        return out


def align_features(feats: np.ndarray, rate: float, start_s: float, n_frames: int, frame_s: float) -> np.ndarray:
    """Teacher features (Tf, D) at `rate` Hz -> (n_frames, D): frame p covers [start + p*frame_s, +frame_s) and gets
    the mean of the features whose centres fall inside, or, when none does (a teacher slower than the patch
    rate), the feature nearest its centre. Past the end of the features the last frame is repeated (the
    zero-padded tail of a short clip has no teacher output)."""
    t_feat = (np.arange(len(feats)) + 0.5) / rate
    out = np.empty((n_frames, feats.shape[1]), dtype=np.float32)
    for p in range(n_frames):
        lo = start_s + p * frame_s
        inside = np.nonzero((t_feat >= lo) & (t_feat < lo + frame_s))[0]
        if len(inside):
            out[p] = feats[inside].mean(0)
        else:
            out[p] = feats[min(int((lo + frame_s / 2) * rate), len(feats) - 1)]
    return out


class FeatureTargets:
    """Item -> the teacher's precomputed features of its crop, (T', D) at the patch frame rate.

    `<folder>/<audio stem>.npy` per training file, (T, D) or (1, T, D). Checked at start-up: present, 2-D after
    squeezing, one width for all, and a duration within one patch frame (plus 2 %) of the audio's."""

    def __init__(self, files: Sequence[Path], folder: Path, rate: float, durations: Sequence[float],
                 hop_s: float, patch_frames: int, n_frames: int):
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"offline.features={folder}: not a folder")
        self.paths, self.rate, self.hop_s = [], rate, hop_s
        self.frame_s, self.n_frames = patch_frames * hop_s, n_frames
        self.dim = None
        for f, seconds in zip(files, durations):
            p = folder / (Path(f).stem + ".npy")
            if not p.is_file():
                raise DataError(f"{p}: teacher features missing for {f}")
            arr = np.load(p, mmap_mode="r")
            shape = arr.shape[1:] if arr.ndim == 3 and arr.shape[0] == 1 else arr.shape
            if len(shape) != 2:
                raise DataError(f"{p}: features of shape {arr.shape}; expected (T, D)")
            if self.dim is None:
                self.dim = int(shape[1])
            elif shape[1] != self.dim:
                raise DataError(f"{p}: features {shape[1]} wide, the others {self.dim}")
            covered = shape[0] / rate
            if abs(covered - seconds) > self.frame_s + 0.02 * seconds:
                raise DataError(f"{p}: {shape[0]} frames at {rate:g} Hz cover {covered:.2f} s, the audio lasts "
                                f"{seconds:.2f} s (wrong file or offline.feature_rate?)")
            self.paths.append(p)

    def __call__(self, item: int, crop_start: int, seed: int = 0) -> np.ndarray:
        arr = np.load(self.paths[item], mmap_mode="r")
        arr = arr.reshape(arr.shape[-2], arr.shape[-1])
        return align_features(arr, self.rate, crop_start * self.hop_s, self.n_frames, self.frame_s)
