"""torch.compile: no graph breaks in a block, and compiled training equals eager training on CPU."""
import pytest
import torch

from fastm2d.model.vit import Block
from fastm2d.train import pretrain, read_metrics


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_block_compiles_as_one_graph(attention):
    torch._dynamo.reset()
    blk = Block(64, 4, attention=attention)
    x = torch.randn(2, 58, 64, requires_grad=True)
    compiled = torch.compile(blk, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    out = compiled(x)
    assert torch.allclose(out, blk(x), atol=1e-6)
    out.sum().backward()


@pytest.mark.slow
def test_compiled_training_equals_eager(tiny_config, tmp_path):
    torch._dynamo.reset()
    common = ["train.max_steps=3", "train.warmup_epochs=0.5"]
    eager = pretrain(tiny_config(*common, f"out_dir={tmp_path / 'eager'}"))
    compiled = pretrain(tiny_config(*common, "train.compile=true", f"out_dir={tmp_path / 'compiled'}"))
    a = [r["loss"] for r in read_metrics(eager.out_dir)]
    rows = read_metrics(compiled.out_dir)
    b = [r["loss"] for r in rows]
    assert "first_step_seconds" in rows[0]  # compilation reported apart from the step rate
    # The first step's row is folded into the compile report; the later ones match eager step for step.
    assert b == pytest.approx(a[-len(b):], rel=1e-4, abs=1e-5)
    assert all(".." not in k and "_orig_mod" not in k for k in compiled.model.state_dict())  # keys unchanged


@pytest.mark.parametrize("resume_with_one_step_left", [False, True])
def test_a_compiled_run_whose_first_step_is_its_last_keeps_its_bookkeeping(tiny_config, tmp_path, monkeypatch,
                                                                           resume_with_one_step_left):
    """train.compile=true and the first step of this process is the run's last (max_steps=1, or a resume with one
    step left): the run must still end with its metrics row, its monitor pass and its final checkpoint. What is
    tested is the loop's bookkeeping around the compiled step, so compilation itself is replaced by a no-op (on 2
    CPU cores it takes minutes)."""
    from fastm2d.model import M2D
    monkeypatch.setattr(M2D, "compile", lambda self, **kw: None)
    run = tmp_path / "run"
    monitor = ["train.eval_every=1", "eval.clips=8"]
    if resume_with_one_step_left:
        pretrain(tiny_config(f"out_dir={run}", "train.max_steps=2", "train.save_every=1"))  # eager, 2 steps
        (run / "checkpoint-2.pth").unlink()  # as if stopped after step 1: one step left
        trainer = pretrain(tiny_config(f"out_dir={run}", "train.max_steps=2", "train.save_every=1000",
                                       "train.compile=true", *monitor), resume=True)
        last = 2
    else:
        trainer = pretrain(tiny_config(f"out_dir={run}", "train.max_steps=1", "train.save_every=1000",
                                       "train.compile=true", *monitor))
        last = 1
    assert trainer.step == last
    train_rows = read_metrics(run)
    assert train_rows[-1]["step"] == last and "first_step_seconds" in train_rows[-1]
    assert train_rows[-1]["loss"] > 0  # the step's own loss, not an emptied sum
    assert [r["step"] for r in read_metrics(run, monitors=True)][-1:] == [last]
    assert (run / f"checkpoint-{last}.pth").is_file()
