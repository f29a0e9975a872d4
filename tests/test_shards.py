"""Streamed tar shards (data/shards.py): written by `prepare --format shards` from real files, served by an HTTP
server on 127.0.0.1 started here, dealt disjointly to ranks and loader workers, and trained on."""
from __future__ import annotations

import functools
import http.server
import json
import tarfile
import threading

import numpy as np
import pytest
import torch

from fastm2d.cli import main
from fastm2d.data.shards import ShardCrops, ShardSource, batched, deal_shards
from fastm2d.train import pretrain, read_metrics

from .conftest import TINY_TRAIN, write_tone

pytest.importorskip("webdataset", reason="streamed shards need webdataset (the test extra)")


@pytest.fixture
def shard_folder(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(12):
        write_tone(clips / f"c{i:02d}.wav", seconds=0.5 + 0.1 * i, freq=200 + 40 * i)
    (clips / "broken.wav").write_bytes(b"RIFF....not audio")
    out = tmp_path / "shards"
    assert main(["prepare", str(clips), "--out", str(out), "--format", "shards", "--files-per-shard", "3"]) == 0
    return clips, out


@pytest.fixture
def http_base(shard_folder):
    """The shard folder served over HTTP on 127.0.0.1 (a thread of this test: no network beyond this machine)."""
    _, out = shard_folder
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_prepare_writes_the_original_bytes_and_lists_failures(shard_folder):
    clips, out = shard_folder
    manifest = json.loads((out / "shards.json").read_text())
    assert manifest["samples"] == 12 and manifest["failures"] == 1 and len(manifest["shards"]) == 4
    assert "broken.wav" in (out / "failures.tsv").read_text()
    with tarfile.open(out / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    name = json.loads(members["000000000.json"])["name"]
    assert members["000000000.wav"] == (clips / name.split("/")[-1]).read_bytes()  # no re-encoding


def test_shards_are_dealt_disjointly_to_two_ranks_of_two_workers(http_base):
    """Every shard to exactly one (rank, worker) pair per epoch, their union the whole list; the order changes
    with the epoch and is the same on every machine (seed, epoch)."""
    for epoch in range(3):
        dealt = [deal_shards(10, 42, epoch, r, 2, w, 2) for r in range(2) for w in range(2)]
        flat = sorted(k for d in dealt for k in d)
        assert flat == list(range(10))
    assert deal_shards(10, 42, 0, 0, 2, 0, 2) != deal_shards(10, 42, 1, 0, 2, 0, 2)
    # Over HTTP, two ranks with two DataLoader workers each (the ranks' code is a function of rank and world size
    # only, run here one after the other): the crops of an epoch come from disjoint samples, every sample once,
    # the same number of batches on every rank.
    src = ShardSource(f"{http_base}/shard-{{000000..000003}}.tar", 16000, 32, 0, stats_items=4)
    assert len(src) == 12
    seen = []
    for rank in range(2):
        crops = ShardCrops(src, 0, 42, rank, 2, batches=3, batch_size=2)
        batches = list(batched(torch.utils.data.DataLoader(crops, batch_size=None, num_workers=2), 2))
        assert len(batches) == 3 and all(item["lms"].shape == (1, 80, 32) for b in batches for item in b)
        seen += [item["key"] for b in batches for item in b]
    assert sorted(seen) == [f"{i:09d}" for i in range(12)]  # 2 ranks x 3 batches x 2 = every sample exactly once


def test_pretrain_streams_shards_over_http_and_resumes(http_base, tmp_path, capsys):
    run = tmp_path / "run"
    spec = f"{http_base}/shard-{{000000..000003}}.tar"
    args = ["pretrain", f"out_dir={run}", *[a for a in TINY_TRAIN if not a.startswith("data.num_workers")],
            f"data.train={spec}", "data.num_workers=2", "train.batch_size=2", "data.stats_items=6"]
    tr = pretrain_from(args + ["train.max_steps=3"])
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in read_metrics(run))
    stats = json.loads((run / "norm_stats.json").read_text())["norm_stats"]
    assert stats[1] > 0 and tr.sampler.batches_per_epoch == 12 // 2
    assert main(args + ["train.max_steps=5", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    bad = (run / "bad_training_files.txt")
    assert not bad.exists() or "broken" not in bad.read_text()  # listed at prepare time, never shipped


def pretrain_from(args):
    from fastm2d.config import load_config
    overrides = [a for a in args[1:]]
    return pretrain(load_config(None, overrides))


def test_what_shards_do_not_do_yet_is_one_line(http_base, tmp_path, capsys):
    spec = f"{http_base}/shard-{{000000..000003}}.tar"
    assert main(["pretrain", f"out_dir={tmp_path / 'r'}", *TINY_TRAIN, f"data.train={spec}",
                 "offline.task=regularize", "offline.teacher=x"]) == 2
    assert "streamed shards do not support offline.task" in capsys.readouterr().err
    assert main(["pretrain", f"out_dir={tmp_path / 'r2'}", *TINY_TRAIN,
                 f"data.train={http_base}/nothere-{{0..1}}.tar"]) == 2
    assert "shards.json" in capsys.readouterr().err


@pytest.mark.slow
def test_a_kill_9_mid_epoch_resumes_as_stated(http_base, tmp_path):
    """SIGKILL a run streaming shards over HTTP after its step-2 checkpoint; `--resume` continues from it: steps
    and the schedule exact (metrics rows 1..8 once each), the epoch's stream restarted (stated in data/shards.py)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    spec = f"{http_base}/shard-{{000000..000003}}.tar"
    args = [sys.executable, "-m", "fastm2d.cli", "pretrain", f"out_dir={run}",
            *[a for a in TINY_TRAIN if not a.startswith(("data.num_workers", "train.log_every"))],
            f"data.train={spec}", "data.num_workers=2", "train.batch_size=2", "data.stats_items=6",
            "train.save_every=2", "train.log_every=1", "train.max_steps=400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.time()
    while not (run / "checkpoint-2.pth").exists():
        assert proc.poll() is None and time.time() - t0 < 180, proc.stderr.read()[-3000:] if proc.poll() else "slow"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers, without warning
    proc.wait()
    killed_at = max(r["step"] for r in read_metrics(run))
    r = subprocess.run([*args[:-1], "train.max_steps=8", "--resume"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [row["step"] for row in read_metrics(run)]
    assert steps == list(range(1, 9)), (killed_at, steps)  # rows after the checkpoint dropped, then continued
