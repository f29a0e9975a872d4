"""Where training progress goes: `metrics.jsonl` (for machines), TensorBoard scalars, and a tqdm bar (for people)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict

from tqdm import tqdm

log = logging.getLogger("fastm2d.train")


class MetricsLogger:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, tensorboard: bool = True,
                 progress: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.writer = self._tensorboard(Path(out_dir) / "tb") if tensorboard else None
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
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        monitor = row.get("monitor", False)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "monitor") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{'eval' if monitor else 'train'}/{k}", v, row["step"])
        if monitor:
            return
        extra = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                             samples_s=f"{row['samples_per_s']:.1f}", **extra, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(out_dir: str | Path, monitors: bool = False) -> list:
    """The training rows of metrics.jsonl, or (monitors=True) the monitor rows."""
    with open(Path(out_dir) / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if bool(r.get("monitor", False)) == monitors]


class NullLogger:
    """What ranks other than 0 log: nothing."""

    def advance(self, n: int = 1) -> None:
        pass

    def write(self, row: Dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
