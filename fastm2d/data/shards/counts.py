"""How many samples each streamed shard holds, for shards that other tools wrote (no fastm2d `shards.json` beside
them): webdataset's own shard index (`widsindex`: `nsamples` per shard) when `data.shard_index` names one, a number
the user gives (`data.shard_samples`, every shard the same), else one listing pass over every shard's tar headers,
in parallel threads, kept per machine in the user cache by the shard's address, size and date (a changed shard is
listed again; a `pipe:` stream, which has neither, every time), and said in the log.

A sample is what webdataset makes one: consecutive members sharing a key (the path up to the first dot of the file
name), whatever members it holds, as ShardWriter, X-ARES's write_audio_tar or any tar tool write them.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from ...atomic import write_atomic
from ...errors import DataError
from ...frontend import first_line
from ...user_cache import user_cache
from .fetching import open_stream, sample_key, shard_file_name

log = logging.getLogger("fastm2d.data")
LISTING_THREADS = 8  # shards listed at once: network-bound


def count_samples(url: str) -> int:
    """Samples in one shard, from its tar headers (members' data is skipped, not decoded)."""
    n, last = 0, None
    with open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key = sample_key(member.name)
            if key != last:
                n, last = n + 1, key
    return n


def shard_identity(url: str) -> Optional[str]:
    """What says a shard is unchanged: a file's size and modification time, an HTTP answer's length and
    Last-Modified / ETag; None for a pipe (never cached)."""
    if url.startswith("pipe:"):
        return None
    if url.startswith(("http://", "https://")):
        import urllib.request  # only for shards over HTTP
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
                stamp = r.headers.get("ETag") or r.headers.get("Last-Modified")
                length = r.headers.get("Content-Length")
        except OSError:
            return None
        return f"{length}:{stamp}" if length and stamp else None
    path = url[len("file:"):] if url.startswith("file:") else url
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def counts_from_index(urls: List[str], index: str) -> List[int]:
    """`nsamples` of each shard from a webdataset shard index (wids JSON: {"shardlist": [{"url", "nsamples"}]}),
    matched by file name."""
    try:
        with open_stream(index) as f:
            listed = json.loads(f.read())
        by_name = {shard_file_name(str(s["url"])): int(s["nsamples"]) for s in listed["shardlist"]}
    except Exception as e:  # noqa: BLE001 - any transport's or format's error: one line naming the index
        raise DataError(f"data.shard_index={index}: not a readable webdataset shard index ({first_line(e)}); "
                        f"expected JSON with a shardlist of url / nsamples") from None
    missing = [u for u in urls if shard_file_name(u) not in by_name]
    if missing:
        raise DataError(f"data.shard_index={index}: no entry for {len(missing)} of the shards, e.g. {missing[0]}")
    return [by_name[shard_file_name(u)] for u in urls]


def counts_by_listing(urls: List[str], why: str) -> List[int]:
    """Each shard listed once (in parallel), the answers kept by address + identity in the user cache."""
    cache_file = user_cache("shard_counts.json")
    try:
        cache: Dict[str, dict] = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        identities = list(pool.map(shard_identity, urls))
    known = [cache.get(u, {}).get("samples") if ident is not None and cache.get(u, {}).get("identity") == ident
             else None for u, ident in zip(urls, identities)]
    todo = [i for i, k in enumerate(known) if not isinstance(k, int)]
    if todo:
        log.info("%s: counting the samples of %d shard(s) in one listing pass (%d known from %s)", why, len(todo),
                 len(urls) - len(todo), cache_file)

        def listed(i: int) -> int:
            try:
                return count_samples(urls[i])
            except Exception as e:  # noqa: BLE001 - the transport's or the tar's error, naming the shard
                raise DataError(f"{urls[i]}: cannot be listed to count its samples ({first_line(e)}); {why}") \
                    from None
        with ThreadPoolExecutor(LISTING_THREADS) as pool:
            for i, n in zip(todo, pool.map(listed, todo)):
                known[i] = n
                if identities[i] is not None:
                    cache[urls[i]] = {"identity": identities[i], "samples": n}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache_file, json.dumps(cache))
        except OSError as e:  # a read-only home: listed again next time, nothing worse
            log.debug("cannot keep the shard counts in %s: %s", cache_file, e)
    return [int(k) for k in known]


def sample_counts(urls: List[str], why: str, index: Optional[str] = None, per_shard: int = 0) -> List[int]:
    """The samples of each shard written by another tool: the setting, the index, or the listing (in that order)."""
    if per_shard:
        log.info("%s: data.shard_samples=%d samples taken for each of %d shard(s)", why, per_shard, len(urls))
        return [per_shard] * len(urls)
    if index:
        return counts_from_index(urls, index)
    return counts_by_listing(urls, why)
