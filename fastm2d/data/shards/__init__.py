"""Training data streamed from tar shards in the webdataset layout, for machines that share no file system: local
paths, `http(s)://` URLs or `pipe:COMMAND` (e.g. `pipe:aws s3 cp s3://bucket/shard-000001.tar -`), brace-expanded
(`.../shard-{000000..000099}.tar`). The webdataset library reads the tar streams; fastm2d decodes each sample's
audio (its original bytes: WAV, FLAC, OGG, Opus, MP3, AIFF), applies the front end and the short-clip rule, and crops.

  write_shards(SRC, OUT)   `fastm2d prepare SRC --out OUT --format shards [--labels CSV]`: checked files ->
                           shard-NNNNNN.tar of their original bytes (no re-encoding) and a JSON member (name,
                           labels), failures.tsv, and shards.json (samples per shard); `--format logmel-shards`:
                           each file's log-mel as a store holds it instead (no decoding while training)
  ShardSource(spec)        the shard list and its sample counts (shards.json beside the shards); `norm_stats`
                           and the monitors' clips (LeadingClips) from the first samples
  ShardCrops               one rank's epoch, made by its loader workers: the shards are ordered by (seed, epoch) and
                           dealt to every (rank, worker) pair, so no two read the same shard; each worker makes a
                           fixed number of crops (its shards are read again if they hold fewer), handed over in
                           chunks, so every rank makes the same number of steps and none waits at a collective
  ShardBatches             the main process's side: the chunks in one canonical order, batches, stream positions
  local_copy(spec, cache)  shards fetched once into a machine's cache as files (background noise, read at random)

Resume is exact: ShardBatches keeps, per worker, where its current chunk starts in its stream (crops made, pass over
its shards, shard, samples read) and how many of its crops went into handed-out batches; every rank's goes into
the checkpoint. A resumed epoch skips the shards its workers finished without fetching them, reads past the used
samples of the shard each was in without decoding them, drops the used crops of the chunk it was in, and
continues with the very batches the uninterrupted run would have made (crop offsets and noise numbers are a
function of (seed, epoch, rank, worker, crop number); chunks are taken in (chunk, worker) order whatever order they
arrive in). Where the launch differs (another world size or data.num_workers), the interrupted epoch restarts
from its beginning instead, with a warning: its finished steps' samples are seen once more.
A sample that cannot be decoded (or has no usable labels or caption for its offline task) is logged, listed and
replaced by the next; a shard that cannot be fetched is retried (a stream broken midway goes on after the samples
already given), then listed and skipped (the worker reads its other shards again to keep the epoch's length).

The package by job: fetching.py (addresses, tar streams, retries, local copies), counts.py (samples per shard for
shards other tools wrote), source.py (ShardSource: a sample's log-mel and crop), stream.py (ShardCrops /
ShardBatches: one rank's epoch and its resume position), writing.py (write_shards).
"""
from .fetching import MANIFEST, audio_key, fetch_samples, local_copy, manifest_address, shard_urls
from .source import LeadingClips, ShardSource, open_shards, shard_source
from .stream import POSITION_FIELDS, ShardBatches, ShardCrops, deal_shards, is_stream_position, resume_start
from .writing import write_shards

__all__ = ["MANIFEST", "audio_key", "fetch_samples", "local_copy", "manifest_address", "shard_urls", "LeadingClips",
           "ShardSource", "open_shards", "shard_source", "POSITION_FIELDS", "ShardBatches", "ShardCrops",
           "deal_shards", "is_stream_position", "resume_start", "write_shards"]
