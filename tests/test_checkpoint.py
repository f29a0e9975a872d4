"""Original-format interoperability, export, and atomic saving."""
from pathlib import Path

import pytest
import torch

from fastm2d import load_encoder, load_model
from fastm2d.checkpoint import CheckpointError, atomic_save, export_original, parse_original_name
from fastm2d.model import M2D

from .conftest import tiny_model_config


@pytest.mark.parametrize("name, inp, patch, sr, model", [
    ("m2d_vit_base-80x608p16x16-221006-mr7", [80, 608], [16, 16], 16000, "m2d_vit_base"),
    ("m2d_s_vit_base-80x608p80x2-230220", [80, 608], [80, 2], 16000, "m2d_s_vit_base"),
    ("m2d_as_vit_base-80x608p16x16p32k-240413_enconly", [80, 608], [16, 16], 32000, "m2d_as_vit_base"),
    ("m2d_vit_base-80x200p16x4-230529", [80, 200], [16, 4], 16000, "m2d_vit_base"),
])
def test_parse_original_names(name, inp, patch, sr, model):
    assert parse_original_name(name) == (inp, patch, sr, model)


def _original_style(tmp_path: Path, model: M2D, name: str, prefix: str = "module.") -> Path:
    """What the original code writes: {'model': state_dict, ...} in <name>/checkpoint-300.pth, no norm_stats."""
    sd = {prefix + k: v for k, v in model.state_dict().items() if k != "norm_stats"}
    path = tmp_path / name / "checkpoint-300.pth"
    path.parent.mkdir(parents=True)
    torch.save({"model": sd, "optimizer": {}, "epoch": 300, "scaler": None, "args": None}, path)
    return path


def test_original_checkpoint_loads_without_key_surgery(tmp_path):
    # The original predictor uses 16 heads and the encoder width / 64 heads: build the twin that way.
    cfg = tiny_model_config(embed_dim=128, num_heads=2, decoder_embed_dim=64, decoder_num_heads=16, input_size=[80, 608])
    src = M2D(cfg)
    path = _original_style(tmp_path, src, "m2d_vit_base-80x608p16x16-221006-mr7")
    loaded = load_model(path)
    assert loaded.norm_stats.tolist() == pytest.approx([-7.1, 4.2])  # pre-2023 weights carry none
    assert (loaded.cfg.depth, loaded.cfg.embed_dim, loaded.cfg.decoder_depth) == (2, 128, 1)
    x = torch.randn(2, 1, 80, 608)
    ids = torch.stack([torch.randperm(190) for _ in range(2)])
    assert torch.allclose(src(x, ids)["loss"], loaded(x, ids)["loss"], atol=1e-6)
    runtime = load_encoder(path)
    assert runtime.encode_lms(x).shape == (2, 38, 5 * 128)


def test_export_round_trip_and_encoder_only(tmp_path):
    src = M2D(tiny_model_config(num_heads=1, decoder_num_heads=16))
    src.norm_stats.copy_(torch.tensor([-5.0, 3.0]))
    ours = tmp_path / "run" / "checkpoint-7.pth"
    atomic_save({"model": src.state_dict(), "model_config": vars(src.cfg), "epoch": 7}, ours)
    out = export_original(ours, tmp_path / "export", date="251125")
    assert out.parent.name == "m2d_vit_tiny-80x64p16x16-251125" and out.name == "checkpoint-7.pth"
    again = load_model(out)  # read back through the original-name path only
    for k, v in src.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    enc = export_original(ours, tmp_path / "export", encoder_only=True, date="251125")
    assert enc.parent.name.endswith("_enconly")
    keys = set(torch.load(enc, weights_only=False)["model"])
    assert "blocks.0.attn.qkv.weight" in keys and not any(k.startswith(("decoder", "target", "mask")) for k in keys)
    with pytest.raises(CheckpointError, match="encoder-only"):
        load_model(enc)
    assert load_encoder(enc).encoder.norm_stats.tolist() == [-5.0, 3.0]


