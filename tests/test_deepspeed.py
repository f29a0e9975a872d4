"""DeepSpeed ZeRO: the generated config, start-up checks, and 2 processes (gloo, CPU) == 1 process."""
import importlib.util
import os
import shutil
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


def _one_rank(monkeypatch) -> None:
    """What a launcher sets for one process on a free port: DeepSpeed needs a process group even for one."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)


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


# Why tau = 0.5 and lr 0.05 over 12 steps: at the paper's tau (0.99995) the target moves ~1e-5 of the way per
# step, so a target that follows stale tensors (the ZeRO 1/2 bug: the EMA held `.data` that DeepSpeed re-points
# into its flat buffers) is indistinguishable from a correct one in a short run. With tau = 0.5 the target moves
# halfway to the online weights every step; the stale-tensor bug then leaves ~1e-2 between the runs.
EMA_VISIBLE = ["train.max_steps=12", "train.warmup_epochs=0.5", "train.accum_steps=2", "data.norm_stats=[-10,3.5]",
               "train.save_every=6", "train.ema_start=0.5", "train.ema_end=0.5", "train.base_lr=1.6"]  # lr 0.05
TOL = 1e-5  # measured: a correct run (ZeRO 0, 1 or 2) ~5e-7 from one process; the bug ~1e-2


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    _run(["pretrain", *TINY_TRAIN, *EMA_VISIBLE, f"out_dir={tmp / 'run'}", "train.batch_size=4",
          "train.engine=single"], 1, tmp)
    return tmp / "run"


def _weights(run, step):
    return torch.load(run / f"checkpoint-{step}.pth", weights_only=True)["model"]


def _max_diff(a, b, prefixes):
    """Largest difference over the keys with these prefixes, leaving out the attention KEY biases: softmax is
    invariant to them, so their true gradient is exactly 0 and AdamW turns fp32 rounding noise (which differs
    with the reduction order across ranks) into steps of +-lr there (measured: up to 7e-3 on a correct run)."""
    keys = [k for k in a if k.startswith(prefixes)]
    assert keys
    worst = 0.0
    for k in keys:
        d = (a[k].double() - b[k].double()).abs()
        if k.endswith("attn.qkv.bias"):
            d[d.numel() // 3: 2 * d.numel() // 3] = 0
        worst = max(worst, d.max().item())
    return worst


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not installed (pip install 'fastm2d[deepspeed]')")
@pytest.mark.parametrize("stage", [1, 2])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, stage, one_process_run):
    """Through the public CLI (torchrun): online AND EMA target weights of ZeRO-1/2 on 2 ranks == 1 process."""
    two = tmp_path / "two"
    zero = ["train.batch_size=2", "train.engine=deepspeed", f"train.zero_stage={stage}"]
    _run(["pretrain", *TINY_TRAIN, *EMA_VISIBLE, f"out_dir={two}", *zero], 2, tmp_path)
    one_rows, two_rows = read_metrics(one_process_run), read_metrics(two)
    assert [r["step"] for r in two_rows] == list(range(1, 13))
    assert [r["loss"] for r in two_rows] == pytest.approx([r["loss"] for r in one_rows], rel=1e-3, abs=1e-4)
    a, b = _weights(one_process_run, 12), _weights(two, 12)
    assert _max_diff(a, b, ("blocks.", "norm.")) < TOL  # online encoder
    assert _max_diff(a, b, ("target_blocks.", "target_norm.")) < TOL  # the EMA target: the bug's victim
    assert _max_diff(a, b, ("decoder_", "mask_token", "patch_embed", "cls_token")) < TOL
    from fastm2d import load_model
    assert load_model(two).cfg.depth == 2  # single-process tools read the DeepSpeed run

    # Resume from step 6 with the optimiser partitions: the EMA must follow the live weights after a resume too.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    (resumed / "checkpoint-12.pth").unlink()
    shutil.rmtree(resumed / "deepspeed" / "step12")
    r = _run(["pretrain", *TINY_TRAIN, *EMA_VISIBLE, f"out_dir={resumed}", *zero, "--resume"], 2, tmp_path)
    assert "moments start from zero" not in r.stderr
    assert [row["loss"] for row in read_metrics(resumed)] == pytest.approx([row["loss"] for row in two_rows],
                                                                           rel=1e-5, abs=1e-6)
    c = _weights(resumed, 12)
    assert _max_diff(b, c, ("",)) < 1e-5

    # Another world size, same global batch: 2 -> 1 (single engine) and 1 -> 2 (ZeRO). Weights, target, schedules,
    # data position AND the AdamW moments (gathered from / re-partitioned into ZeRO's per-rank slices) carry over,
    # so both resumed runs end where the uninterrupted 2-process run ends.
    single = tmp_path / "single"
    shutil.copytree(two, single)
    (single / "checkpoint-12.pth").unlink()
    r = _run(["pretrain", *TINY_TRAIN, *EMA_VISIBLE, f"out_dir={single}", "train.batch_size=4",
              "train.engine=single", "--resume"], 1, tmp_path)
    assert "moments consolidated from 2 ZeRO partitions" in r.stderr, r.stderr[-2000:]
    assert [row["step"] for row in read_metrics(single)] == list(range(1, 13))
    assert _max_diff(b, _weights(single, 12), ("",)) < TOL
    grown = tmp_path / "grown"
    shutil.copytree(one_process_run, grown)
    (grown / "checkpoint-12.pth").unlink()
    r = _run(["pretrain", *TINY_TRAIN, *EMA_VISIBLE, f"out_dir={grown}", *zero, "--resume"], 2, tmp_path)
    assert "AdamW moments re-partitioned from 1 to 2 processes" in r.stderr, r.stderr[-2000:]
    assert _max_diff(a, _weights(grown, 12), ("",)) < TOL
    r = subprocess.run([sys.executable, "-m", "fastm2d.cli", "pretrain", *TINY_TRAIN, *EMA_VISIBLE,
                        f"out_dir={single}", "train.batch_size=2", "train.engine=single", "train.max_steps=14",
                        "--resume"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "effective batch of 8" in r.stderr  # a changed global batch is refused


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not installed (pip install 'fastm2d[deepspeed]')")
def test_the_forward_under_deepspeed_runs_in_bf16_autocast(tmp_path, monkeypatch):
    """DeepSpeed re-enters autocast with enabled=False inside its forward when autocast is on outside but not in its
    config; it asks `torch.is_autocast_enabled()`, which is about CUDA only. Answered here with the CPU's state,
    the CPU run takes the GPU run's branch: the model's forward must still see bf16 autocast, and the master
    weights and the EMA target stay fp32."""
    from fastm2d.train import Trainer
    _one_rank(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cuda_only = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: cuda_only(*a) if a else cuda_only("cpu"))
    cfg = load_config(None, [f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, "train.engine=deepspeed",
                             "train.precision=bf16", "train.max_steps=2"])
    seen = []
    try:
        trainer = Trainer(cfg)
        trainer.model.register_forward_pre_hook(
            lambda m, a: seen.append((cuda_only("cpu"), torch.get_autocast_dtype("cpu"))))
        trainer.train_step([torch.randn(4, 1, 80, 64)])
    finally:
        from fastm2d.train.engine import release_process_groups
        release_process_groups()
    assert seen == [(True, torch.bfloat16)]
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # online, predictor and EMA target
    assert {p.dtype for p in trainer.model.target_parameters()} == {torch.float32}


def test_deepspeed_refuses_fp16_and_keeps_gradients_in_fp32():
    cfg = load_config(None, [])
    assert "torch_autocast" not in deepspeed_config(cfg, 8)  # fp32 runs
    bf16 = deepspeed_config(cfg, 8, torch.bfloat16)["torch_autocast"]
    assert bf16["enabled"] and bf16["dtype"] == "bfloat16" and bf16["lower_precision_safe_modules"] == []
    with pytest.raises(ConfigError, match="fp16"):
        deepspeed_config(cfg, 8, torch.float16)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not installed (pip install 'fastm2d[deepspeed]')")
def test_two_deepspeed_runs_in_one_process(tmp_path, monkeypatch):
    """A notebook (or the device suite) training twice under DeepSpeed in one process: the second run must not
    inherit DeepSpeed's cached handles to the first run's destroyed process group."""
    from fastm2d.train import pretrain
    for run in ("a", "b"):
        _one_rank(monkeypatch)
        trainer = pretrain(load_config(None, [f"out_dir={tmp_path / run}", *TINY_TRAIN, "train.engine=deepspeed",
                                              "train.max_steps=1"]))
        assert trainer.step == 1 and not torch.distributed.is_initialized()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not installed (pip install 'fastm2d[deepspeed]')")
def test_the_clap_temperature_clamp_reaches_zeros_own_fp32_copy(tmp_path, monkeypatch):
    """ZeRO-1/2 update a private fp32 copy of the weights and write it back after each step: clamping only the
    module's logit_scale (as the original does under DDP) would be undone by the next step."""
    import numpy as np

    from fastm2d.train import Trainer

    from .test_clap_training import _captioned_clips
    folder = _captioned_clips(tmp_path)
    np.savez(tmp_path / "capemb.npz", **{f"c{i}": np.full((1, 64), float(i), np.float32) for i in range(8)})
    _one_rank(monkeypatch)
    tr = Trainer(load_config(None, [f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, "train.engine=deepspeed",
                                    "train.zero_stage=2", f"data.train={folder}", "offline.task=clap",
                                    f"offline.caption_embeddings={tmp_path / 'capemb.npz'}", "data.norm_stats=[-8,4]",
                                    "train.max_steps=2"]))
    with torch.no_grad():
        tr.model.logit_scale.fill_(9.0)
    tr.engine.weights_loaded()  # as a resume would: ZeRO's copy holds 9.0 too
    tr.fit()
    opt = tr.engine.engine.optimizer
    for group, params in enumerate(opt.bit16_groups):  # one rank: its partition is the whole flat group
        offset = 0
        for p in params:
            if p is tr.model.logit_scale:
                master = opt.single_partition_of_fp32_groups[group][offset].item()
            offset += p.numel()
    from fastm2d.model.clip_loss import LOGIT_SCALE_MAX
    assert master <= LOGIT_SCALE_MAX + 1e-6 and tr.model.logit_scale.item() <= LOGIT_SCALE_MAX + 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not installed (pip install 'fastm2d[deepspeed]')")
