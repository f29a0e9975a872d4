"""How gradients become parameter updates: plain PyTorch for one process, DeepSpeed ZeRO for many.

Both engines expose the same three calls to `Trainer.train_step`: `backward(loss, n_micro)` per micro-batch,
`step()` at the accumulation boundary, and `param_groups` for the per-step learning rate. One code path serves
1 and N processes; single-GPU users never import DeepSpeed.

Precision under DeepSpeed: parameters (the master weights and the EMA target) stay fp32 and the forward runs
under torch.autocast (bf16), instead of DeepSpeed's bf16 mode, which casts the whole module: an EMA with
tau = 0.99999 applied to bf16 target weights would round every update away. The autocast must be DeepSpeed's own
`torch_autocast` section: when autocast is on outside the engine but not configured in it, DeepSpeed 0.19 re-enters
autocast with enabled=False inside its forward (deepspeed/runtime/torch_autocast.py, `autocast_if_enabled`), and
every multi-GPU run trained in fp32. Gradients are still reduced in fp32 (no module is listed as
"lower-precision safe"), as one process computes them.

fp32 (train.precision=fp32) means IEEE fp32 matmuls on a GPU: TF32 stays off, PyTorch's default. It is the
setting for exact comparisons; bf16 autocast is the fast path and the default on CUDA.
"""
from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import CheckpointError, check_deepspeed_checkpoint
from ..config import Config, ConfigError
from ..distributed import DistInfo
from ..run_folder import RunFolder
from .faults import attempt_store
from .zero_state import consolidate, push_into_zero

log = logging.getLogger("fastm2d.train")


def wants_deepspeed(config: Config, dist: DistInfo) -> bool:
    engine = config.train.engine
    if engine == "single" and dist.world_size > 1:
        raise ConfigError(f"train.engine=single, but the launcher started {dist.world_size} processes; "
                          f"multi-process training runs on DeepSpeed (train.engine=deepspeed or auto)")
    return engine == "deepspeed" or (engine == "auto" and dist.world_size > 1)


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"train.engine needs DeepSpeed, which is not installed ({e}); "
                          f"pip install 'fastm2d[deepspeed]'") from None
    return deepspeed


def init_distributed(config: Config, device_type: str) -> None:
    """Process group with a collective timeout: a rank that dies makes the others fail instead of hanging."""
    deepspeed = import_deepspeed()
    timeout = datetime.timedelta(seconds=config.train.dist_timeout_s)
    backend = "nccl" if device_type == "cuda" else "gloo"
    store = attempt_store(timeout)
    if store is not None and not torch.distributed.is_initialized():  # DeepSpeed adopts an initialised group
        torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                             world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


def fused_adamw(device: torch.device) -> bool:
    """torch's fused AdamW (one kernel over every parameter) on CUDA, under either engine: ZeRO-1/2 hands it its flat
    fp32 partitions, which fused AdamW takes like any tensor list (tests/test_deepspeed.py runs that branch on CPU,
    where torch has a fused AdamW too). The CPU keeps the default foreach implementation, measured no slower there."""
    return device.type == "cuda"


def deepspeed_config(config: Config, world_size: int, amp_dtype: Optional[torch.dtype] = None) -> dict:
    """The DeepSpeed JSON, generated from fastm2d's config (never kept by hand in a second place); `amp_dtype`:
    the trainer's autocast dtype (None: fp32)."""
    t = config.train
    if amp_dtype == torch.float16:
        raise ConfigError("train.precision=fp16 is not available with DeepSpeed (its torch autocast scales no "
                          "losses under ZeRO); use train.precision=bf16")
    autocast = {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}} \
        if amp_dtype == torch.bfloat16 else {}
    return {**autocast,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.accum_steps,
        "train_batch_size": t.batch_size * t.accum_steps * world_size,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": {"stage": t.zero_stage, "overlap_comm": True, "contiguous_gradients": True},
        "steps_per_print": 10**12,  # fastm2d logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


class _Engine:
    """What both engines share: the optimiser's groups, where the trainer sets the per-step learning rate."""

    optimizer: torch.optim.Optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups


class SingleEngine(_Engine):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, amp_dtype, clip: float):
        self.module, self.optimizer, self.clip = model, optimizer, clip
        self.scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=amp_dtype == torch.float16)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def forward(self, *args):
        return self.module(*args)

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        self.scaler.scale(loss / n_micro).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, path: Path, run: RunFolder) -> None:
        if state.get("optimizer") is None:  # written by DeepSpeed: gather its ZeRO partitions
            try:
                moments = consolidate(run.deepspeed, RunFolder.deepspeed_tag(state['step']),
                                      [g["params"] for g in self.optimizer.param_groups])
            except CheckpointError:
                raise  # a partition file that would run code: refuse the resume, never continue past it
            except (OSError, KeyError, RuntimeError, ImportError) as e:  # ImportError: DeepSpeed not installed
                log.warning("%s: the DeepSpeed optimiser partitions cannot be read (%s): AdamW moments start from "
                            "zero; weights, schedule position and RNG are restored", path, e)
                return
            self.optimizer.load_state_dict({"state": moments["state"],
                                            "param_groups": self.optimizer.state_dict()["param_groups"]})
            log.info("%s: AdamW moments consolidated from %d ZeRO partitions", path, state.get("world_size", 0))
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save_extra(self, run: RunFolder, step: int) -> None:
        pass

    def weights_loaded(self) -> None:
        pass  # the optimiser updates the model's own parameters


