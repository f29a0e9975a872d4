"""Writing a file so that readers see the old one or the new one, never half of one, and never through a link.

The new content goes to a temporary file created exclusively in the target's folder (O_EXCL: a name someone
planted there cannot be opened instead), is flushed to disk, then renamed over the target. A rename replaces a
symbolic link standing at the target; it never writes into the file the link points at.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """`with atomic_file(p) as f: f.write(...)`: p holds the complete new content after the block, or its old
    content when the block raised (the temporary file is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
