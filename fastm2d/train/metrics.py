"""Where training progress goes: `metrics.jsonl` (for machines), TensorBoard scalars, and a tqdm bar (for people)."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Dict, List

from tqdm import tqdm

from ..atomic import open_nofollow
from ..run_folder import RunFolder
from .faults import CheckpointWriteError
log = logging.getLogger("fastm2d.train")


class MetricsLogger:
    def __init__(self, run: RunFolder, total_steps: int, start_step: int, tensorboard: bool = True,
                 progress: bool = True):
        self.path = run.metrics
        self.fd = open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.writer = self._tensorboard(run.tensorboard) if tensorboard else None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", disable=not progress,
                        dynamic_ncols=True)

    @staticmethod
    def _tensorboard(folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional on bare GPU machines
            log.warning("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")
            return None
        return SummaryWriter(str(folder))

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, row: Dict[str, float]) -> None:
        """A training row, or a monitor row (marked "monitor": true; its scalars go under eval/ in TensorBoard)."""
        append_line(self.fd, self.path, json.dumps(row))
        monitor = row.get("monitor", False)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "monitor") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{'eval' if monitor else 'train'}/{k}", v, row["step"])
        if monitor or "profile" in row:  # a monitor's or a profiled window's row: no progress-bar figures
            return
        extra = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                             samples_s=f"{row['samples_per_s']:.1f}", **extra, refresh=False)

    def close(self) -> None:
        self.bar.close()
        os.close(self.fd)
        if self.writer is not None:
            self.writer.close()


def append_line(fd: int, path: Path, text: str) -> None:
    """Append one whole line or nothing: a write the disk cuts short (full, quota, size limit) is rolled back,
    so the file never ends in a torn line, and the failure is raised as a machine fault naming the file."""

    data = (text + "\n").encode()
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, "short write")
    except OSError as e:
        try:
            os.ftruncate(fd, end)
        except OSError:
            pass  # the reader skips a torn last line in any case
        raise CheckpointWriteError(f"cannot append to {path} ({e.strerror or e}): it holds whole lines up to the "
                                   f"last one written; free space and relaunch with --resume") from None


def read_jsonl(path: Path) -> List[dict]:
    """Rows of a JSON-lines file. A torn line (the disk filled up while appending: only ever the last) or any
    other unreadable line is skipped with a warning naming it, never a traceback."""
    rows = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with an integer step")
        except (ValueError, UnicodeDecodeError) as e:
            torn = n >= len(lines) - 1 and not line.endswith(b"}")
            log.warning("%s:%d: %s skipped (%s)", path, n, "a torn last line" if torn else "an unreadable line",
                        str(e).splitlines()[0][:80])
            continue
        rows.append(row)
    return rows


def read_metrics(out_dir: str | Path, monitors: bool = False) -> list:
    """The training rows of metrics.jsonl, or (monitors=True) the monitor rows (a profiled window's row is neither:
    its tables are in RUN/profile/)."""
    rows = read_jsonl(RunFolder(out_dir).metrics)
    return [r for r in rows if "profile" not in r and bool(r.get("monitor", False)) == monitors]


class NullLogger:
    """What ranks other than 0 log: nothing."""

    def advance(self, n: int = 1) -> None:
        pass

    def write(self, row: Dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
