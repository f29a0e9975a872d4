"""Run checkpoints, in one place: what a checkpoint holds, when one is written, how many are kept, and how a run
resumes from one (torchtitan's CheckpointManager is the model).

  what    four parts, each with state_dict / load_state_dict: the model (online, predictor, target, statistics),
          the engine (AdamW moments; under DeepSpeed its ZeRO partitions in deepspeed/step<N>/), the trainer
          (step, epoch, every RNG, and the run's description: config, model config, world size, effective batch,
          version) and the training data (the items found bad; streamed shards' positions, every rank's)
  when    every `train.save_every` steps, at the last step, and when a stop signal is agreed (Trainer.fit)
  kept    the newest `train.keep_checkpoints`; an older one goes with its DeepSpeed partitions
  resume  once, after the engine exists: read safely, check it belongs to this run, then load the four parts

One file per checkpoint, `checkpoint-<step>.pth`, written atomically by rank 0 (the file `load_model` reads);
a crash, a full disk or a kill never leaves a half-written one in place of a good one.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoint import CheckpointError, atomic_save, load_weights, safe_load
from ..config import ConfigError, config_from_dict
from ..distributed import barrier
from ..atomic import write_atomic
from ..run_folder import RunFolder
from .faults import state_bytes, write_failure
from .metrics import read_jsonl

log = logging.getLogger("fastm2d.train")


class RandomState:
    """Every generator a run draws from, as tensors and plain values (checkpoints load with weights_only)."""

    def __init__(self, mask_gen: torch.Generator, device: torch.device):
        self.mask_gen, self.device = mask_gen, device

    def state_dict(self) -> dict:
        np_state = np.random.get_state(legacy=False)
        rng = {"torch": torch.get_rng_state(), "mask": self.mask_gen.get_state(),
               "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                         "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                         "gauss": float(np_state["gauss"])}}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def load_state_dict(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        n = rng["numpy"]
        np.random.set_state({"bit_generator": "MT19937", "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                             "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
        self.mask_gen.set_state(rng["mask"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


class Checkpointer:
    def __init__(self, run: RunFolder, every: int, keep: int, is_main: bool):
        self.run, self.every, self.keep, self.is_main = run, every, keep, is_main

    def latest(self) -> Optional[Path]:
        return self.run.latest_checkpoint()

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    # ------------------------------------------------------------------------------------------- save ----
    def save(self, trainer) -> Path:
        """Every rank calls this (DeepSpeed writes its optimiser partitions collectively); rank 0 writes the
        checkpoint file."""
        path = self.run.checkpoint(trainer.step)
        previous, state = self.latest(), None
        data = trainer.data.state_dict()  # collective: every rank's stream position travels to rank 0
        try:
            trainer.engine.save_extra(self.run, trainer.step)
            if self.is_main:
                state = {"model": trainer.model.state_dict(), **trainer.engine.state_dict(), **trainer.state_dict(),
                         **data}
                atomic_save(state, path)
        except OSError as e:  # disk full, quota, unwritable: stop saying what is needed; the old one stays
            needed = state_bytes(state) if state is not None else 3 * state_bytes(trainer.model.state_dict())
            raise write_failure(self.run.path, needed, e, previous) from None
        if self.is_main:
            self.prune()
        barrier()
        return path

    def prune(self) -> None:
        """Keep the newest `keep` checkpoints; an older one goes with its DeepSpeed partitions."""
        for step, old in sorted(self.run.checkpoints().items())[: -self.keep]:
            old.unlink(missing_ok=True)
            shutil.rmtree(self.run.deepspeed / RunFolder.deepspeed_tag(step), ignore_errors=True)

    # ----------------------------------------------------------------------------------------- resume ----
    def resume(self, trainer, path: Path) -> None:
        """Load a run checkpoint into a built trainer (model, engine and all): checked first, then every part."""
        obj = self.read(path, trainer)
        load_weights(trainer.model, obj["model"], path)
        trainer.engine.weights_loaded()  # ZeRO keeps its own fp32 copy of the weights: refresh it
        trainer.engine.load_state_dict(obj, path, self.run)
        trainer.load_state_dict(obj)
        trainer.data.load_state_dict(obj)
        if self.is_main:
            truncate_metrics(self.run.metrics, trainer.step)
        log.info("resumed from %s at step %d", path, trainer.step)

    def read(self, path: Path, trainer) -> dict:
        """The checkpoint object, refused (naming the file and the field) unless it is a fastm2d training
        checkpoint of this model at this effective batch."""
        obj = safe_load(path)
        missing = [k for k in ("model", "step", "rng", "config") if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise CheckpointError(f"{path}: not a fastm2d training checkpoint (no {', '.join(missing)}): --resume "
                                  f"needs one written by `fastm2d pretrain`; move it out of {self.run.path} or use "
                                  f"another out_dir")
        for key, kind in (("step", int), ("epoch", int), ("config", dict), ("rng", dict)):
            if key in obj and (type(obj[key]) is not kind or (kind is int and obj[key] < 0)):
                raise CheckpointError(f"{path}: {key}={obj[key]!r} is not a {'count >= 0' if kind is int else 'mapping'}"
                                      f"; the checkpoint is damaged or not fastm2d's")
        problem = trainer.data.state_problem(obj)
        if problem:
            raise CheckpointError(f"{path}: {problem}; the checkpoint is damaged or not fastm2d's")
        saved, now = asdict(config_from_dict(obj["config"]).model), asdict(trainer.model.cfg)
        if saved != now:
            diff = {k: (v, now[k]) for k, v in saved.items() if now[k] != v}
            raise ConfigError(f"{path}: the checkpoint's model config differs from this config (saved, now): {diff}")
        old_batch = obj.get("effective_batch")
        if old_batch is not None and old_batch != trainer.effective_batch:
            t = trainer.config.train
            raise ConfigError(f"{path}: written at an effective batch of {old_batch}, this launch gives {t.batch_size} x "
                              f"{t.accum_steps} x {trainer.dist.world_size} process(es) = {trainer.effective_batch}; "
                              f"keep it equal (set train.batch_size / train.accum_steps) so the schedules and the "
                              f"data position continue where they stopped")
        return obj


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint, so metrics.jsonl stays one continuous curve."""
    if path.is_file():  # torn or unreadable lines are dropped here too (read_jsonl says so)
        rows = [json.dumps(r) for r in read_jsonl(path) if r["step"] <= step]
        write_atomic(path, "".join(r + "\n" for r in rows))


__all__ = ["Checkpointer", "RandomState", "truncate_metrics"]
