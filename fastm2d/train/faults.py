"""What a month-long run on a shared cluster meets, handled in one place:

  preemption       SIGTERM / SIGINT / SIGUSR1 (what schedulers send before the kill): every rank finishes the
                   current optimiser step, they agree on it through a tiny all-reduce on a gloo side channel
                   (host memory only: no device sync), write one checkpoint together and exit 0. A second
                   signal exits at once, touching nothing (atomic saves: no checkpoint is ever half-written).
  launcher restart torchrun --max-restarts sets TORCHELASTIC_RESTART_COUNT: a restarted job resumes by itself,
                   its process group built in a key space of its own (attempt_store)
  lost rank        each rank writes its host:pid into the run folder (.ranks/); when a collective fails, the
                   survivor names the ranks whose processes are gone and the last good checkpoint
  full disk        a checkpoint that cannot be written stops the run with the folder and the space it needs;
                   the previous checkpoint and metrics.jsonl stay as they were
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..atomic import write_atomic
from ..run_folder import RunFolder
from ..folder_lock import process_alive
from ..errors import CheckpointWriteError, RankLost  # noqa: F401  (re-exported)
from ..frontend import first_line

log = logging.getLogger("fastm2d.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def launcher_restart() -> int:
    """How many times torchrun restarted this job (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def attempt_store(timeout) -> Optional[torch.distributed.Store]:
    """The launcher's store, seen through a prefix naming this attempt; None outside torchrun.

    torchrun's agent keeps ONE TCPStore for all attempts (the static rendezvous and the c10d one share it with
    the workers), and torch's env:// start writes each rank's address under the same keys every attempt. After a
    restart a rank can read a dead peer's address before the new peer overwrites it: gloo then fails with
    "Connection refused" (measured here after SIGKILL of a rank: every time with the static rendezvous, 2 of 3
    times with c10d), NCCL would hang on a stale unique id. A prefix per attempt leaves no stale keys to read.
    It relies on every agent counting the same restarts, true when the whole job restarts after a failure; a node
    that joins an elastic job (--nnodes=MIN:MAX) later counts from 0 and would not meet the others: change the
    number of nodes by relaunching with --resume instead."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return torch.distributed.PrefixStore(f"fastm2d/attempt_{launcher_restart()}", store)


class StopSignals:
    """Turns the first stop signal into a request, honoured after the current step; the second exits now."""

    def __init__(self):
        self.requested: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopSignals":
        if not _main_thread():
            return self  # signals can only be caught in the main thread (e.g. not inside a notebook worker)
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            os.write(2, f"fastm2d: second {signal.Signals(signum).name}: exiting now, checkpoints untouched\n".encode())
            os._exit(128 + signum)
        self.requested = signum
        os.write(2, f"fastm2d: {signal.Signals(signum).name} received: finishing this step, then one checkpoint "
                    f"and exit (send it again to exit at once)\n".encode())


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class Fleet:
    """The distributed side of the above: the gloo side channel and the host:pid registry in the run folder
    (plain files: readable after the launcher's store has gone, and on a shared file system from any node)."""

    def __init__(self, rank: int, world_size: int, run: RunFolder):
        self.rank, self.world_size = rank, world_size
        self.group = None
        self.registry = run.ranks
        if world_size > 1 and torch.distributed.is_initialized():
            self.group = torch.distributed.new_group(backend="gloo")  # CPU tensors: never touches the GPU stream
            self.registry.mkdir(parents=True, exist_ok=True)
            write_atomic(self.registry / str(rank), f"{socket.gethostname()}:{os.getpid()}")

    def any_stop(self, local: bool) -> bool:
        """True on every rank when any rank was asked to stop (one 1-element all-reduce per step on gloo)."""
        if self.group is None:
            return local
        flag = torch.tensor([1.0 if local else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def lost_ranks(self, wait_s: float = 0.0) -> List[int]:
        """Ranks on this host whose process no longer exists (others cannot be checked from here), waiting up to
        `wait_s` for one to show. A killed peer closes its sockets before the kernel marks it dead: the survivor's
        collective fails first, and on a busy machine the dying process can sit descheduled in between for
        seconds (measured: 2 of 8 tests on a loaded 2-core machine named no rank)."""
        deadline = time.monotonic() + wait_s
        while True:
            lost = [r for r, (host, pid) in self._registered().items()
                    if host == socket.gethostname() and not process_alive(pid)]
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(0.05)

    def _registered(self) -> Dict[int, tuple]:
        found = {}
        for r in range(self.world_size):
            try:
                host, pid = (self.registry / str(r)).read_text().rsplit(":", 1)
                found[r] = (host, int(pid))
            except (OSError, ValueError):
                continue
        return found




LOST_RANK_WAIT_S = 10.0  # how long a survivor looks for the dead peer before calling it unreachable


def lost_rank_error(fleet: Fleet, error: Exception, last_good: Optional[Path],
                    wait_s: float = LOST_RANK_WAIT_S) -> RankLost:
    lost = fleet.lost_ranks(wait_s)
    who = (f"rank {', '.join(map(str, lost))} is gone" if lost else
           "a peer rank stopped answering (on another host, or still alive but stuck)")
    return RankLost(f"{who} ({type(error).__name__}: {first_line(error, 160)}); "
                    + (f"last good checkpoint: {last_good}; " if last_good else "no checkpoint was written yet; ")
                    + _what_next())


def _what_next() -> str:
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) - launcher_restart()
    if left > 0:  # torchrun restarts the job by itself, and the restart resumes by itself
        return f"torchrun restarts the job ({left} restart{'s' * (left > 1)} left) and it resumes from there"
    return "the run folder is resumable: relaunch the same command with --resume"


def write_failure(folder: Path, needed_bytes: int, error: OSError, previous: Optional[Path]) -> CheckpointWriteError:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = -1
    return CheckpointWriteError(
        f"cannot write a checkpoint in {folder} ({error.strerror or error}): it needs about "
        f"{needed_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free there; "
        + (f"{previous} and metrics.jsonl are intact; " if previous else "metrics.jsonl is intact; ")
        + "free space (or set out_dir elsewhere and copy the folder) and relaunch with --resume")


def state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint object: the size a save needs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


__all__ = ["StopSignals", "Fleet", "RankLost", "CheckpointWriteError", "launcher_restart", "lost_rank_error",
           "write_failure", "state_bytes"]
