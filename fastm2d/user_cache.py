"""Where fastm2d keeps what every run may reuse, apart from any one run folder: the file checks and statistics of a
list, caption embeddings, shard listings and copies, the CPU's precision answer."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str) -> Path:
    """Where fastm2d keeps what every run may reuse (file checks of a list, caption embeddings): $FASTM2D_CACHE,
    else $XDG_CACHE_HOME/fastm2d, else ~/.cache/fastm2d."""
    base = os.environ.get("FASTM2D_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "fastm2d"
    return Path(base, *parts)
