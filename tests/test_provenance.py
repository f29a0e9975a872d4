"""What was computed from what: a store, statistics, bad-file lists, feature files, fine-tuning results and cached
embeddings are reused only for the inputs they were made from, or refused; never silently mixed or stale."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from fastm2d.cli import main
from fastm2d.data import DataError, LogMelStore
from fastm2d.data.prepare import prepare

from .conftest import TINY_TRAIN, write_tone


def _tones(folder, n, freq=300, seconds=1.0):
    folder.mkdir(parents=True, exist_ok=True)
    return [write_tone(folder / f"t{i}.wav", seconds=seconds, freq=freq + 40 * i) for i in range(n)]


def test_prepare_refuses_a_store_built_from_other_files_or_settings(tmp_path):
    store = tmp_path / "store"
    prepare(str(tmp_path / "a"), store, workers=1, stats_items=2, progress=False) if _tones(tmp_path / "a", 3) else None
    _tones(tmp_path / "b", 3, freq=900)  # the same count, other files
    with pytest.raises(DataError, match="sources_sha1"):
        prepare(str(tmp_path / "b"), store, workers=1, stats_items=2, progress=False)
    with pytest.raises(DataError, match="sample_rate.*16000 there, 32000 now"):
        prepare(str(tmp_path / "a"), store, workers=1, stats_items=2, progress=False, sample_rate=32000)
    assert main(["prepare", str(tmp_path / "b"), str(store), "--workers", "1"]) == 2  # one line, exit 2
    np.testing.assert_array_equal(LogMelStore(store).names, sorted(str(f) for f in (tmp_path / "a").iterdir()))


def test_file_names_with_tabs_and_newlines_round_trip_through_a_store(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    odd = ["tab\there.wav", "new\nline.wav", 'quote"and\\slash.wav', "plain.wav"]
    for i, name in enumerate(odd):
        write_tone(src / name, seconds=1.0, freq=300 + 100 * i)
    (src / "bad\tname.wav").write_bytes(b"not audio")
    assert main(["prepare", str(src), str(tmp_path / "store"), "--workers", "1", "--stats-items", "2"]) == 0
    store = LogMelStore(tmp_path / "store")
    assert sorted(store.names) == sorted(str(src / n) for n in odd)
    i = store.names.index(str(src / "new\nline.wav"))
    assert store[i].shape[0] == 80
    failures = (tmp_path / "store" / "failures.tsv").read_text().splitlines()
    assert len(failures) == 2 and json.loads(failures[1].split("\t")[0]) == str(src / "bad\tname.wav")


def test_a_torn_store_manifest_is_one_line(tmp_path, capsys):
    _tones(tmp_path / "a", 2)
    prepare(str(tmp_path / "a"), tmp_path / "store", workers=1, stats_items=2, progress=False)
    manifest = tmp_path / "store" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(DataError, match="manifest.json: unreadable store manifest"):
        LogMelStore(tmp_path / "store")
    assert main(["prepare", str(tmp_path / "a"), str(tmp_path / "store")]) == 2
    assert "unreadable store manifest" in capsys.readouterr().err


def test_a_csv_list_with_a_byte_order_mark_is_read(tmp_path):
    """Spreadsheet programs write UTF-8 with a BOM: the header is still `file_name`, not '\ufefffile_name'."""
    from fastm2d.data.sources import list_files
    files = _tones(tmp_path / "a", 2)
    (tmp_path / "list.csv").write_bytes("\ufefffile_name\na/t0.wav\na/t1.wav\n".encode("utf-8"))
    assert list_files(str(tmp_path / "list.csv")) == files


def test_statistics_left_by_a_run_on_other_data_are_not_reused(tmp_path):
    run = tmp_path / "run"
    _tones(tmp_path / "quiet", 4)
    loud = _tones(tmp_path / "loud", 4, freq=2000)
    for f in loud:
        sf.write(str(f), 0.9 * np.sign(np.sin(np.arange(16000) * 0.3)).astype(np.float32), 16000)
    common = ["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=1"]
    assert main([*common, f"data.train={tmp_path / 'quiet'}"]) == 0
    quiet_mean = json.loads((run / "norm_stats.json").read_text())["norm_stats"][0]
    for f in run.glob("checkpoint-*.pth"):  # as a diverged run leaves the folder: statistics, no checkpoint
        f.unlink()
    (run / "metrics.jsonl").unlink()
    assert main([*common, f"data.train={tmp_path / 'loud'}"]) == 0
    loud_mean = json.loads((run / "norm_stats.json").read_text())["norm_stats"][0]
    assert abs(loud_mean - quiet_mean) > 1.0  # recomputed for the new data


def test_resume_keeps_what_training_found_in_the_bad_file_list(tmp_path):
    data = tmp_path / "data"
    _tones(data, 6)
    nan = np.zeros(16000, dtype=np.float32)
    nan[100] = np.nan
    sf.write(str(data / "nan.wav"), nan, 16000, subtype="FLOAT")  # passes the header check, fails when read
    (data / "empty.wav").write_bytes(b"")  # found by the header check
    run = tmp_path / "run"
    args = ["pretrain", f"out_dir={run}", *TINY_TRAIN, f"data.train={data}", "data.norm_stats=[-8,4]",
            "train.batch_size=2"]
    assert main([*args, "train.max_steps=8"]) == 0
    listing = run / "bad_training_files.txt"
    assert "nan.wav" in listing.read_text() and "(found while training)" in listing.read_text()
    assert main([*args, "train.max_steps=10", "--resume"]) == 0
    text = listing.read_text()
    assert "empty.wav: empty file" in text and "nan.wav: contains NaN" in text and "(found while training)" in text


def test_embed_keeps_both_when_one_name_is_the_others_timestamps(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=1"]) == 0
    a = write_tone(tmp_path / "a.wav", seconds=1.0, freq=300)
    b = write_tone(tmp_path / "a.timestamps.wav", seconds=2.0, freq=900)
    out = tmp_path / "feats"
    assert main(["embed", "--level", "timestamp", "--weights", str(run), "--out", str(out), str(a), str(b)]) == 0
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".npy")  # manifest.jsonl beside them
    assert len(files) == 4, files
    shapes = {np.load(out / f).shape[0] for f in files if not f.endswith("timestamps.npy")}
    assert len(shapes) == 2  # 1 s and 2 s of frames: neither output replaced the other


def _task(tmp_path, n=12):
    folder = tmp_path / "task"
    rows = ["file_name,label,split"]
    for i in range(n):
        write_tone(folder / f"c{i}.wav", seconds=0.5, freq=300 + 600 * (i % 2)) if folder.mkdir(exist_ok=True) or True \
            else None
        rows.append(f"c{i}.wav,{'low' if i % 2 == 0 else 'high'},{['train', 'train', 'valid', 'test'][i % 4]}")
    (folder / "meta.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_finetune_with_no_epoch_is_refused_not_the_old_score(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=1"]) == 0
    task = _task(tmp_path)
    out = tmp_path / "ft"
    assert main(["finetune", str(run), str(task), "--out", str(out), "--epochs", "1", "--batch-size", "2"]) == 0
    capsys.readouterr()
    assert main(["finetune", str(run), str(task), "--out", str(out), "--epochs", "0"]) == 2
    assert "epochs=0" in capsys.readouterr().err


def test_cached_embeddings_follow_the_audio_not_its_path(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=1"]) == 0
    task = _task(tmp_path)
    out = tmp_path / "eval"
    assert main(["linear-eval", str(run), str(task), "--out", str(out), "--seeds", "1", "--quiet"]) == 0
    assert main(["linear-eval", str(run), str(task), "--out", str(out), "--seeds", "1", "--quiet"]) == 0
    assert len(list((out / "cache").iterdir())) == 1  # the same audio: the cache is used
    write_tone(task / "c0.wav", seconds=0.5, freq=5000)  # the audio changed under the same path
    assert main(["linear-eval", str(run), str(task), "--out", str(out), "--seeds", "1", "--quiet"]) == 0
    assert len(list((out / "cache").iterdir())) == 2