def test_fused_adamw_under_zero_2_takes_the_cuda_branch_and_equals_foreach(tmp_path, monkeypatch):
    """On CUDA the trainer builds AdamW(fused=True) and DeepSpeed's ZeRO-2 wraps it. That branch is taken here on CPU
    (torch has a CPU fused AdamW): ZeRO keeps the fused optimiser, steps it on its flat fp32 partition, and two steps
    give the weights the default (foreach) AdamW gives, to fp32 rounding."""
    import fastm2d.train.trainer as trainer_module
    from fastm2d.train import Trainer
    from fastm2d.train.engine import release_process_groups
    weights = {}
    for fused in (True, False):
        _one_rank(monkeypatch)
        monkeypatch.setattr(trainer_module, "fused_adamw", lambda device: fused)
        tr = Trainer(load_config(None, [f"out_dir={tmp_path / str(fused)}", *TINY_TRAIN, "train.engine=deepspeed",
                                        "train.zero_stage=2", "train.max_steps=2", "data.norm_stats=[-8,4]",
                                        "train.warmup_epochs=0", "train.base_lr=1.6"]))  # lr 0.025: steps that show
        try:
            inner = tr.engine.engine.optimizer.optimizer  # the torch AdamW inside DeepSpeed's ZeRO optimiser
            assert inner.defaults["fused"] is fused
            start = tr.model.state_dict()["blocks.0.mlp.fc1.weight"].clone()
            torch.manual_seed(0)
            batches = [torch.randn(4, 1, 80, 64) for _ in range(2)]
            for b in batches:
                tr.train_step([b])
            weights[fused] = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
            assert (weights[fused]["blocks.0.mlp.fc1.weight"] - start).abs().max() > 1e-2  # the steps moved it
        finally:
            tr.close()
            release_process_groups()
    worst = _max_diff(weights[True], weights[False], ("",))  # the attention key biases left out: see _max_diff
    assert worst < TOL, worst
