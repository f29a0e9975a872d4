"""Every file fastm2d writes goes through here, so that readers see the old file or the new one, never half of one,
and nothing is ever written through a symbolic link someone planted in a shared folder.

  atomic_file(path)     new content in a temporary file created exclusively (O_EXCL: a planted name cannot be
                        opened instead) in the target's folder, flushed to disk, then renamed over the target
  write_atomic(path, x) the same for bytes or text in one call
  open_append(path)     an append-only file (metrics, bad-file lists, manifests), opened without following links
  open_nofollow(path)   any other file kept open (locks), without following links

A link standing at the target is refused (LinkInTheWay, one line naming it). A full disk, a quota or a file-size
limit raises the OSError naming the file, after the temporary file is removed: the target is untouched, and the
command line turns it into one line, exit 1.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import LinkInTheWay, SpecialFileInTheWay

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
TEMP_PREFIX = ".fastm2d-"  # every temporary file this program writes starts so: the only ones it ever removes


def refuse_link(path: str | Path) -> None:
    if os.path.islink(path):
        raise LinkInTheWay(f"{path} is a symbolic link (to {os.readlink(path)}): fastm2d never writes through a link "
                           f"it did not create; remove the link or write somewhere else")


def _os_error(e: BaseException, path: Path) -> OSError | None:
    """The OSError behind e (torch.save wraps a full disk's in a RuntimeError), naming the target file."""
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__ or cause.__cause__
    if cause is None or isinstance(cause, LinkInTheWay):
        return None
    if cause.errno is None and "written" in str(cause):  # numpy's tofile: "N requested and M written", no errno
        return OSError(errno.ENOSPC, f"a short write ({cause})", str(path))
    return OSError(cause.errno, cause.strerror or str(cause), str(path))


def make_dirs(folder: str | Path) -> None:
    """`mkdir -p` without recursion: pathlib's and os.makedirs recurse once per missing level, and an output tree
    mirroring inputs thousands of levels deep ended in RecursionError."""
    missing, p = [], Path(folder)
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """`with atomic_file(p) as f: f.write(...)`: p holds the complete new content after the block, or its old
    content when the block raised (the temporary file is removed)."""
    path = Path(path)
    refuse_link(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        os_error = _os_error(e, path)  # a wrapped OSError (torch.save's zip writer) or a full disk: named, bare
        if os_error is not None and (not isinstance(e, OSError) or os_error.errno in DISK_FULL):
            raise os_error from None
        raise


def remove_stale_temporaries(folder: str | Path, recursive: bool = False) -> int:
    """Remove the temporary files a killed writer of this program left in `folder` (and below it; only while holding
    the folder's lock: no other writer is running): only names it makes (TEMP_PREFIX...tmp), never a user's
    `notes.tmp`. -> how many."""
    n = 0
    for p in (Path(folder).rglob if recursive else Path(folder).glob)(f"{TEMP_PREFIX}*.tmp"):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            n += 1
    return n


def write_atomic(path: str | Path, content: bytes | str) -> None:
    with atomic_file(path) as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)


def open_nofollow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symbolic link at `path` (O_NOFOLLOW), and a FIFO, socket or device (opened without
    blocking, so a FIFO planted as an output never hangs the command), with one line each; a regular file's
    descriptor comes back in blocking mode."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        if e.errno == errno.ENXIO:  # a FIFO nobody reads: opening it for writing would block forever
            raise SpecialFileInTheWay(f"{path} is a FIFO, not a regular file: fastm2d writes its outputs to regular "
                                      f"files only; remove it or write somewhere else") from None
        raise
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        what = "a FIFO" if stat.S_ISFIFO(kind) else "a socket" if stat.S_ISSOCK(kind) else "a device or folder"
        raise SpecialFileInTheWay(f"{path} is {what}, not a regular file: fastm2d writes its outputs to regular "
                                  f"files only; remove it or write somewhere else")
    os.set_blocking(fd, True)
    return fd


def open_append(path: str | Path, encoding: str = "utf-8"):
    """A text file opened for appending whole lines (O_APPEND: writes from several processes do not interleave
    within a line), created if missing, never through a link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding=encoding)
