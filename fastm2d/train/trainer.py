"""The reference single-process trainer: the paper's recipe with no host synchronisation inside a step.

`Trainer.train_step` is the whole algorithm: forward/backward over the micro-batches, clip, optimiser step,
EMA. Everything else here is bookkeeping: data, schedules, logging, atomic checkpoints and exact resume.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

import torch
from omegaconf import OmegaConf
from timm.optim import param_groups_weight_decay

from .. import __version__, devices, kernels
from ..atomic import write_atomic
from ..checkpoint import init_from_weights
from ..config import Config, ConfigError, to_yaml, unseen_frames
from ..data.training_data import TrainingData, open_training_source
from ..frontend import normalize
from ..errors import TrainingDiverged  # noqa: F401  (re-exported)
from ..model import EMA, M2D, ema_tau
from ..model.attention import resolve_attention
from ..phases import phase
from ..run_folder import RunFolder
from .flops import mfu, peak_flops, train_flops_per_sample
from ..distributed import all_reduce_, dist_from_env
from ..folder_lock import RunLock
from .engine import fused_adamw, init_distributed, make_engine, release_process_groups, wants_deepspeed
from .checkpointer import Checkpointer, RandomState
from .faults import Fleet, StopSignals, launcher_restart, lost_rank_error
from .metrics import MetricsLogger, NullLogger
from .profiling import StepProfiler
from .offline import build_offline_task, final_model_config
from .schedule import lr_at, scaled_lr
from ..eval.monitor import Monitor

log = logging.getLogger("fastm2d.train")


class Batch(NamedTuple):
    """One micro-batch on the device: the model's input, the teacher's input (M2D-X teachers) and the offline
    target (labels or precomputed features); the last two are None when unused."""
    x: torch.Tensor
    teacher_x: Optional[torch.Tensor] = None
    offline: Optional[torch.Tensor] = None


class Trainer:
    def __init__(self, config: Config, resume: bool = False):
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.run = RunFolder(self.out_dir)  # every file name in it
        self.dist = dist_from_env()
        # One process per run folder (rank 0 holds it for the job): a second `pretrain` or a `--resume` of a
        # running run is refused naming the holder; released when fit() ends, or here when set-up fails.
        self.lock = RunLock(self.out_dir) if self.dist.is_main else None
        try:
            if self.lock is not None and self.out_dir.is_dir():
                self.lock.acquire()
            self._setup(config, resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (fit() does it when it ends)."""
        if self.lock is not None:
            self.lock.release()

    def _setup(self, config: Config, resume: bool) -> None:
        """The run, built part by part; each builder reads what the ones before it made."""
        resume_from = self._resume_point(resume)  # decided before anything is written
        self._build_devices()
        self._build_data()  # the offline task (M2D-X) with it: it reads the items and weights them
        self._build_model(init=resume_from is None)
        self._build_schedule()
        if resume_from is None:
            self.model.norm_stats.copy_(torch.tensor(self.data.norm_stats()))
        self._build_engine()
        t = config.train
        self.profiler = StepProfiler(t.profile, self.run.profile, self.dist.rank, self.device,
                                     self.flops_per_sample * t.batch_size * t.accum_steps, self.peak_flops)
        if resume_from is not None:
            self.checkpointer.resume(self, resume_from)
        self.mean, self.std = self.model.norm_stats.tolist()
        self._build_monitor()
        write_atomic(self.run.config, to_yaml(config))

    def _resume_point(self, resume: bool) -> Optional[Path]:
        """The checkpoint to resume from (None: a fresh run); refusals leave the run folder as it was."""
        if launcher_restart() and not resume:  # torchrun --max-restarts brought us back: continue, never restart
            log.warning("launcher restart %d: resuming from the latest complete checkpoint", launcher_restart())
            resume = True
        t = self.config.train
        self.checkpointer = Checkpointer(self.run, t.save_every, t.keep_checkpoints, self.dist.is_main)
        latest = self.checkpointer.latest()
        if latest is not None and not resume:
            raise ConfigError(f"{self.out_dir} already holds checkpoints: pass --resume to continue, "
                              f"or choose another out_dir")
        if resume and latest is None and not launcher_restart():  # a restart before the first checkpoint starts fresh
            raise ConfigError(f"--resume: {self.out_dir} holds no checkpoint to resume from; leave out --resume to "
                              f"start a new run there")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.lock is not None and self.lock.fd is None:
            self.lock.acquire()
        return latest if resume else None

    def _build_devices(self) -> None:
        """Device, precision, process groups, the fault side channel and the mask generator."""
        t = self.config.train
        self.use_deepspeed = wants_deepspeed(self.config, self.dist)
        self.device = devices.pick_device(t.device, "train.device")
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if self.use_deepspeed:
            init_distributed(self.config, self.device.type)
        self.fleet = Fleet(self.dist.rank, self.dist.world_size, self.run)  # stop agreement, lost-rank reports
        self.preempted: Optional[int] = None  # the signal that stopped fit(), if any
        # bf16 needs no loss scaling; fp16 gets a GradScaler (CUDA only)
        self.amp_dtype = devices.autocast_dtype(self.device, t.precision, "train.precision")
        # Masks come from one generator that every rank advances alike; each rank takes its samples' rows, so
        # N processes draw exactly the masks one process with the same global batch draws.
        self.mask_gen = torch.Generator(device=self.device).manual_seed(t.seed + 1)
        self.rng = RandomState(self.mask_gen, self.device)

    def _build_data(self) -> None:
        """The training items, M2D-X's offline task built on them (None for plain M2D; it makes the model config
        final and may weight the items), then the one data object the loop reads."""
        config = self.config
        source = open_training_source(config, self.dist, self.run)
        self.offline = build_offline_task(config, source, self.device)
        config.model = final_model_config(self.offline, config.model)
        self.data = TrainingData(config, source, self.dist, self.run, self.device,
                                 offline_targets=self.offline.targets if self.offline else None,
                                 sample_weights=self.offline.sample_weights if self.offline else None)

    def _build_model(self, init: bool) -> None:
        """M2D with its attention kernel, optionally compiled, and its EMA; `init`: a fresh run may start from
        train.init_from."""
        t = self.config.train
        if unseen_frames(self.config.model):
            log.warning("model.%s", unseen_frames(self.config.model))
        torch.manual_seed(t.seed)  # the same initial weights on every rank, whatever the data set-up drew
        self.model = M2D(self.config.model).to(self.device)
        if t.init_from and init:
            log.info("initialised from %s: %s", t.init_from, init_from_weights(self.model, t.init_from))
        try:
            self.model.set_attention(resolve_attention(self.config.model.attention, self.device))
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
        if t.compile:
            # The whole forward (masking, three transformers, loss) as graphs: fuses the LayerNorm / GELU /
            # residual / bias glue, keeps state-dict keys. Measured on the 2-core CPU for the demo model: 1.19x
            # eager, where compiling each block separately was 0.90x (graph boundaries at every block).
            # A mode configures Inductor only; the tracing backends take none.
            self.model.compile(backend=t.compile_backend,
                               **({"mode": t.compile_mode} if t.compile_backend == "inductor" else {}))
        self.flops_per_sample = train_flops_per_sample(self.model.cfg)
        self.peak_flops = peak_flops(self.device, t.peak_tflops)
        self.ema = EMA(self.model.target_parameters(), self.model.online_parameters())

    def _build_schedule(self) -> None:
        """Steps, warm-up and peak learning rate from the effective batch; the device-side accumulators."""
        t = self.config.train
        self.effective_batch = t.batch_size * t.accum_steps * self.dist.world_size
        steps_per_epoch = self.data.batches_per_epoch / t.accum_steps
        self.total_steps = t.max_steps or max(1, round(t.epochs * steps_per_epoch))
        self.warmup_steps = min(round(t.warmup_epochs * steps_per_epoch), self.total_steps // 2)
        self.peak_lr = scaled_lr(t.base_lr, self.effective_batch)
        self.step = 0
        # Device-side accumulators: read only on logging steps, so a step never waits for the host.
        self._loss_sum = torch.zeros((), device=self.device)
        self._nonfinite = torch.zeros((), device=self.device)
        self._terms = torch.zeros(2, device=self.device)  # loss_m2d, loss_off summed over steps
        self.step_timer = None  # optional callback(seconds of one optimiser step), e.g. `fastm2d adapt`'s plan

    def _build_engine(self) -> None:
        """AdamW (no decay on norms and biases) inside the single-process or the DeepSpeed engine."""
        t = self.config.train
        groups = param_groups_weight_decay(self.model, t.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(t.betas), fused=fused_adamw(self.device))
        self.engine = make_engine(self.model, optimizer, self.config, self.amp_dtype, self.dist, self.use_deepspeed)

    def _build_monitor(self) -> None:
        """Representation monitors every train.eval_every steps, on rank 0 only (the others wait at the next
        collective)."""
        config = self.config
        self.monitor = None
        if config.train.eval_every and self.dist.is_main:
            self.monitor = Monitor(self.model, self.data.monitor_clips(), (self.mean, self.std),
                                   config.data.sample_rate, config.train.seed, config.eval.clips, config.eval.task,
                                   self.data.validation())

    # ---------------------------------------------------------------------------------------- the step ----
    def train_step(self, micro_batches: List[Batch | torch.Tensor]) -> torch.Tensor:
        """One optimiser step over `accum_steps` micro-batches. Returns the mean loss as a device tensor."""
        with phase("optimizer"):  # before the backwards: DeepSpeed steps inside the last one
            for group in self.engine.param_groups:
                group["lr"] = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr)
        loss_sum = torch.zeros((), device=self.device)
        for mb in micro_batches:
            x, teacher_x, offline = (mb, None, None) if isinstance(mb, torch.Tensor) else mb
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                if teacher_x is not None:  # frozen teacher: no gradient, never saved
                    with phase("offline teacher"):
                        offline = self.offline.teacher(teacher_x)
                with phase("masking"):
                    ids = self.mask_ids(x.shape[0])
                out = self.engine.forward(x, ids, offline)  # the model names its own phases
            with phase("backward"):  # under DeepSpeed its optimiser step runs in the last backward
                self.engine.backward(out["loss"], len(micro_batches))
            with phase("logging"):
                loss_sum += out["loss"].detach()
                self._terms += torch.stack([out["loss_m2d"].detach(), out["loss_off"].detach()]) / len(micro_batches)
        with phase("optimizer"):
            self.engine.step()  # clip, update, zero the gradients (DeepSpeed did it in its last backward)
            if self.offline is not None and self.offline.loss == "clip":
                self.model.clamp_logit_scale()  # M2D-CLAP's temperature kept in [0, log 100], as the original
                self.engine.weights_loaded()  # ZeRO updates its own fp32 copy: it must see the clamped value
        with phase("ema"):
            self.ema.update(ema_tau(self.step, self.total_steps, self.config.train.ema_start,
                                    self.config.train.ema_end))
        self.step += 1
        return loss_sum / len(micro_batches)

    def mask_ids(self, batch: int) -> torch.Tensor:
        """This rank's rows of the global batch's random permutations (visible first)."""
        w = self.dist.world_size
        noise = torch.rand(batch * w, self.model.mask_noise_shape, generator=self.mask_gen, device=self.device)
        return self.model.ids_from_noise(noise[self.dist.rank::w])

    # ---------------------------------------------------------------------------------------- the loop ----
    def fit(self) -> None:
        t = self.config.train
        logger = MetricsLogger(self.run, self.total_steps, self.step, t.tensorboard, t.progress) \
            if self.dist.is_main else NullLogger()
        batches = self.micro_batches()
        last_time, last_step = time.perf_counter(), self.step
        first, start_step, mark = True, self.step, None
        signals = StopSignals().install()
        try:
            while self.step < self.total_steps:
                self.profiler.before_step(self.step)
                with phase("data wait"):
                    micro = [next(batches) for _ in range(t.accum_steps)]
                loss = self.train_step(micro)
                with phase("logging"):  # bookkeeping: metrics, monitors, checkpoints, the stop agreement
                    stop = self.fleet.any_stop(signals.requested is not None)  # the same answer on every rank
                    self._loss_sum += loss
                    self._nonfinite += ~torch.isfinite(loss)
                    logger.advance()
                    if self.step_timer is not None and self.step - start_step in (1, 2):  # two syncs, once per run
                        now = self.sync_time()
                        if mark is not None:  # the 2nd step alone: warm-up and compilation left out
                            self.step_timer(now - mark)
                        mark = now
                    if first and t.compile:  # report compilation apart from the step rate (one sync, once)
                        self._first_step_seconds = self.sync_time() - last_time
                        log.info("first step (torch.compile included): %.1f s", self._first_step_seconds)
                        first = False
                        # The rate leaves the compiling step out, unless it is all there is; its loss still counts,
                        # and the step goes through the bookkeeping below (a one-step run ends with its metrics row,
                        # monitor pass and checkpoint, like any other).
                        if self.step % t.log_every != 0 and self.step != self.total_steps:
                            self._loss_sum.zero_()
                            self._terms.zero_()
                            last_time, last_step = self.sync_time(), self.step
                    if self.step % t.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        logger.write(self.log_row(self.step - last_step, now - last_time))
                        last_time, last_step = now, self.step
                        if self.lock is not None:
                            self.lock.heartbeat()
                    if self.monitor is not None and (self.step % t.eval_every == 0 or self.step == self.total_steps):
                        logger.write({"step": self.step, "monitor": True, **self.monitor()})
                    if self.checkpointer.due(self.step, self.total_steps) or stop:
                        self.check_finite()
                        path = self.save()
                    if stop:
                        self.preempted = signals.requested or -1  # -1: another rank was signalled
                        if self.dist.is_main:
                            print(f"stopped by a signal after step {self.step}: {path}; continue with --resume",
                                  flush=True)
                        break
                profiled = self.profiler.after_step(self.step)
                if profiled is not None:
                    logger.write(profile_row(self.step, profiled, self.run))
        except BaseException as e:
            logger.close()
            self.close()
            if self.dist.world_size == 1:
                signals.uninstall()
            oom = self.profiler.out_of_memory(e, self.step) if isinstance(e, torch.OutOfMemoryError) else None
            try:
                self.profiler.close()  # a window the error cut short still leaves its trace
            except Exception as closing:  # never in the way of the error that ended the run
                log.warning("the profiled window could not be written: %s", closing)
            if oom is not None:  # the allocator's state is written: one line, not a traceback
                raise oom from None
            # Several ranks: the handlers stay, so the launcher's SIGTERM to the survivors cannot kill this one
            # before its error (which rank was lost, the last good checkpoint) is printed.
            if self.dist.world_size > 1 and isinstance(e, RuntimeError) and _looks_like_comm_failure(e):
                raise lost_rank_error(self.fleet, e, self.checkpointer.latest()) from None
            raise
        signals.uninstall()
        self.profiler.close()  # a window reaching past the run's last step ends with it
        logger.close()
        self.close()

    def micro_batches(self) -> Iterator[Batch]:
        """Endless micro-batches on the device from the position that `self.step` implies (so resuming continues
        the order)."""
        for item in self.data.batches(self.step * self.config.train.accum_steps):
            yield self.to_batch(item["lms"], item.get("bg"), item.get("offline"))

    def sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def to_batch(self, raw: torch.Tensor, bg: Optional[torch.Tensor] = None,
                 offline: Optional[torch.Tensor] = None) -> Batch:
        """Loader output -> the model's input, the teacher's raw log-mel (M2D-X) and the offline target, on the
        device. data.noise.direction: noisy_m2d (the paper) gives the teacher the clean crop, noisy_teacher the
        mix (de-normalised back to log-mel, since the teacher applies its own statistics)."""
        x = self.on_device(raw, bg)
        teacher_x = None
        if self.offline is not None and self.offline.teacher is not None:
            if bg is not None and self.config.data.noise.direction == "noisy_teacher":
                teacher_x, x = x * self.std + self.mean, self.on_device(raw)
            else:
                teacher_x = raw.to(self.device, non_blocking=True).float()
        if offline is not None:
            offline = offline.to(self.device, non_blocking=True)
        return Batch(x, teacher_x, offline)

    def on_device(self, raw: torch.Tensor, bg: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw log-mel crops (pinned, any float dtype) -> normalised fp32 on the training device, asynchronously;
        with background noise, the eq. 5 mix centred by each set's mean and divided by the main std."""
        x = raw.to(self.device, non_blocking=True).float()
        if bg is None:
            return normalize(x, self.mean, self.std)
        ops = kernels.select(self.config.model.kernels, self.device)
        return ops.noise_mix(x, bg.to(self.device, non_blocking=True).float(), self.data.eta, self.mean,
                             self.data.noise_mean, self.std)

    def log_row(self, steps: int, seconds: float) -> dict:
        self.check_finite()  # a logging step may synchronise; all others never do
        loss = (all_reduce_(self._loss_sum) / (max(steps, 1) * self.dist.world_size)).item()
        self._loss_sum.zero_()
        terms = (all_reduce_(self._terms) / (max(steps, 1) * self.dist.world_size)).tolist()
        self._terms.zero_()
        rate = steps * self.effective_batch / max(seconds, 1e-9)
        row = {"step": self.step, "epoch": self.step * self.config.train.accum_steps / self.data.batches_per_epoch,
               "loss": loss, "loss_m2d": terms[0], **({"loss_off": terms[1]} if self.offline else {}),
               "lr": self.engine.param_groups[0]["lr"],
               "tau": ema_tau(self.step - 1, self.total_steps, self.config.train.ema_start, self.config.train.ema_end),
               "samples_per_s": rate, "skipped_items": self.skipped_items(),
               "gflop_per_sample": self.flops_per_sample / 1e9}
        if self.peak_flops:  # the peak the MFU is measured against travels with it
            row["mfu"], row["peak_tflops"] = mfu(rate, self.flops_per_sample, self.peak_flops), self.peak_flops / 1e12
        if getattr(self, "_first_step_seconds", None) is not None:
            row["first_step_seconds"], self._first_step_seconds = self._first_step_seconds, None
        return row

    def check_finite(self) -> None:
        if all_reduce_(self._nonfinite.clone()).item() > 0:  # any rank's NaN stops every rank
            saved = self.checkpointer.latest()
            raise TrainingDiverged(
                f"the loss became NaN/inf at or before step {self.step}; training stopped. "
                + (f"Last good checkpoint: {saved}." if saved else "No checkpoint was written before it.")
                + " Try a lower train.base_lr or train.precision=fp32.")

    def skipped_items(self) -> int:
        """Items every rank substituted since the start (one collective: a logging step's)."""
        return int(all_reduce_(torch.tensor(self.data.skipped, dtype=torch.int64, device=self.device)).item())

    # ------------------------------------------------------------------ the trainer's part of a checkpoint ----
    def state_dict(self) -> dict:
        """Position, RNG and the run's description (the model, engine and data parts are the Checkpointer's to
        add)."""
        config = OmegaConf.to_container(OmegaConf.structured(self.config))
        epoch = self.step * self.config.train.accum_steps // self.data.batches_per_epoch
        return {"epoch": int(epoch), "step": self.step, "rng": self.rng.state_dict(), "args": config,
                "config": config, "model_config": asdict(self.model.cfg), "sample_rate": self.config.data.sample_rate,
                "world_size": self.dist.world_size, "effective_batch": self.effective_batch,
                "fastm2d_version": __version__}

    def load_state_dict(self, obj: dict) -> None:
        self.step = int(obj["step"])
        self.rng.load_state_dict(obj["rng"])

    def save(self) -> Path:
        return self.checkpointer.save(self)


def profile_row(step: int, summary: dict, run: RunFolder) -> dict:
    """metrics.jsonl's row for a profiled window: where its tables are, the step time and each phase's peak memory."""
    row = {"step": step, "profile": str(run.profile), "profile_step_ms": summary["step_ms"]}
    for r in summary["phases"]:
        for k in ("allocated_GiB", "reserved_GiB"):
            if k in r:
                row[f"peak_{k}/{r['phase']}"] = r[k]
    return row


def _looks_like_comm_failure(e: RuntimeError) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e).lower()
    return isinstance(e, dist_error) or any(w in text for w in ("gloo", "nccl", "connection", "peer", "timed out",
                                                                 "broken pipe"))


def pretrain(config: Config, resume: bool = False) -> Trainer:
    trainer = Trainer(config, resume=resume)
    trainer.fit()
    # Tear the process groups down before the interpreter does: PyTorch warns that a process exiting with live
    # groups may crash at exit (their C++ threads destroyed while joinable). Every rank gets here together (fit
    # ends with the same step, or the same agreed stop, and a barrier in save()).
    release_process_groups()
    return trainer
