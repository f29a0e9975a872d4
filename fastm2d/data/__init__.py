"""Training data (reference path): sources, random crops, resumable sampling, statistics."""
from .dataset import CropDataset, LogMelSource, random_crop
from .sampler import EpochSampler
from .sources import DataError, check_files, list_files
from .stats import compute_norm_stats
from .store import LogMelStore, is_store
from .synthetic import synth_clip

__all__ = ["CropDataset", "LogMelSource", "random_crop", "EpochSampler", "DataError", "check_files",
           "list_files", "compute_norm_stats", "synth_clip", "LogMelStore", "is_store"]
