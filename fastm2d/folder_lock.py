"""One process writes a folder at a time: a run folder (`pretrain`), a store (`prepare`), an output folder (`embed`,
`linear-eval`): `<folder>/.fastm2d.lock`, held while the command runs.

The lock is an flock on that file, so the kernel releases it on any exit, SIGKILL included: a lock left by a dead
process is stale by construction and simply taken over. On a shared file system Linux maps flock to POSIX
record locks, which NFS forwards to the server, so two hosts exclude each other too. Where the file system has
no locks at all (ENOLCK, EOPNOTSUPP) the holder line inside the file decides: a live process on this host, or a
heartbeat younger than HEARTBEAT_S from another host, holds it. The file is removed when the run ends.
Within one process the lock is shared (counted): Python code that builds a second Trainer on a folder while the
first object is still alive (resume tests, notebooks) is one writer at a time already.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .errors import RunFolderInUse
from .atomic import open_nofollow
from .run_folder import RunFolder

LOCK_NAME = RunFolder(".").lock.name

HEARTBEAT_S = 300.0  # without file-system locks: a holder silent for this long is taken as dead
_HELD: Dict[str, List[int]] = {}  # this process's locks: real path -> [fd, holders]


def _holder_text(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']} (since {h['started']}: {h['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    def __init__(self, folder: Path):
        self.path = RunFolder(folder).lock
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        key = os.path.realpath(self.path)
        if key in _HELD:  # this process holds it already
            _HELD[key][1] += 1
            self.fd = _HELD[key][0]
            return self
        while True:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._in_use() from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                self._check_holder_without_locks()
            try:  # the file may have been removed by the holder that just finished: lock the one that is there
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        _HELD[key] = [fd, 1]
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return self

    def _in_use(self) -> RunFolderInUse:
        return RunFolderInUse(f"{self.path.parent} is in use by {_holder_text(self.path)}: wait for it to finish, "
                              f"stop it, or choose another out_dir")

    def _check_holder_without_locks(self) -> None:
        try:
            h = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return  # empty or unreadable: nobody holds it
        if not isinstance(h, dict) or h.get("pid") == os.getpid():
            return
        same_host, pid = h.get("host") == socket.gethostname(), h.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return  # not a holder line of ours
        if (same_host and process_alive(pid)) or (not same_host and age < HEARTBEAT_S):
            raise self._in_use()

    def heartbeat(self) -> None:
        """For file systems without locks: tells other hosts the holder is alive (cheap: one utime)."""
        if self.fd is not None:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is None:
            return
        key = os.path.realpath(self.path)
        self.fd = None
        if key in _HELD:
            _HELD[key][1] -= 1
            if _HELD[key][1] > 0:
                return
            fd = _HELD.pop(key)[0]
        else:
            return
        try:
            os.unlink(self.path)  # while still holding it: see the inode check in acquire
        except OSError:
            pass
        os.close(fd)  # releases the flock


PF_EXITING = 0x4  # linux/sched.h: the task is in do_exit (a SIGKILLed rank, before it becomes a zombie)


def process_alive(pid: int) -> bool:
    """A process that exists and is neither exiting nor a zombie (a killed rank stays a zombie until its launcher
    reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # no /proc (macOS): existence is all we can tell
        return True
    return fields[0] not in ("Z", "X") and not int(fields[6]) & PF_EXITING  # state, then flags (stat(5))


@contextlib.contextmanager
def waiting_lock(path: Path):
    """An exclusive lock on `path` (a lock file beside what it guards) that WAITS for the holder instead of refusing:
    for short read-modify-write updates shared by several runs (linear-eval's results.md), where the second run must
    add its row after the first, never give up or lose it."""
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
