"""Faults of long runs (issue: preemption, launcher restarts, a dead rank, a full disk, two nodes), each provoked
for real on CPU processes: signals to the running command, SIGKILL of a rank, a file-size limit."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastm2d.run_folder import RunFolder

from fastm2d.train import read_metrics
from fastm2d.train.faults import Fleet, StopSignals, lost_rank_error

from .conftest import TINY_TRAIN

HAVE_DS = importlib.util.find_spec("deepspeed") is not None
needs_ds = pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not installed (pip install 'fastm2d[deepspeed]')")
LONG = [*TINY_TRAIN, "train.max_steps=80", "train.save_every=2", "data.norm_stats=[-10,3.5]",
        "train.warmup_epochs=0.5"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                           "TORCHELASTIC_RESTART_COUNT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def _cmd(args, nproc=1, port=29531, extra=()):
    if nproc == 1 and not extra:
        return [sys.executable, "-m", "fastm2d.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
            *extra, "-m", "fastm2d.cli", *args]


def _wait_for_step(run: Path, step: int, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        if (run / "metrics.jsonl").is_file() and any(r["step"] >= step for r in read_metrics(run)):
            if (run / f"checkpoint-{step - step % 2}.pth").exists():
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def _workers(proc):
    import psutil
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "fastm2d.cli" in " ".join(c.cmdline())]


def test_a_launcher_restart_resumes_without_the_flag(tiny_config, monkeypatch):
    """torchrun --max-restarts sets TORCHELASTIC_RESTART_COUNT for the restarted workers: resume by itself."""
    from fastm2d.train import Trainer, pretrain
    cfg = tiny_config("train.max_steps=2", "data.norm_stats=[-10,3.5]")
    pretrain(cfg)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    cfg.train.max_steps = 4
    tr = Trainer(cfg)  # no resume=True: the restart count says so
    assert tr.step == 2
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(Exception, match="already holds checkpoints"):
        Trainer(cfg)


def test_the_second_signal_exits_at_once(monkeypatch):
    installed = StopSignals().install()
    try:
        assert all(signal.getsignal(s) == installed._handle for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1))
    finally:
        installed.uninstall()
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    s = StopSignals()
    s._handle(signal.SIGTERM, None)
    assert s.requested == signal.SIGTERM and exits == []
    s._handle(signal.SIGUSR1, None)
    assert exits == [128 + signal.SIGUSR1]


def test_a_peer_whose_exit_shows_late_is_still_named(tmp_path):
    """The race behind "a peer rank stopped answering" on a loaded machine: a SIGKILLed rank closes its sockets
    before the kernel marks it dead, so the survivor's collective fails while the peer still looks alive. Provoked
    here on purpose: the "dead" peer is a real process that exits 0.5 s after the collective error."""
    import socket
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        fleet = Fleet(0, 2, RunFolder(tmp_path))  # no process group: only the registry is used
        fleet.registry.mkdir()
        (fleet.registry / "0").write_text(f"{socket.gethostname()}:{os.getpid()}")
        (fleet.registry / "1").write_text(f"{socket.gethostname()}:{peer.pid}")
        error = lost_rank_error(fleet, RuntimeError("Connection reset by peer"), None)
        assert str(error).startswith("rank 1 is gone"), error
        peer.wait()
        # A peer that stays alive (stuck, or on another host) is reported as such after the wait, not named.
        (fleet.registry / "1").write_text(f"{socket.gethostname()}:{os.getppid()}")
        t0 = time.monotonic()
        error = lost_rank_error(fleet, RuntimeError("timed out"), None, wait_s=0.3)
        assert "a peer rank stopped answering" in str(error) and time.monotonic() - t0 >= 0.3
    finally:
        peer.kill()
        peer.wait()


@pytest.mark.slow
def test_preemption_checkpoints_and_resume_continues_the_curve(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(["pretrain", f"out_dir={run}", *LONG]), env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    stopped = max(int(p.stem.split("-")[1]) for p in run.glob("checkpoint-*.pth"))
    assert f"stopped by a signal after step {stopped}: {run / f'checkpoint-{stopped}.pth'}" in out
    assert stopped < 80
    # --resume continues the uninterrupted curve exactly (compared with a run that was never stopped)
    r = subprocess.run(_cmd(["pretrain", f"out_dir={run}", *LONG, "--resume"]), env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    whole = tmp_path / "whole"
    r = subprocess.run(_cmd(["pretrain", f"out_dir={whole}", *LONG]), env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0
    a, b = read_metrics(whole), read_metrics(run)
    assert [x["step"] for x in b] == list(range(1, 81))
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=1e-6, abs=1e-7)


@pytest.mark.slow
@needs_ds
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(["pretrain", f"out_dir={run}", *LONG, "train.engine=deepspeed", "train.batch_size=2"],
                                 nproc=2, port=29533), env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 3, proc)
    (w1,) = [w for w in _workers(proc) if w.environ().get("RANK") == "1"]
    w1.send_signal(signal.SIGTERM)  # only rank 1 hears it; rank 0 learns through the per-step all-reduce
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(int(p.stem.split("-")[1]) for p in run.glob("checkpoint-*.pth"))
    assert "stopped by a signal after step" in out and (run / "deepspeed" / f"step{stopped}").is_dir()


@pytest.mark.slow
@needs_ds
def test_a_dead_rank_is_named_and_the_folder_stays_resumable(tmp_path):
    # 1. Without restarts: SIGKILL rank 1; rank 0 names it and the last good checkpoint, and exits non-zero.
    run = tmp_path / "run"
    args = ["pretrain", f"out_dir={run}", *LONG, "train.engine=deepspeed", "train.batch_size=2",
            "train.dist_timeout_s=30"]
    proc = subprocess.Popen(_cmd(args, nproc=2, port=29535), env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 4, proc)
    (w1,) = [w for w in _workers(proc) if w.environ().get("RANK") == "1"]
    w1.kill()
    t0 = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "rank 1 is gone" in err and "last good checkpoint: " in err and "--resume" in err, err[-3000:]
    # 2. The folder stays resumable: the same command with --resume continues it.
    last = max(int(p.stem.split("-")[1]) for p in run.glob("checkpoint-*.pth"))
    again = [a if not a.startswith("train.max_steps") else f"train.max_steps={last + 2}" for a in args]
    r = subprocess.run(_cmd([*again, "--resume"], nproc=2, port=29537), env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "moments start from zero" not in r.stderr, r.stderr[-3000:]


@needs_ds
def test_torchrun_restarts_a_killed_rank_and_the_job_resumes_by_itself(tmp_path):
    """SIGKILL one of two ranks under `torchrun --max-restarts=1` (static rendezvous, as the README launches):
    the survivor names it, torchrun restarts both, and they resume from the last checkpoint with no flag and run to
    the end. Without a key space per attempt the restarted ranks read the dead peers' addresses from the
    launcher's store and never connect (measured: the run hung past 180 s)."""
    run = tmp_path / "run"
    args = ["pretrain", f"out_dir={run}", *LONG, "train.engine=deepspeed", "train.batch_size=2",
            "train.dist_timeout_s=30", "train.max_steps=12"]
    proc = subprocess.Popen(_cmd(args, nproc=2, port=29539, extra=["--max-restarts=1"]), env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 4, proc)
    (w1,) = [w for w in _workers(proc) if w.environ().get("RANK") == "1"]
    w1.kill()
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:  # kill the workers too: orphans of a hung run would outlive the test
        for w in _workers(proc):
            w.kill()
        proc.kill()
        raise AssertionError("the restarted job did not finish within 150 s: " + proc.communicate()[1][-3000:])
    assert proc.returncode == 0, err[-3000:]
    assert "rank 1 is gone" in err and "torchrun restarts the job (1 restart left)" in err, err[-3000:]
    assert "launcher restart 1: resuming" in err and "resumed from" in err, err[-3000:]
    resumed_at = int(err.split("resumed from")[1].split("at step ")[1].split()[0])
    assert 4 <= resumed_at < 12
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 12


