"""The device suite: its CPU dry run takes the GPU run's rungs, branches and config arithmetic at small sizes, so a
typo or a config that cannot fill a batch never wastes GPU minutes."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_device_suite_dry_run(tmp_path):
    """The order a user asks in (the recipe eager, compiled, under DeepSpeed; its profiled step; the kernels; then the
    decomposition), every rung in its own process, the one Inductor compile in the GPU rung's mode, an MFU on every
    training row, the summary line last."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_suite.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "device_suite.json").read_text())
    from device_suite import sections
    from ladder import DECOMPOSITION_RUNGS, DRY_RUN_INDUCTOR, RECIPE_RUNGS
    assert [p["section"] for p in result["plan"]] == [s[0] for s in sections()] == \
        ["recipe", "trace", "kernels", "ladder", "gpu_tests", "data"]
    assert abs(sum(p["share"] for p in result["plan"]) - 1) < 1e-9
    assert [row["rung"] for row in result["recipe"]] == [name for name, _, _ in RECIPE_RUNGS]
    assert [row["rung"] for row in result["ladder"]] == [name for name, _, _ in DECOMPOSITION_RUNGS]
    train = result["recipe"] + result["ladder"]
    assert len({row["pid"] for row in train}) == len(train) and os.getpid() not in {row["pid"] for row in train}
    failed = {row["rung"]: row["note"] for row in train if "note" in row}
    # Every rung runs on CPU but xformers, which has no CPU path (on the GPU machine it runs where installed).
    assert list(failed) == ["+fused attention (xformers)"] and "no CPU path" in failed["+fused attention (xformers)"]
    assert all(row["samples_s"] > 0 and row["mfu"] > 0 for row in train if "samples_s" in row)
    compiled = {row["rung"]: row["compile"] for row in train if "compile" in row}
    assert compiled[DRY_RUN_INDUCTOR] == "inductor (reduce-overhead)"  # Inductor's lowering of the custom ops, on CPU
    assert {c for n, c in compiled.items() if n != DRY_RUN_INDUCTOR} == {"-", "eager (default)"}
    assert {row["kernel"] for row in result["kernels"]} == {"l2norm_mse", "noise_mix", "gather_visible", "ema"}
    assert not [row for row in result["kernels"] if "error" in row]
    # every kernel row states the bytes it must move at minimum beside the bytes the Triton design issues
    assert all(0 < row["min_MB"] <= row["issued_MB"] for row in result["kernels"])
    (trace,) = result["trace"]
    assert "| backward |" in "\n".join(trace["table"]) and (tmp_path / "trace-rank0.json.gz").is_file()
    assert all("rate" in row for row in result["data"] if not row["path"].startswith("DALI")), result["data"]
    assert r.stdout.rstrip().splitlines()[-1].startswith("SUMMARY: CPU")  # the line to paste comes last
    assert "| recipe | 33% |" in (tmp_path / "device_suite.md").read_text()
    assert not (tmp_path / "row.json").exists()


