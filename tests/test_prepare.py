"""`fastm2d prepare` and LogMelStore: equality with the reference front end, resume, failures, damage checks."""
import json

import numpy as np
import pytest
import torch

from fastm2d.data import DataError, LogMelStore
from fastm2d.data.prepare import prepare
from fastm2d.frontend import LogMelSpectrogram, read_audio
from fastm2d.train import pretrain, read_metrics

from .conftest import write_tone


@pytest.fixture
def audio_dir(tmp_path):
    d = tmp_path / "audio"
    d.mkdir()
    write_tone(d / "a_tone.wav", seconds=7.0)
    write_tone(d / "b_stereo_44k.flac", seconds=6.5, sr=44100, channels=2, fmt="FLAC", freq=880)
    write_tone(d / "c_short.ogg", seconds=0.3, fmt="OGG", freq=300)
    import soundfile as sf
    sf.write(str(d / "d_silent.wav"), np.zeros(16000 * 7, dtype=np.float32), 16000)
    (d / "e_empty.wav").write_bytes(b"")
    (d / "f_corrupt.flac").write_bytes(b"garbage" * 100)
    (d / "g_text.wav").write_text("not audio at all")
    np.save(d / "h_original.npy", np.random.randn(1, 80, 700).astype(np.float32))
    np.save(d / "i_bad_shape.npy", np.zeros((2, 3), dtype=np.float32))
    full = (d / "a_tone.wav").read_bytes()
    (d / "j_truncated.wav").write_bytes(full[: len(full) // 3])  # header promises 7 s, 2.3 s are there
    nan = np.zeros(16000, dtype=np.float32)
    nan[100] = np.nan
    sf.write(str(d / "k_nan.wav"), nan, 16000, subtype="FLOAT")
    (d / "l_header_only.wav").write_bytes(full[:60])  # libsndfile reads 8 samples: no patch of real audio
    return d


def test_prepare_matches_the_reference_front_end(audio_dir, tmp_path):
    out = tmp_path / "store"
    summary = prepare(str(audio_dir), out, workers=2, files_per_shard=3, dtype="float32", stats_items=50,
                      progress=False)
    assert summary["items"] == 5 and summary["failures"] == 7 and summary["shards"] == 4
    store = LogMelStore(out)
    assert len(store) == 5
    fe = LogMelSpectrogram(16000)
    for name in ("a_tone.wav", "b_stereo_44k.flac"):
        i = [n.endswith(name) for n in store.names].index(True)
        ref = fe(read_audio(audio_dir / name, 16000)).numpy()
        np.testing.assert_allclose(store[i], ref, atol=1e-5)
    short = store[[n.endswith("c_short.ogg") for n in store.names].index(True)]
    assert short.shape == (80, int(6.1 * 16000) // 160 + 1)  # zero-padded to 6.1 s like the original
    npy = store[[n.endswith("h_original.npy") for n in store.names].index(True)]
    np.testing.assert_array_equal(npy, np.load(audio_dir / "h_original.npy")[0])
    failures = (out / "failures.tsv").read_text()
    for name, reason in [("e_empty.wav", "empty"), ("f_corrupt.flac", "decode"), ("g_text.wav", "decode"),
                         ("i_bad_shape.npy", "shape"), ("k_nan.wav", "NaN"), ("l_header_only.wav", "too short"),
                         ("j_truncated.wav", "truncated: the header promises 112000 samples")]:
        assert name in failures and reason in failures.split(name)[1].splitlines()[0]
    # Statistics over random crops, computed independently from the items.
    mean, std = json.loads((out / "stats.json").read_text())["norm_stats"]
    values = np.concatenate([store[i].ravel() for i in range(len(store))])
    assert abs(mean - values.mean()) < 2.0 and 0.5 * values.std() < std < 1.5 * values.std()


def test_fp16_store_reads_back_within_half_precision(audio_dir, tmp_path):
    prepare(str(audio_dir), tmp_path / "s16", workers=1, files_per_shard=100, stats_items=10, progress=False)
    s16 = LogMelStore(tmp_path / "s16")
    assert s16.dtype == np.float16 and s16[0].dtype == np.float32
    ref = LogMelSpectrogram(16000)(read_audio(audio_dir / "a_tone.wav", 16000)).numpy()
    i = [n.endswith("a_tone.wav") for n in s16.names].index(True)
    np.testing.assert_allclose(s16[i], ref, atol=1e-2, rtol=2e-3)


def test_rerun_skips_finished_shards_and_completes_a_half_done_one(audio_dir, tmp_path):
    out = tmp_path / "store"
    first = prepare(str(audio_dir), out, workers=1, files_per_shard=3, stats_items=10, progress=False)
    before = (out / "shard-00000.bin").stat().st_mtime_ns
    # Simulate a crash in shard 1: its completion marker is gone and a torn .tmp is left behind.
    (out / "shard-00001.json").unlink()
    (out / "shard-00001.bin").rename(out / ".fastm2d-shard-00001.bin.x1y2z3.tmp")  # as atomic_file names it
    (out / "notes.tmp").write_text("the user's own")
    again = prepare(str(audio_dir), out, workers=1, files_per_shard=3, stats_items=10, progress=False)
    assert again["shards_skipped"] == 3 and again["files_processed"] == 3
    assert again["items"] == first["items"] and (out / "shard-00000.bin").stat().st_mtime_ns == before
    assert [p.name for p in out.glob("*.tmp")] == ["notes.tmp"] and len(LogMelStore(out)) == first["items"]


def test_damaged_or_unfinished_store_fails_on_open(audio_dir, tmp_path):
    out = tmp_path / "store"
    prepare(str(audio_dir), out, workers=1, files_per_shard=3, stats_items=10, progress=False)
    shard = out / "shard-00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match="shard-00001.bin.*truncated"):
        LogMelStore(out)
    shard.unlink()
    with pytest.raises(DataError, match="shard-00001.bin.*missing"):
        LogMelStore(out)
    with pytest.raises(DataError, match="not a prepared"):
        LogMelStore(tmp_path)


def test_training_from_a_store_uses_its_stats(audio_dir, tmp_path, tiny_config):
    out = tmp_path / "store"
    prepare(str(audio_dir), out, workers=1, stats_items=10, crop_frames=64, progress=False)
    tr = pretrain(tiny_config(f"data.train={out}", "train.max_steps=2", "train.batch_size=2", "data.num_workers=1"))
    assert tr.model.norm_stats.tolist() == pytest.approx(LogMelStore(out).norm_stats)
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tr.out_dir))
    batch = next(tr.micro_batches()).x
    assert batch.dtype == torch.float32 and batch.shape == (2, 1, 80, 64)