@pytest.mark.slow
def test_a_full_disk_stops_with_the_space_needed_and_keeps_the_old_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(_cmd(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2",
                             "data.norm_stats=[-10,3.5]"]), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0
    before = (run / "checkpoint-2.pth").read_bytes()
    limit = len(before) // 3  # metrics lines fit, a checkpoint does not
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from fastm2d.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=4",
                        "data.norm_stats=[-10,3.5]", "--resume"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = [x for x in r.stderr.splitlines() if "error:" in x][0]
    assert f"cannot write a checkpoint in {run}" in line and "MiB" in line and "checkpoint-2.pth" in line
    assert (run / "checkpoint-2.pth").read_bytes() == before  # the good one, untouched
    assert not (run / "checkpoint-4.pth").exists() and not list(run.glob(".checkpoint-*"))
    assert [x["step"] for x in read_metrics(run)] == [1, 2, 3, 4]  # metrics.jsonl intact


@pytest.mark.slow
@needs_ds
def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path):
    """The README's multi-node commands, with both 'nodes' on 127.0.0.1."""
    common = ["pretrain", *TINY_TRAIN, "train.max_steps=6", "data.norm_stats=[-10,3.5]", "train.batch_size=2",
              "train.engine=deepspeed", "train.save_every=6"]
    one = tmp_path / "one_node"
    r = subprocess.run(_cmd([*common, f"out_dir={one}"], nproc=2, port=29539), env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    two = tmp_path / "two_nodes"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={k}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", "--master_port=29541", "-m",
                               "fastm2d.cli", *common, f"out_dir={two}"], env=_env(), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    for p in nodes:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert [r["loss"] for r in read_metrics(two)] == pytest.approx([r["loss"] for r in read_metrics(one)], rel=1e-6)
    a = torch.load(one / "checkpoint-6.pth", weights_only=True)["model"]
    b = torch.load(two / "checkpoint-6.pth", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
