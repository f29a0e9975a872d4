"""Reading streamed shards over any transport: where they are (brace-expanded paths, `http(s)://` URLs, `pipe:`
commands; shards.json beside the first), their tar streams read member by member with a bound on each member
and on a stalled stream, a shard's samples fetched again where its stream breaks off, and a small set fetched
once into a machine's cache (background noise, read at random)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Iterator, List, Optional

from ...atomic import write_atomic
from ...errors import DataError
from ...frontend import first_line
from ..sources import AUDIO_EXTS, sample_name

log = logging.getLogger("fastm2d.data")
MANIFEST = "shards.json"
AUDIO_KEYS = tuple(sorted(e.lstrip(".") for e in AUDIO_EXTS))  # a sample's audio member: what files may hold
FETCH_TRIES = 3


def webdataset_module():
    try:
        import webdataset
    except ImportError:
        raise DataError("streamed shards need webdataset: pip install 'fastm2d[shards]'") from None
    return webdataset


MAX_MEMBER_BYTES = 256 << 20  # one tar member read into memory at most: a 1 GiB member (a gzip bomb) is refused
TOO_LARGE = "__too_large__"  # the suffix under which a sample carries why a member of it was not read


def stall_seconds() -> float:
    """A stream that delivers less than a byte a second for this long is broken (curl --speed-time), never waited on
    forever; FASTM2D_STALL_SECONDS overrides the 60 s."""
    try:
        return max(1.0, float(os.environ.get("FASTM2D_STALL_SECONDS", "60")))
    except ValueError:
        return 60.0


def open_stream(url: str):
    """A shard or file in any transport webdataset opens (a path, http(s)://, pipe:CMD), as a binary stream; over
    HTTP with webdataset's curl command plus a stall limit (a server that stops sending mid-shard once made the
    statistics wait forever)."""
    webdataset = webdataset_module()
    if url.startswith(("http://", "https://")):
        from webdataset.gopen import Pipe
        # no curl retries: fetch_samples tries a shard again itself, going on after the samples already given
        cmd = ["curl", "--connect-timeout", "30", "--speed-limit", "1", "--speed-time", str(int(stall_seconds())),
               "-f", "-s", "-L", url]
        return Pipe(cmd, mode="rb", bufsize=8192, ignore_status=[141, 23])
    return webdataset.gopen(url, "rb")


def tar_samples(url: str):
    """A shard's samples as webdataset groups them (members sharing a key; `__key__`, `__url__`, one entry per
    suffix), read with a bound: a member larger than MAX_MEMBER_BYTES is not read (its header says so first), and
    its sample carries TOO_LARGE instead. Links, folders and metadata members are skipped, as webdataset does."""
    stream = open_stream(url)
    try:
        def members():
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    name = info.name
                    if not info.isreg() or name is None or re.match(r"__[^/]*__($|/)", name):
                        continue
                    if info.size > MAX_MEMBER_BYTES:
                        note = f"{name}: {info.size} bytes, over the {MAX_MEMBER_BYTES >> 20} MiB a member may hold"
                        yield {"fname": f"{sample_key(name)}.{TOO_LARGE}", "data": note.encode(), "__url__": url}
                        continue
                    yield {"fname": name, "data": tar.extractfile(info).read(), "__url__": url}
                    tar.members = []  # a stream of millions of members: keep no list
        yield from webdataset_module().tariterators.group_by_keys(members())
    finally:
        stream.close()


def _shard_word(address: str) -> Optional[str]:
    """The part of a shard's address that names its file: the address, or in a `pipe:` command the word holding
    `.tar` (`pipe:aws s3 cp s3://b/x/shard-000000.tar -` -> `s3://b/x/shard-000000.tar`)."""
    if not address.startswith("pipe:"):
        return address
    return next((word for word in address.split() if ".tar" in word), None)


def shard_file_name(address: str) -> str:
    """A shard's file name, as shards.json and webdataset's index list it."""
    return (_shard_word(address) or address).rsplit("/", 1)[-1]


def sample_key(member: str) -> str:
    """webdataset's sample key of a tar member: the path up to the first dot of its file name."""
    folder, _, name = member.rpartition("/")
    return (folder + "/" if folder else "") + name.split(".", 1)[0]


def shard_urls(spec: str) -> List[str]:
    from braceexpand import braceexpand  # webdataset's dependency: optional, like it
    return list(braceexpand(str(spec)))


def manifest_address(first_shard: str) -> str:
    """Where shards.json is: beside the first shard, in the same transport (a path, a URL, or the same pipe command
    with the shard's file name replaced: `pipe:aws s3 cp s3://b/x/shard-000000.tar -` -> `... s3://b/x/shards.json
    -`)."""
    word = _shard_word(first_shard)
    if word is None:
        raise DataError(f"{first_shard}: a pipe: command with no .tar in it: cannot tell where {MANIFEST} is")
    folder = word[:len(word) - len(shard_file_name(first_shard))]
    return first_shard.replace(word, folder + MANIFEST, 1)


def audio_key(sample: dict) -> Optional[str]:
    """The member of a sample that holds its audio (named by the file's suffix), or None."""
    return next((k for k in AUDIO_KEYS if k in sample), None)


def fetch_samples(url: str) -> Iterator[dict]:
    """A shard's samples, its stream opened again (up to FETCH_TRIES times) when it cannot be opened or breaks
    off; a retry goes on after the samples already given, never repeats them. DataError after the last try."""
    given = 0
    for attempt in range(FETCH_TRIES):
        try:
            for n, sample in enumerate(tar_samples(url)):
                if n >= given:
                    given += 1
                    yield sample
            return
        except Exception as e:  # noqa: BLE001 - network, pipe, tar: any failure of the transport
            reason = f"{url}: cannot be read ({first_line(e)})"
            if attempt + 1 < FETCH_TRIES:
                log.warning("%s; trying again", reason)
                time.sleep(0.5 * (attempt + 1))
    raise DataError(f"{reason} after {FETCH_TRIES} tries")


def local_copy(spec: str, cache: Path) -> Path:
    """The audio of every sample of the shards `spec` as files in a folder of `cache` (its original bytes), fetched
    once per machine and reused (`complete.json` marks a finished copy): a small set that every loader worker
    reads at random, such as M2D-X's background noise, from storage the nodes do not share."""
    urls = shard_urls(spec)
    folder = Path(cache) / hashlib.sha256(str(spec).encode()).hexdigest()[:20]
    done = folder / "complete.json"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    files = 0
    for k, url in enumerate(urls):
        for sample in fetch_samples(url):
            key = audio_key(sample)
            if key is None:
                log.warning("skipping %s: no audio member", sample_name(sample))
                continue
            stem = str(sample['__key__']).replace('/', '_')
            if len(stem.encode()) > 120:  # a member name past what a file system takes (255 bytes): a digest of it
                stem = stem.encode()[:60].decode(errors="ignore") + "-" + hashlib.sha256(stem.encode()).hexdigest()[:16]
            name = f"{k:06d}-{stem}.{key}"
            write_atomic(folder / name, sample[key])
            files += 1
    write_atomic(done, json.dumps({"spec": str(spec), "shards": len(urls), "files": files}))
    log.info("%s: %d files copied to %s", spec, files, folder)
    return folder
