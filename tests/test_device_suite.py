"""The device suite: its CPU dry run takes the GPU run's rungs, branches and config arithmetic at small sizes, so a
typo or a config that cannot fill a batch never wastes GPU minutes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_device_suite_dry_run(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_suite.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "device_suite.json").read_text())
    assert {row["kernel"] for row in result["kernels"]} == {"l2norm_mse", "noise_mix", "gather_visible", "ema"}
    assert not [row for row in result["kernels"] if "error" in row]
    # every kernel row states the bytes it must move at minimum beside the bytes the Triton design issues
    assert all(0 < row["min_MB"] <= row["issued_MB"] for row in result["kernels"])
    from ladder import RUNGS
    assert [row["rung"] for row in result["train"]] == [name for name, _, _ in RUNGS]  # the GPU run's rungs
    failed = {row["rung"]: row["note"] for row in result["train"] if "note" in row}
    # Every rung runs on CPU but xformers, which has no CPU path (on the GPU machine it runs where installed).
    assert list(failed) == ["+fused attention (xformers)"] and "no CPU path" in failed["+fused attention (xformers)"]
    assert all(row["samples_s"] > 0 for row in result["train"] if "samples_s" in row)
    assert all("rate" in row for row in result["data"]), result["data"]
    assert r.stdout.rstrip().splitlines()[-1].startswith("| ViT-B recipe, DeepSpeed")  # the ladder is printed last
    assert (tmp_path / "device_suite.md").read_text().startswith("# fastm2d device suite")


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
            assert trainer.model.cfg.embed_dim == 768 and trainer.sampler.batches_per_epoch >= 1
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
