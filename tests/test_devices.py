"""Device and precision choice (fastm2d/devices.py): `auto` is bf16 where the CPU reports bf16 units, timed (once per
machine, capped) only where it reports nothing; ranks agree; a setting overrides it; the bf16 answers stay within a
stated tolerance of fp32's."""
import json

import pytest
import torch

from fastm2d import devices
from fastm2d.config import ConfigError

CPU = torch.device("cpu")


@pytest.fixture
def measured(monkeypatch):
    """Pretend this process already decided what `auto` means on this CPU."""
    monkeypatch.delenv(devices.ENV_VAR, raising=False)

    def set_choice(choice):
        monkeypatch.setattr(devices, "_cpu_choice", choice)
    return set_choice


@pytest.fixture
def fresh_cpu(monkeypatch, tmp_path):
    """A process that has decided nothing yet, with its own user cache; bf16 products are counted."""
    monkeypatch.delenv(devices.ENV_VAR, raising=False)
    monkeypatch.setenv("FASTM2D_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(devices, "_cpu_choice", None)
    bf16_products = []
    real_mm = torch.mm

    def counting_mm(a, b, *args, **kwargs):
        if a.dtype == torch.bfloat16:
            bf16_products.append(a.shape)
        return real_mm(a, b, *args, **kwargs)
    monkeypatch.setattr(torch, "mm", counting_mm)
    return bf16_products


def test_a_cpu_reported_without_bf16_units_is_fp32_with_no_bf16_product_timed(fresh_cpu, monkeypatch):
    """The AVX2-only EPYC this project develops on: bf16 products at 0.3 GFLOP/s; timing them cost 11 s per start."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    assert devices.autocast_dtype(CPU) is None and fresh_cpu == []


@pytest.mark.parametrize("unit", ["_is_avx512_bf16_supported", "_is_amx_tile_supported"])
def test_a_cpu_reported_with_bf16_units_is_bf16_with_no_timing(fresh_cpu, monkeypatch, unit):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: unit == "_is_avx512_bf16_supported")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: unit == "_is_amx_tile_supported")
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    assert devices.autocast_dtype(CPU) is torch.bfloat16 and fresh_cpu == []


@pytest.mark.parametrize("features, want", [("fp asimd aes sve bf16 i8mm", True), ("fp asimd aes crc32", False)])
def test_arm_cpus_are_read_from_their_feature_list(monkeypatch, features, want):
    monkeypatch.setattr(devices.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(devices, "_cpuinfo", lambda: f"processor\t: 0\nFeatures\t: {features}\n")
    assert devices.cpu_bf16_units() is want


def test_an_unreported_cpu_is_timed_once_per_machine_capped_and_kept(fresh_cpu, monkeypatch, tmp_path):
    monkeypatch.setattr(devices.platform, "machine", lambda: "riscv64")
    assert devices.cpu_bf16_units() is None
    first = devices.cpu_precision()
    timed = len(fresh_cpu)
    assert first in ("bf16", "fp32") and 1 <= timed <= 4 and all(s == (256, 256) for s in fresh_cpu)  # small, capped
    assert json.loads((tmp_path / "cache" / "cpu_precision.json").read_text()) == {devices._machine_key(): first}
    monkeypatch.setattr(devices, "_cpu_choice", None)  # the next command on this machine
    assert devices.cpu_precision() == first and len(fresh_cpu) == timed  # read, not timed again


def test_auto_follows_the_choice_and_settings_override_it(measured, monkeypatch):
    measured("bf16")
    assert devices.autocast_dtype(CPU) is torch.bfloat16
    assert devices.autocast_dtype(CPU, "fp32") is None
    measured("fp32")
    assert devices.autocast_dtype(CPU) is None and devices.autocast_dtype(CPU, "bf16") is torch.bfloat16
    measured("bf16")
    monkeypatch.setenv(devices.ENV_VAR, "fp32")
    assert devices.autocast_dtype(CPU) is None
    monkeypatch.setenv(devices.ENV_VAR, "bf17")
    with pytest.raises(ConfigError, match="FASTM2D_PRECISION"):
        devices.autocast_dtype(CPU)
    with pytest.raises(ConfigError, match="fp16"):
        devices.autocast_dtype(CPU, "fp16")


def test_the_speed_measurement_is_real():
    assert devices.cpu_bf16_speedup(size=128, repeats=2) > 0


def _rank_decides(rank, world, init_file, out):
    """A rank of a 2-process gloo job whose CPU reports bf16 units on rank 0 only (a mixed cluster)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    devices._cpu_choice = None
    devices.cpu_bf16_units = lambda: rank == 0
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(str(devices.autocast_dtype(CPU, "auto")), f)
    dist.destroy_process_group()


def test_every_rank_takes_rank_zeros_precision(tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    monkeypatch.delenv(devices.ENV_VAR, raising=False)
    mp.spawn(_rank_decides, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == ["torch.bfloat16"] * 2


def test_training_on_a_fast_bf16_cpu_runs_the_forward_in_bf16(measured, tiny_config):
    from fastm2d.train import Trainer
    measured("bf16")
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


def test_the_readmes_first_api_call_runs_in_the_commands_arithmetic(measured, tmp_path):
    """`load_encoder(W).encode(...)` / `scene_embedding` once ran fp32 where `embed` and `tag` use bf16 autocast:
    the encoder now runs under the same choice (here a CPU with bf16 units), features back in fp32;
    `rt.precision = "fp32"` keeps fp32."""
    from fastm2d.checkpoint import atomic_save
    from fastm2d.model import M2D
    from fastm2d.transfer.runtime import load_encoder
    from tests.conftest import tiny_model_config
    model = M2D(tiny_model_config())
    atomic_save({"model": model.state_dict(), "model_config": model.cfg.__dict__}, tmp_path / "w.pth")
    rt = load_encoder(tmp_path / "w.pth")
    seen = []
    rt.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(torch.get_autocast_dtype("cpu")
                                                                            if torch.is_autocast_enabled("cpu") else None))
    wav = torch.randn(1, 16000) * 0.1
    measured("bf16")
    frames, clip = rt.encode(wav, 16000), rt.scene_embedding(wav, 16000)
    assert set(seen) == {torch.bfloat16} and frames.dtype == clip.dtype == torch.float32
    seen.clear()
    rt.precision = "fp32"
    assert rt.encode(wav, 16000).dtype == torch.float32 and set(seen) == {None}