def test_unusable_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="junk.pth.*unreadable"):
        load_model(tmp_path / "junk.pth")
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no M2D weights"):
        load_model(tmp_path / "other.pth")
    src = M2D(tiny_model_config())
    bad = tmp_path / "weird-name" / "checkpoint-1.pth"
    bad.parent.mkdir()
    torch.save({"model": src.state_dict()}, bad)
    with pytest.raises(CheckpointError, match="weird-name"):
        load_model(bad)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-1.pth"
    atomic_save({"a": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1.pth"]  # no temporary file left behind


# ------------------------------------------------------------------------------ loading never runs code -----
class _Hostile:
    """A pickle that runs a shell command when unpickled (what a booby-trapped checkpoint's `args` holds)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def _hostile_run(tmp_path):
    """A run folder whose checkpoint is real M2D weights plus a hostile `args` entry."""
    marker = tmp_path / "PWNED"
    src = M2D(tiny_model_config())
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": src.state_dict(), "model_config": vars(src.cfg), "epoch": 1, "step": 1,
                "args": _Hostile(marker)}, run / "checkpoint-1.pth")
    return run, marker


def test_a_hostile_pickle_runs_nothing_through_any_entry_point(tmp_path, capsys):
    from fastm2d.cli import main
    from .conftest import TINY_TRAIN, write_tone
    run, marker = _hostile_run(tmp_path)
    for call in (lambda: load_model(run), lambda: load_encoder(run / "checkpoint-1.pth")):
        with pytest.raises(CheckpointError, match=r"checkpoint-1.pth: refused to load: .*(posix|os)\.system"):
            call()
    wav = str(write_tone(tmp_path / "a.wav"))
    for args in (["embed", "--weights", str(run), "--out", str(tmp_path / "f"), wav],
                 ["export", str(run), str(tmp_path / "exp")],
                 ["pretrain", f"out_dir={run}", *TINY_TRAIN, "--resume"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "refused to load" in err and "system" in err and "Traceback" not in err
    assert not marker.exists()  # nothing ran
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1.pth"]  # the run folder was left as it was


def test_original_files_with_argparse_args_still_load(tmp_path):
    import argparse
    cfg = tiny_model_config(embed_dim=128, num_heads=2, decoder_embed_dim=64, decoder_num_heads=16,
                            input_size=[80, 608])
    src = M2D(cfg)
    path = tmp_path / "m2d_vit_base-80x608p16x16-221006-mr7" / "checkpoint-300.pth"
    path.parent.mkdir()
    args = argparse.Namespace(batch_size=2048, blr=3e-4, input_size=[80, 608], data_path=Path("data/audioset_lms"))
    torch.save({"model": {k: v for k, v in src.state_dict().items() if k != "norm_stats"}, "optimizer": {},
                "epoch": 300, "scaler": {"scale": 65536.0}, "args": args}, path)
    loaded = load_model(path)
    for k, v in src.state_dict().items():
        if k != "norm_stats":
            assert torch.equal(loaded.state_dict()[k], v), k


def test_evar_fine_tuned_weights_and_the_file_name_fallback(tmp_path):
    """The original evaluation package saves `module.ar.runtime.backbone.*` (plus its head) in a file whose own
    name carries the configuration when the folder's does not."""
    src = M2D(tiny_model_config(embed_dim=128, num_heads=2, input_size=[80, 608]))
    enc = {k: v for k, v in src.state_dict().items() if k.startswith(("norm_stats", "cls_token", "pos_embed",
                                                                       "patch_embed", "blocks", "norm."))}
    state = {f"module.ar.runtime.backbone.{k}": v for k, v in enc.items()}
    state["module.head.mlp.mlp.0.weight"] = torch.zeros(10, 640)  # the task head: not encoder weights
    # The folder's name carries no configuration ("evar_results"); the file's own name does, as the original
    # runtime falls back to.
    named = tmp_path / "evar_results" / "m2d_vit_base-80x608p16x16-221006-mr7_finetuned.pth"
    named.parent.mkdir()
    torch.save(state, named)
    runtime = load_encoder(named)
    assert runtime.cfg.input_size == [80, 608] and runtime.cfg.embed_dim == 128
    for k, v in enc.items():
        assert torch.equal(runtime.encoder.state_dict()[k], v), k


def test_safetensors_export_loads_wherever_a_pth_does(tmp_path):
    from fastm2d.cli import main
    src = M2D(tiny_model_config(num_heads=1, decoder_num_heads=16))
    src.norm_stats.copy_(torch.tensor([-5.0, 3.0]))
    ours = tmp_path / "run" / "checkpoint-7.pth"
    atomic_save({"model": src.state_dict(), "model_config": vars(src.cfg), "epoch": 7}, ours)
    assert main(["export", str(ours), str(tmp_path / "exp"), "--format", "safetensors"]) == 0
    (out,) = (tmp_path / "exp").rglob("*.safetensors")
    assert out.name == "checkpoint-7.safetensors"
    from safetensors.torch import load_file
    raw = load_file(str(out))  # readable by any safetensors reader
    assert torch.equal(raw["blocks.0.attn.qkv.weight"], src.state_dict()["blocks.0.attn.qkv.weight"])
    again = load_model(out)
    for k, v in src.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert load_encoder(out.parent).encoder.norm_stats.tolist() == [-5.0, 3.0]  # a folder holding one works too
