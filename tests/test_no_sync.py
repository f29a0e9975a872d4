"""The step never waits for the host: device values are read on logging / checkpoint steps only."""
import pytest
import torch

from fastm2d.train import Trainer


def test_loop_reads_device_values_only_on_logging_and_checkpoint_steps(tiny_config, monkeypatch):
    tr = Trainer(tiny_config("train.max_steps=12", "train.log_every=4", "train.save_every=6"))
    reads = []
    for name in ("log_row", "check_finite"):
        real = getattr(tr, name)
        monkeypatch.setattr(tr, name, lambda *a, _real=real, _name=name, **k: (reads.append((_name, tr.step)),
                                                                                _real(*a, **k))[1])
    step_results = []
    real_step = tr.train_step
    monkeypatch.setattr(tr, "train_step", lambda mb: step_results.append(real_step(mb)) or step_results[-1])
    tr.fit()
    assert {s for _, s in reads} == {4, 6, 8, 12}  # log steps 4, 8, 12 and checkpoint steps 6, 12
    assert all(isinstance(r, torch.Tensor) and r.dim() == 0 for r in step_results)  # never a Python float


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode checks GPU syncs")
def test_train_step_has_no_host_sync_on_gpu(tiny_config):
    tr = Trainer(tiny_config("train.max_steps=10", "train.device=cuda"))
    lms = torch.randn(4, 1, 80, 64, device="cuda")
    tr.train_step([lms])  # warm-up: lazy allocations and first launches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            tr.train_step([lms, lms])
    finally:
        torch.cuda.set_sync_debug_mode(0)
