"""Original M2D-X checkpoint formats (M2D-AS, M2D-S) load and export both ways."""

import pytest
import torch

from fastm2d.model import M2D

from .conftest import tiny_model_config


@pytest.mark.parametrize("name, loss", [("m2d_as_vit_base-80x64p16x16-240413", "bce"),
                                        ("m2d_x_vit_base-80x64p16x16-240101", "norm_mse"),
                                        ("m2d_s_vit_base-80x64p16x16-230220", "norm_mse")])
def test_original_m2dx_checkpoints_load_and_export_both_ways(tmp_path, name, loss):
    from fastm2d import load_model
    from fastm2d.checkpoint import export_original
    torch.manual_seed(6)
    src = M2D(tiny_model_config(num_heads=1, decoder_num_heads=16, off_dim=9, off_loss=loss))
    path = tmp_path / name / "checkpoint-300.pth"
    path.parent.mkdir()
    torch.save({"model": {k: v for k, v in src.state_dict().items() if k != "norm_stats"}, "epoch": 300}, path)
    loaded = load_model(path)
    assert (loaded.cfg.off_dim, loaded.cfg.off_loss) == (9, loss)
    x, target = torch.randn(2, 1, 80, 64), torch.randn(2, 4, 9) if loss == "norm_mse" else torch.rand(2, 9)
    ids = src.random_ids_shuffle(2, x.device)
    assert torch.allclose(src(x, ids, target)["loss"], loaded(x, ids, target)["loss"], atol=1e-6)
    out = export_original(path, tmp_path / "export", date="251126")
    assert out.parent.name.startswith("m2d_as_vit" if loss == "bce" else "m2d_x_vit")
    again = load_model(out)
    assert torch.equal(again.offline_predictor.weight, src.offline_predictor.weight)