class DeepSpeedEngine(_Engine):
    """ZeRO stage 0-2 around the same model and AdamW. Stage 3 partitions the parameters themselves, which the
    EMA target update reads whole on every rank, so it is refused at start-up."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: Config, world_size: int,
                 amp_dtype: Optional[torch.dtype] = None):
        deepspeed = import_deepspeed()
        self.ds_config = deepspeed_config(config, world_size, amp_dtype)
        self.stage = config.train.zero_stage
        self.groups = [list(g["params"]) for g in optimizer.param_groups]  # before ZeRO flattens them
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.module = self.engine.module

    def forward(self, *args):
        return self.engine(*args)

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        self.engine.step()  # a no-op until the accumulation boundary, where it clips and updates

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"optimizer": None, "scaler": None}  # partitioned: saved by save_extra

    def load_state_dict(self, state: dict, path: Path, run: RunFolder) -> None:
        tag = RunFolder.deepspeed_tag(state["step"])
        folder = run.deepspeed
        saved_world = state.get("world_size")
        same_layout = saved_world in (None, self.engine.world_size) or self.stage == 0
        if (folder / tag).is_dir() and same_layout:
            check_deepspeed_checkpoint(folder / tag)  # DeepSpeed unpickles with weights_only=False
            self.engine.load_checkpoint(str(folder), tag=tag, load_module_strict=True, load_optimizer_states=True,
                                        load_lr_scheduler_states=False, load_module_only=False)
            return
        # Another world size, or a single-process checkpoint: per-parameter moments, re-partitioned for this run.
        try:
            moments = state.get("optimizer") or consolidate(folder, tag, self.groups)
            push_into_zero(self.engine.optimizer, moments, self.groups)
            log.info("%s: AdamW moments re-partitioned from %s to %d processes", path,
                     saved_world or "a single-process run", self.engine.world_size)
        except CheckpointError:
            raise  # a file that would run code: refuse the resume, never continue past it
        except (OSError, KeyError, RuntimeError, AttributeError) as e:
            log.warning("%s: no usable optimiser state for this layout (%s): AdamW moments start from zero; weights, "
                        "EMA target, schedules, RNG and data position are restored", path, e)

    def weights_loaded(self) -> None:
        """ZeRO-1/2 updates an fp32 copy of each rank's partition, made at initialisation: weights loaded into the
        module afterwards (a resume) must reach that copy, or the next step writes the old weights back."""
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def save_extra(self, run: RunFolder, step: int) -> None:
        """Collective: every rank writes its optimiser partition."""
        self.engine.save_checkpoint(str(run.deepspeed), tag=RunFolder.deepspeed_tag(step),
                                    save_latest=False)


def make_engine(model, optimizer, config: Config, amp_dtype, dist: DistInfo, use_deepspeed: bool):
    if use_deepspeed:
        return DeepSpeedEngine(model, optimizer, config, dist.world_size, amp_dtype)
    return SingleEngine(model, optimizer, amp_dtype, config.train.clip_grad)


def release_process_groups() -> None:
    """Tear the process groups down, and forget DeepSpeed's cached handles to them (deepspeed.utils.groups keeps
    the world and data-parallel groups in module globals): a second run in the same process (a notebook, the
    device suite's rungs) would otherwise hand DeepSpeed a destroyed group ("Group ... is not registered")."""
    import sys
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
                setattr(groups, name, {} if isinstance(value, dict) else None)
