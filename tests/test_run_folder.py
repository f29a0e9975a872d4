"""A run folder is never written by two processes at once, and a torn metrics line never stops a reader.

Real processes: a `pretrain` running in a subprocess while a second one and a `--resume` try the same folder;
SIGKILL of the holder leaves a stale lock that the next `--resume` takes over.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastm2d.cli import main
from fastm2d.train.metrics import append_line, read_metrics
from fastm2d.folder_lock import LOCK_NAME, RunLock, RunFolderInUse

from .conftest import TINY_TRAIN


def _pretrain(run, *extra):
    return [sys.executable, "-m", "fastm2d", "pretrain", f"out_dir={run}", *TINY_TRAIN, *extra]


def _wait_for_rows(run, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("the first run logged nothing")


@pytest.mark.slow
def test_a_second_process_is_refused_while_a_run_trains_and_a_dead_holder_is_stale(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_pretrain(run, "train.max_steps=100000", "train.save_every=2"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(run, 3, first)
        for extra in ([], ["--resume"]):  # a second run, and a resume of the running one
            second = subprocess.run(_pretrain(run, "train.max_steps=4", *extra), capture_output=True, text=True,
                                    timeout=120)
            assert second.returncode == 2, second.stderr
            line = second.stderr.strip().splitlines()[-1]
            assert f"is in use by pid {first.pid} on {socket.gethostname()}" in line, line
        steps = [r["step"] for r in read_metrics(run)]
        assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved rows
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert (run / LOCK_NAME).exists()  # left by the killed holder: stale, its flock died with it
    resumed = subprocess.run(_pretrain(run, f"train.max_steps={max(r['step'] for r in read_metrics(run)) + 2}",
                                       "--resume"), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_without_file_system_locks_the_holder_line_decides(tmp_path, monkeypatch):
    """Where flock is unsupported (ENOLCK): a live holder on this host or a recent heartbeat from another host
    refuses; a dead pid or a silent other host is stale."""
    import fastm2d.folder_lock as rl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(rl.fcntl, "flock", no_locks)
    lock_file = tmp_path / LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cases = [({"pid": live.pid, "host": socket.gethostname()}, 0, True),
                 ({"pid": dead.pid, "host": socket.gethostname()}, 0, False),
                 ({"pid": 1, "host": "elsewhere"}, 10, True),
                 ({"pid": 1, "host": "elsewhere"}, rl.HEARTBEAT_S + 60, False)]
        for holder, age, refused in cases:
            lock_file.write_text(json.dumps({**holder, "started": "earlier", "command": "fastm2d pretrain"}))
            os.utime(lock_file, (time.time() - age, time.time() - age))
            lock = RunLock(tmp_path)
            if refused:
                with pytest.raises(RunFolderInUse, match=f"pid {holder['pid']} on {holder['host']}"):
                    lock.acquire()
            else:
                lock.acquire()
                assert json.loads(lock_file.read_text())["pid"] == os.getpid()
                lock.release()
    finally:
        live.kill()
        live.wait()


def test_a_torn_last_metrics_line_is_skipped_by_resume_and_report(tmp_path, caplog):
    """The disk filled up while a row was appended: `--resume` and `report` skip the torn line and say so."""
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2"]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.7, "l')  # what a full disk leaves
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert "a torn last line skipped" in caplog.text
    assert main(["report", str(run)]) == 0
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=4", "--resume"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_an_append_the_disk_cuts_short_leaves_whole_lines(tmp_path, monkeypatch):
    from fastm2d.train.faults import CheckpointWriteError
    path = tmp_path / "metrics.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    append_line(fd, path, json.dumps({"step": 1}))
    real_write = os.write

    def half_then_full(f, data):
        real_write(f, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        append_line(fd, path, json.dumps({"step": 2, "loss": 0.5}))
    monkeypatch.setattr(os, "write", real_write)
    os.close(fd)
    assert path.read_text() == '{"step": 1}\n'
