"""Shared fixtures: tiny model configs that run in milliseconds, and audio files written on the fly."""
from __future__ import annotations

import os
import tempfile

import torch

# Triton decides at import time whether kernels are interpreted: without CUDA, the kernel tests run on CPU
# through the NumPy interpreter (slow, so they use small grids). Set before fastm2d.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Precision `auto` is bf16 on a CPU with fast bf16 units (fastm2d/devices.py): the suite's exactness checks (N ranks
# == 1 rank, resume == uninterrupted, compiled == eager) compare fp32 runs, so `auto` means fp32 here; the bf16
# path has its own tests (tests/test_devices.py), which set the precision they test.
os.environ.setdefault("FASTM2D_PRECISION", "fp32")
# What runs share between them (file checks of a list, caption embeddings) goes to a folder of this test session,
# never to the user's cache: every session starts cold, like a new machine. Subprocesses inherit it.
os.environ["FASTM2D_CACHE"] = tempfile.mkdtemp(prefix="fastm2d-test-cache-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastm2d.config import Config, ModelConfig, load_config


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(size="tiny", embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=2, input_size=[80, 64], patch_size=[16, 16])
    base.update(kw)
    return ModelConfig(**base).resolved()


TINY_TRAIN = [
    "model.size=tiny", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
    "model.decoder_depth=1", "model.decoder_num_heads=2", "model.input_size=[80,64]",
    "data.synthetic_clips=32", "data.synthetic_seconds=1.0", "data.num_workers=0", "data.stats_items=16",
    "train.batch_size=4", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
]


@pytest.fixture
def tiny_config(tmp_path):
    def make(*overrides) -> Config:
        return load_config(None, [f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, *overrides])
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def write_tone(path, seconds=1.0, sr=16000, channels=1, freq=440.0, fmt=None):
    import soundfile as sf
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    data = np.stack([x * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else x
    sf.write(str(path), data.astype(np.float32), sr, format=fmt)
    return path


def assert_tolerance_rule(fast: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, atol: float, what: str = ""):
    """The tolerance rule (docs/architecture.md): a fast path's max-abs error against a float64 reference <= 2 x the
    plain PyTorch error in the same dtype + atol, atol relative to the reference's magnitude (gradients are ~1e-3,
    losses ~1)."""
    fast_err = (fast.double() - exact.double()).abs().max().item()
    plain_err = (plain.double() - exact.double()).abs().max().item()
    bound = 2 * plain_err + atol * max(exact.abs().max().item(), 1e-30)
    assert fast_err <= bound, f"{what}: fast error {fast_err:.3g} > 2 x plain {plain_err:.3g} + atol = {bound:.3g}"


ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}  # relative to the magnitude
DTYPES = list(ATOL)


def tone_folder(tmp_path, n: int, seconds: float, freq, listing: str, header: str, rows):
    """`tmp_path/clips`: n short tones c<i>.wav (tone i at freq(i) Hz) and a CSV `listing` whose lines for clip i are
    rows(i) (labels, captions ...) under `header`: the tests' one builder of small labelled folders."""
    folder = tmp_path / "clips"
    folder.mkdir()
    lines = [header]
    for i in range(n):
        write_tone(folder / f"c{i}.wav", seconds=seconds, freq=freq(i))
        lines += rows(i)
    (folder / listing).write_text("\n".join(lines) + "\n")
    return folder


def labelled_folder(tmp_path, n=8):
    """A folder of short tones with a multi-label labels.csv (4 classes, some clips with two)."""
    names = ["dog", "bird", "car", "rain"]
    return tone_folder(tmp_path, n, 0.7, lambda i: 200 + 150 * (i % 4), "labels.csv", "file_name,labels",
                       lambda i: [f'c{i}.wav,"{names[i % 4]}' + (',bird"' if i % 3 == 0 else '"')])


def write_m2d_checkpoint(tmp_path, name="teacher", **cfg):
    """A tiny M2D checkpoint (a teacher or a starting point) with fixed weights and statistics."""
    from fastm2d.checkpoint import atomic_save
    from fastm2d.model import M2D
    torch.manual_seed(7)
    m = M2D(tiny_model_config(**cfg))
    m.norm_stats.copy_(torch.tensor([-9.0, 3.0]))
    path = tmp_path / name / "checkpoint-1.pth"
    atomic_save({"model": m.state_dict(), "model_config": vars(m.cfg), "epoch": 1}, path)
    return path, m


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny pre-training run (with monitors), shared by the tests of one module."""
    from fastm2d.cli import main
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2", "train.eval_every=1",
                 "eval.clips=16", "data.valid=synthetic"]) == 0
    return run


def tiny_bert(folder, words, width=16):
    """A randomly initialised one-layer BERT and a WordPiece tokenizer over [PAD] [UNK] [CLS] [SEP] [MASK] + `words`,
    saved as a local model folder (the text encoders zero-shot and CLAP training load) -> (tokenizer, model)."""
    transformers = pytest.importorskip("transformers", reason="text encoders need transformers (the clap extra)")
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    # transformers 5 ignores vocab_file here (every word became [UNK]): the vocabulary itself
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(5)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=len(words), hidden_size=width,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=2 * width))
    tok.save_pretrained(str(folder))
    model.save_pretrained(str(folder))
    return tok, model.eval()
