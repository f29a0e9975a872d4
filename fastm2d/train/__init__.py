"""Pre-training: the Trainer (one process; DeepSpeed plugs in as the distributed engine), schedules, metrics."""
from .metrics import read_metrics
from .schedule import lr_at, scaled_lr
from .trainer import Trainer, TrainingDiverged, pretrain

__all__ = ["Trainer", "TrainingDiverged", "pretrain", "lr_at", "scaled_lr", "read_metrics"]