def test_a_suite_with_no_mfu_fails_and_says_so(tmp_path):
    """Every row cut by the budget: no training row has an MFU, so the exit status is 1, not a green run."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_suite.py"), "--tiny", "--out", str(tmp_path),
                        "--only", "recipe", "--budget-s", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    last = r.stdout.rstrip().splitlines()[-1]
    assert last.startswith("SUMMARY:") and "recipe skipped: time budget" in last


def test_a_child_past_its_deadline_is_killed_with_what_it_started(tmp_path):
    """A hung compile (here: a sleep, and a worker it started) costs its own row: the whole process group is killed
    at the deadline and the suite goes on."""
    from device_suite import run_child
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); "
            f"open({str(tmp_path / 'worker')!r}, 'w').write(str(p.pid)); time.sleep(300)")
    t0 = time.monotonic()
    row = run_child([sys.executable, "-c", code], 3, tmp_path / "row.json")
    assert time.monotonic() - t0 < 20 and row["note"] == "killed: over its 3 s deadline"
    worker = int((tmp_path / "worker").read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]


def test_without_cuda_the_gpu_run_refuses_instead_of_reporting_a_dry_run(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_suite.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                                                                           **_python_env()})
    assert r.returncode == 2 and "--tiny" in r.stderr and not (tmp_path / "device_suite.json").exists()


def _python_env():
    import os
    return {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "VIRTUAL_ENV")}


@pytest.mark.slow
def test_every_gpu_rung_builds_its_trainer_at_the_gpu_batch(tmp_path, monkeypatch):
    """Each rung's exact GPU config (ViT-B, batch 512, the recipe's 512 x 4) constructs a Trainer here, only the
    device changed: the ladder once asked a batch of 512 from 32 clips and every GPU rung would have been skipped.
    xformers has no CPU path: that rung must fail for that reason and no other."""
    import torch

    from fastm2d.config import ConfigError
    from fastm2d.train import Trainer
    from ladder import GPU_RUN, RUNGS, _one_process_group_env, _release, rung_config
    for i, (name, overrides, recipe) in enumerate(RUNGS):
        cfg = rung_config(overrides, recipe, GPU_RUN["model"], GPU_RUN["batch"], str(tmp_path / str(i)), device="cpu")
        assert cfg.train.batch_size * cfg.train.accum_steps == (2048 if recipe else 512)
        assert cfg.train.compile_backend == "inductor"  # the GPU run compiles with Inductor
        env = _one_process_group_env() if cfg.train.engine == "deepspeed" else {}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        try:
            if "xformers" in name:
                with pytest.raises(ConfigError, match="xformers"):
                    Trainer(cfg)
                continue
            trainer = Trainer(cfg)
            assert trainer.model.cfg.embed_dim == 768 and trainer.data.sampler.batches_per_epoch >= 1
            if recipe:
                assert trainer.config.model.decoder_depth == 8 and trainer.config.data.norm_stats == [-7.1, 4.2]
            trainer.close()
            del trainer
        finally:
            _release()
            for k in env:
                monkeypatch.delenv(k)
    assert not torch.distributed.is_initialized()


def test_the_documented_device_command_keeps_the_machines_library_path():
    """The GPU machine's driver libraries are on its LD_LIBRARY_PATH: the command must add to it, as
    benchmarks/gpu_wheels.sh says, never replace it."""
    import re
    readme = (ROOT / "docs" / "kernels.md").read_text()  # "On a lent GPU machine"
    wheels = (ROOT / "benchmarks" / "gpu_wheels.sh").read_text()
    for text in (readme, wheels):
        paths = re.findall(r"LD_LIBRARY_PATH=(\S+)", text)
        assert paths and all(p.endswith(":${LD_LIBRARY_PATH:-}") for p in paths), paths


def test_the_kernel_sweep_dry_run_writes_its_csv_and_plot(tmp_path):
    """benchmarks/sweep_kernels.py --tiny: the references at small sizes; every swept size of every kernel is a row
    whose GB/s is the minimum bytes over the measured time."""
    import csv
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_kernels.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "kernel_sweep.csv").open()))
    from sweep_kernels import SWEPT, TINY_AXES
    assert len(rows) == sum(len(TINY_AXES[a]) for axes in SWEPT.values() for a in axes)
    for row in rows:
        assert row["provider"] == "eager" and float(row["ms"]) > 0
        assert abs(float(row["GB_s"]) - float(row["min_MB"]) / 1e3 / (float(row["ms"]) / 1e3)) < 1e-6 * float(row["GB_s"]) + 1e-9
    assert (tmp_path / "kernel_sweep.png").stat().st_size > 5000


def test_every_wheel_carried_to_the_gpu_machine_is_pinned():
    """--no-deps installs resolve nothing: every wheel gpu_wheels.sh collects names its version, and the pinned
    pydantic's exact pydantic-core requirement is the pinned pydantic-core (checked where this environment has that
    pydantic, as DeepSpeed's install brings it)."""
    from importlib.metadata import PackageNotFoundError, requires, version
    text = (ROOT / "benchmarks" / "gpu_wheels.sh").read_text()
    block = text[text.index("pip download"):].split("python3 -m pip wheel")[0]  # the download command's words
    names = [w for w in block.split("-d .whl", 1)[1].split() if w != "\\"]
    pins = dict(n.split("==") for n in names if "==" in n)
    assert names and len(pins) == len(names), [n for n in names if "==" not in n]
    assert {"pydantic", "pydantic-core", "xformers", "soundfile"} <= set(pins)
    assert "deepspeed==0.19.8" in text
    try:
        if version("pydantic") == pins["pydantic"]:
            core = [r for r in requires("pydantic") if r.startswith("pydantic-core")]
            assert core == [f"pydantic-core=={pins['pydantic-core']}"], core
    except PackageNotFoundError:
        pass
