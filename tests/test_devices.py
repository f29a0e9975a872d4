"""Device and precision choice (fastm2d/devices.py): `auto` is bf16 where the CPU does bf16 fast, by measurement,
never by a fixed rule; a setting overrides it; the bf16 answers stay within a stated tolerance of fp32's."""
import pytest
import torch

from fastm2d import devices
from fastm2d.config import ConfigError

CPU = torch.device("cpu")


@pytest.fixture
def measured(monkeypatch):
    """Pretend the once-per-process measurement found this bf16 / fp32 speed ratio."""
    monkeypatch.delenv(devices.ENV_VAR, raising=False)

    def set_ratio(ratio):
        monkeypatch.setattr(devices, "_cpu_speedup", ratio)
    return set_ratio


def test_auto_follows_the_measured_speed_of_this_cpu(measured):
    measured(2.2)  # this project's AMD EPYC with AVX512-BF16: 409 against 180 GFLOP/s
    assert devices.autocast_dtype(CPU) is torch.bfloat16
    measured(1 / 12)  # a CPU without bf16 units: emulated, 12x slower
    assert devices.autocast_dtype(CPU) is None
    measured(1.1)  # within the noise: fp32 stays
    assert devices.autocast_dtype(CPU) is None


def test_settings_override_the_measurement(measured, monkeypatch):
    measured(2.2)
    assert devices.autocast_dtype(CPU, "fp32") is None
    monkeypatch.setenv(devices.ENV_VAR, "fp32")
    assert devices.autocast_dtype(CPU) is None and devices.autocast_dtype(CPU, "bf16") is torch.bfloat16
    monkeypatch.setenv(devices.ENV_VAR, "bf17")
    with pytest.raises(ConfigError, match="FASTM2D_PRECISION"):
        devices.autocast_dtype(CPU)
    with pytest.raises(ConfigError, match="fp16"):
        devices.autocast_dtype(CPU, "fp16")


def test_the_measurement_is_real_and_taken_once(monkeypatch):
    monkeypatch.setattr(devices, "_cpu_speedup", None)
    first = devices.cpu_bf16_speedup(size=256, repeats=2)
    assert first > 0 and devices.cpu_bf16_speedup() == first


def test_training_on_a_fast_bf16_cpu_runs_the_forward_in_bf16(measured, tiny_config):
    from fastm2d.train import Trainer
    measured(2.2)
    trainer = Trainer(tiny_config("train.max_steps=1"))
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_autocast_dtype("cpu")
                                                                     if torch.is_autocast_enabled("cpu") else None))
    trainer.train_step([torch.randn(4, 1, 80, 64)])
    trainer.close()
    assert seen == [torch.bfloat16] and trainer.amp_dtype is torch.bfloat16
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_bf16_features_are_fp32_features_within_the_stated_tolerance(tmp_path, monkeypatch):
    """What embed, tag, the interfaces and linear-eval compute on a bf16 CPU: frame features of a ViT-B-wide encoder
    (768, 4 blocks) from a 4 s clip, within 3 % (relative Frobenius error; bf16 keeps 8 bits of mantissa, ~0.4 %
    per rounding, and the error grows with depth; ViT-B measured ~0.6 %) of the fp32 features."""
    from fastm2d.checkpoint import atomic_save
    from fastm2d.model import M2D
    from fastm2d.transfer.runtime import load_encoder
    from tests.conftest import tiny_model_config
    torch.manual_seed(0)
    model = M2D(tiny_model_config(embed_dim=768, depth=4, num_heads=12, input_size=[80, 208]))
    atomic_save({"model": model.state_dict(), "model_config": model.cfg.__dict__}, tmp_path / "w.pth")
    rt = load_encoder(tmp_path / "w.pth")
    wav = torch.randn(1, 64000) * 0.1
    monkeypatch.setenv(devices.ENV_VAR, "fp32")
    with torch.no_grad(), devices.autocast(CPU):
        fp32 = rt.encode(wav, 16000).float()
    monkeypatch.setenv(devices.ENV_VAR, "bf16")
    with torch.no_grad(), devices.autocast(CPU):
        bf16 = rt.encode(wav, 16000).float()
    rel = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < rel < 0.03, rel
