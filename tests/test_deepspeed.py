"""DeepSpeed ZeRO: the generated config, start-up checks, and 2 processes (gloo, CPU) == 1 process."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fastm2d.config import ConfigError, load_config
from fastm2d.train import read_metrics
from fastm2d.train.engine import deepspeed_config

from .conftest import TINY_TRAIN

HAVE_DS = importlib.util.find_spec("deepspeed") is not None


def test_deepspeed_json_is_generated_from_the_config():
    cfg = load_config(None, ["train.batch_size=16", "train.accum_steps=4", "train.clip_grad=3.0", "train.zero_stage=1"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 * 4 * 8 and ds["gradient_clipping"] == 3.0
    assert ds["zero_optimization"]["stage"] == 1


def test_unsupported_settings_fail_at_start_up():
    with pytest.raises(ConfigError, match="stage 3"):
        load_config(None, ["train.zero_stage=3"])
    with pytest.raises(ConfigError, match="train.engine"):
        load_config(None, ["train.engine=horovod"])


def _run(args, nproc, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastm2d.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29517",
               "-m", "fastm2d.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not installed (pip install 'fastm2d[deepspeed]')")
@pytest.mark.parametrize("stage", [1, 2])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, stage):
    common = ["pretrain", *TINY_TRAIN, "train.max_steps=4", "train.warmup_epochs=0.5", "train.accum_steps=2",
              "data.norm_stats=[-10,3.5]", "train.save_every=2"]
    _run([*common, f"out_dir={tmp_path / 'one'}", "train.batch_size=4", "train.engine=single"], 1, tmp_path)
    _run([*common, f"out_dir={tmp_path / 'two'}", "train.batch_size=2", "train.engine=deepspeed",
          f"train.zero_stage={stage}"], 2, tmp_path)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4, abs=1e-5)
    a = torch.load(tmp_path / "one" / "checkpoint-4.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint-4.pth", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k  # online, predictor and the EMA target alike
    from fastm2d import load_model
    assert load_model(tmp_path / "two").cfg.depth == 2  # single-process tools read the DeepSpeed run

    # Resume the DeepSpeed run for two more steps, with its optimiser partitions.
    r = _run([*common[:-1], "train.max_steps=6", "train.save_every=2", f"out_dir={tmp_path / 'two'}",
              "train.batch_size=2", "train.engine=deepspeed", f"train.zero_stage={stage}", "--resume"], 2, tmp_path)
    assert "moments start from zero" not in r.stderr
    assert [row["step"] for row in read_metrics(tmp_path / "two")] == [1, 2, 3, 4, 5, 6]
