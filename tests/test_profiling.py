"""Profiling built in (fastm2d/phases.py, fastm2d/train/profiling.py): a profiled run's trace parses and names every
phase; profiling off makes no record_function call; the phase table adds up to the step; the tables' arithmetic
against a trace written by hand; `fastm2d report` shows it; an out-of-memory error writes a snapshot first."""
import gzip
import json
import pickle

import pytest
import torch

from fastm2d import phases
from fastm2d.errors import OutOfDeviceMemory
from fastm2d.train import Trainer
from fastm2d.train.profiling import classify, phase_table, read_trace

M2D_PHASES = {"data wait", "masking", "online forward", "predictor", "target forward", "loss", "backward",
              "optimizer", "ema", "logging"}  # all of PHASES but "offline teacher" (M2D-X teachers only)


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    from fastm2d.config import load_config

    from .conftest import TINY_TRAIN
    run = tmp_path_factory.mktemp("profiled") / "run"
    trainer = Trainer(load_config(None, [f"out_dir={run}", *TINY_TRAIN, "train.max_steps=5", "train.profile.start=2",
                                         "train.profile.steps=2", "train.peak_tflops=0.5"]))
    trainer.fit()
    return run


def test_a_profiled_run_writes_a_trace_that_names_every_phase(profiled_run):
    folder = profiled_run / "profile"
    with gzip.open(folder / "trace-rank0.json.gz", "rt") as f:
        trace = json.load(f)  # Chrome / Perfetto JSON
    names = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"}
    assert {phases.PREFIX + p for p in M2D_PHASES} <= names
    steps = [e for e in trace["traceEvents"] if e.get("name") == phases.PREFIX + phases.STEP]
    assert len(steps) == 2  # steps 2 and 3, not the warm-up ones
    assert "Self CPU" in (folder / "top_ops-rank0.txt").read_text()
    summary = json.loads((folder / "phases-rank0.json").read_text())
    assert {r["phase"] for r in summary["phases"]} == M2D_PHASES
    assert not phases.recording()  # the window closed
    rows = [json.loads(line) for line in (profiled_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "profile" in r] == [4]  # the window's row, after its last step


def test_the_phase_table_adds_up_to_the_step(profiled_run):
    """The ranges never overlap, so phases + 'between phases' is the step; the stated tolerance: Python between the
    ranges stays under 5 % of the step. The operator classes and the idle rest add up to the step too."""
    s = json.loads((profiled_run / "profile" / "phases-rank0.json").read_text())
    phases_ms = sum(r["host_ms"] for r in s["phases"])
    assert phases_ms + s["between_phases_ms"] == pytest.approx(s["step_ms"], rel=1e-3)
    assert 0 <= s["between_phases_ms"] < 0.05 * s["step_ms"]
    assert sum(r["ms"] for r in s["classes"]) == pytest.approx(s["step_ms"], rel=0.02)
    assert {"matrix products", "attention"} <= {r["class"] for r in s["classes"]}
    # the FLOPs: the model's per step, against the configured peak
    assert s["mfu"] == pytest.approx(s["flops_per_step"] / (s["step_ms"] / 1e3) / 0.5e12, rel=1e-4)  # step_ms is kept to 1 us


def test_report_shows_the_profile_and_its_picture(profiled_run):
    from fastm2d.train.report import write_report
    md = write_report(profiled_run).read_text()
    assert "## Where the step's time goes" in md and "| backward |" in md and "matrix products" in md
    assert (profiled_run / "report" / "profile.png").stat().st_size > 1000


def test_profiling_off_makes_no_record_function_call(tiny_config, monkeypatch):
    calls = []
    real = torch.profiler.record_function
    monkeypatch.setattr(torch.profiler, "record_function", lambda *a, **k: calls.append(a) or real(*a, **k))
    trainer = Trainer(tiny_config("train.max_steps=2"))
    trainer.fit()
    assert calls == [] and phases.phase("backward") is phases.phase("loss")  # one shared null context


def test_phase_table_arithmetic_on_a_trace_written_by_hand(tmp_path):
    """Two steps of 100 us; known phases and nested operators: self times by subtraction, classes by name."""
    P = phases.PREFIX

    def ev(name, cat, ts, dur, tid=1):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": tid}
    events = []
    for t0 in (0, 1000):
        events += [ev(P + "step", "user_annotation", t0, 100),
                   ev(P + "online forward", "user_annotation", t0 + 0, 40),
                   ev(P + "backward", "user_annotation", t0 + 50, 45),
                   ev("aten::linear", "cpu_op", t0 + 1, 30),  # self 30 - 25 = 5 -> matrix products
                   ev("aten::addmm", "cpu_op", t0 + 2, 25),  # self 25 -> matrix products
                   ev("aten::gelu", "cpu_op", t0 + 35, 5),  # glue
                   ev("aten::copy_", "cpu_op", t0 + 60, 10)]  # copies
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events + [{"ph": "M", "name": "process_name"}]}, f)
    s = phase_table(read_trace(path), flops_per_step=2e6, peak_flops=1e11)
    assert s["steps"] == 2 and s["step_ms"] == pytest.approx(0.1)
    assert {r["phase"]: r["host_ms"] for r in s["phases"]} == {"online forward": 0.04, "backward": 0.045}
    assert s["between_phases_ms"] == pytest.approx(0.015)
    classes = {r["class"]: r["ms"] for r in s["classes"]}
    assert classes == {"matrix products": 0.03, "copies": 0.01, "elementwise glue": 0.005,
                       "idle / outside operators": pytest.approx(0.055)}
    assert s["achieved_tflops"] == pytest.approx(2e6 / 1e-4 / 1e12) and s["mfu"] == pytest.approx(2e6 / 1e-4 / 1e11)
    assert s["mfu_if_only_matmuls"] == pytest.approx(2e6 / 3e-5 / 1e11)


@pytest.mark.parametrize("name, label", [("fastm2d::gather_rows", "fastm2d kernels"), ("_move_rows", "fastm2d kernels"),
                                          ("sm90_xmma_gemm_bf16bf16", "matrix products"), ("aten::bmm", "matrix products"),
                                          ("flash_fwd_kernel", "attention"), ("ncclDevKernel_AllReduce", "communication"),
                                          ("aten::native_layer_norm", "elementwise glue"),
                                          ("Memcpy DtoD (Device -> Device)", "copies")])
def test_operator_classes_by_name(name, label):
    assert classify(name) == label


def test_an_out_of_memory_writes_the_allocators_snapshot_then_one_line(tiny_config, monkeypatch):
    """Simulated on CPU: the step raises the CUDA out-of-memory error type; the allocator's state is what
    torch.cuda.memory._snapshot() returns there (answered here as the GPU would, with its structure)."""
    state = {"segments": [{"address": 1, "total_size": 2**30, "blocks": []}], "device_traces": [[]]}
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda *a, **k: state)
    trainer = Trainer(tiny_config("train.max_steps=3"))

    def out_of_memory(micro):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    monkeypatch.setattr(trainer, "train_step", out_of_memory)
    with pytest.raises(OutOfDeviceMemory) as e:
        trainer.fit()
    snapshot = trainer.run.profile / "oom-memory-rank0.pickle"
    line = str(e.value)
    assert "\n" not in line and "step 0" in line and str(snapshot) in line and "memory_viz" in line
    assert "train.batch_size" in line and "Tried to allocate 2.00 GiB" in line
    with open(snapshot, "rb") as f:
        assert pickle.load(f) == state
