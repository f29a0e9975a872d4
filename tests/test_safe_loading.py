"""No file fastm2d reads can run code: every unpickling goes through checkpoint.safe_load (weights_only), including
the DeepSpeed ZeRO partition files a `--resume` reads, before DeepSpeed (which unpickles them with
weights_only=False) sees them. A payload planted in a run folder is refused with one line, and runs nothing."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from fastm2d.checkpoint import CheckpointError, check_deepspeed_checkpoint, safe_load
from fastm2d.cli import main

from .conftest import TINY_TRAIN, write_tone

REPO = Path(__file__).resolve().parents[1]
UNSAFE = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                    r"torch\.serialization\.load\(|cloudpickle|dill\.")


class Payload:
    """Unpickling this calls os.system: what an attacker who can write into a run folder would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"optimizer_state_dict": Payload(marker), "module": Payload(marker)}, path)


def test_the_tree_has_one_unpickling_place():
    offenders = []
    for folder in ("fastm2d", "kernels", "benchmarks"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if UNSAFE.search(line.split("#")[0]):
                    offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    safe = [o for o in offenders if o.startswith("fastm2d/checkpoint/files.py") and "weights_only=True" in o]
    assert len(safe) == 1 and offenders == safe, "\n".join(offenders)


def test_the_payload_would_run_if_unpickled_unsafely(tmp_path):
    """The fixture is real: torch.load(weights_only=False) runs it; safe_load refuses it, naming file and call."""
    marker = tmp_path / "ran"
    plant(tmp_path / "x.pt", marker)
    with pytest.raises(CheckpointError, match=r"x\.pt: refused to load: its pickle references (posix|os)\.system"):
        safe_load(tmp_path / "x.pt")
    assert not marker.exists()
    torch.load(tmp_path / "x.pt", weights_only=False)  # noqa: the control, here in the test only
    assert marker.exists()


def _single_process_run_with_deepspeed_leftovers(tmp_path: Path) -> Path:
    """A run whose checkpoint says 'optimizer states are in DeepSpeed partitions' (as a ZeRO run writes it),
    with a payload planted where those partitions live."""
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2"]) == 0
    ckpt = run / "checkpoint-2.pth"
    state = safe_load(ckpt)
    state["optimizer"] = None
    torch.save(state, ckpt)
    plant(run / "deepspeed" / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "ran")
    return run


def test_pretrain_resume_refuses_a_planted_zero_partition(tmp_path, capsys):
    run = _single_process_run_with_deepspeed_leftovers(tmp_path)
    rows = (run / "metrics.jsonl").read_text()
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to load" in err and "system" in err
    assert not (tmp_path / "ran").exists()  # nothing ran
    assert (run / "metrics.jsonl").read_text() == rows and not (run / "checkpoint-4.pth").exists()


def test_adapt_resume_refuses_a_planted_zero_partition(tmp_path, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(4):
        write_tone(audio / f"a{i}.wav", seconds=1.0, freq=300 + 100 * i)
    weights = _single_process_run_with_deepspeed_leftovers(tmp_path / "w")
    out = tmp_path / "adapt"
    args = ["adapt", str(audio), "--from", str(weights / "checkpoint-2.pth"), "--out", str(out),
            "data.min_epoch_items=8", "train.batch_size=4", "train.accum_steps=1", "train.max_steps=2",
            "train.progress=false", "train.tensorboard=false", "data.num_workers=0", "data.stats_items=4"]
    assert main(args) == 0
    state = safe_load(out / "checkpoint-2.pth")
    state["optimizer"] = None
    torch.save(state, out / "checkpoint-2.pth")
    plant(out / "deepspeed" / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "ran2")
    assert main(args[:-6] + ["train.max_steps=3", *args[-5:], "--resume"]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not (tmp_path / "ran2").exists()


def test_the_zero_path_checks_every_file_deepspeed_would_unpickle(tmp_path):
    """DeepSpeed's own load_checkpoint unpickles with weights_only=False; the engine checks the folder first."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    folder = tmp_path / "deepspeed" / "step7"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, folder / "mp_rank_00_model_states.pt")
    check_deepspeed_checkpoint(folder)  # plain tensors pass
    plant(folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt", tmp_path / "ran")
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: refused to load"):
        check_deepspeed_checkpoint(folder)
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_a_deepspeed_resume_refuses_a_planted_file_before_deepspeed_reads_it(tmp_path):
    """The ZeRO path end to end: a one-process DeepSpeed run, a payload planted in its model-states file, and
    `--resume`: refused with one line, exit 2, nothing ran (DeepSpeed itself would unpickle it allowing code)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RESTART_COUNT",)}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29547",
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastm2d", "pretrain", f"out_dir={run}", *TINY_TRAIN, "train.engine=deepspeed",
           "data.norm_stats=[-10,3.5]"]
    first = subprocess.run([*cmd, "train.max_steps=2"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    states = run / "deepspeed" / "step2" / "mp_rank_00_model_states.pt"
    assert states.is_file()
    plant(states, tmp_path / "ran")
    second = subprocess.run([*cmd, "train.max_steps=4", "--resume"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "mp_rank_00_model_states.pt: refused to load" in second.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "ran").exists()
