"""FLOPs per sample against a matmul-by-matmul hand count (docs/architecture.md "The speed model": ViT-B 80x608
16x16 at mask 0.7 ~ 85 GFLOP)."""
import pytest
import torch

from fastm2d.config import ModelConfig
from fastm2d.train.flops import mfu, peak_flops, train_flops_per_sample


def matmuls_of_a_layer(n, d):
    """Each matmul of a transformer layer, 2 FLOPs per multiply-add."""
    return sum([2 * n * d * 3 * d,  # qkv
                2 * n * n * d,  # q k^T over all heads
                2 * n * n * d,  # attention x v
                2 * n * d * d,  # proj
                2 * n * d * 4 * d,  # fc1
                2 * n * 4 * d * d])  # fc2


def test_vit_base_hand_count():
    n, k = 190, 57
    online = 12 * matmuls_of_a_layer(k + 1, 768)
    target = 12 * matmuls_of_a_layer(n - k + 1, 768)
    predictor = 8 * matmuls_of_a_layer(n + 1, 512) + 2 * (k + 1) * 768 * 512 + 2 * (n - k) * 512 * 768
    patch = 2 * n * 256 * 768
    hand = 3 * (online + predictor + patch) + target
    ours = train_flops_per_sample(ModelConfig())
    assert ours == pytest.approx(hand, rel=1e-9)
    assert ours / 1e9 == pytest.approx(85, rel=0.03)


def test_mfu_and_peak():
    assert mfu(4700, 85e9, 800e12) == pytest.approx(0.499, abs=1e-3)
    assert peak_flops(torch.device("cpu")) is None and mfu(10, 1e9, None) is None
    assert peak_flops(torch.device("cpu"), override_tflops=2.0) == 2e12


def test_metrics_carry_mfu_and_the_peak_used(tiny_config):
    from fastm2d.train import pretrain, read_metrics
    rows = read_metrics(pretrain(tiny_config("train.max_steps=2", "train.peak_tflops=0.5")).out_dir)
    assert all(r["peak_tflops"] == 0.5 and 0 < r["mfu"] for r in rows)
    assert rows[0]["gflop_per_sample"] == pytest.approx(
        train_flops_per_sample(tiny_config().model) / 1e9)


@pytest.mark.parametrize("card, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA GeForce RTX 4090", 165)])
def test_the_peak_is_the_exact_cards_dense_bf16_data_sheet_figure(card, tflops, monkeypatch):
    """By exact name: an H100 PCIe (756) or NVL (835) is not an SXM H100 (989), which a substring match made them."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: card)
    assert peak_flops(torch.device("cuda", 0)) == tflops * 1e12


def test_an_unknown_card_has_no_mfu_until_its_peak_is_configured(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 Super Ultra")
    with caplog.at_level("WARNING"):
        assert peak_flops(torch.device("cuda", 0)) is None
    assert "train.peak_tflops" in caplog.text and "H100 Super Ultra" in caplog.text
    assert peak_flops(torch.device("cuda", 0), override_tflops=500) == 500e12


def test_the_target_is_forty_percent_mfu_on_an_sxm_h100():
    """docs/architecture.md, README and the device suite state the target the same way: 4,700 samples/s of ViT-B
    80x608 = 40 % of the H100 SXM's 989 TFLOP/s."""
    from fastm2d.train.flops import TARGET_SAMPLES_PER_S
    assert mfu(TARGET_SAMPLES_PER_S, train_flops_per_sample(ModelConfig()), 989e12) == pytest.approx(0.40, abs=0.005)
