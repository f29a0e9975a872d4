"""AudioSet scale at small sizes: the file checks run once per data set (parallel, saved, reused by --resume and by
the other ranks of a node), item lists are compact arrays, and `prepare` survives kill -9 at any moment.
The 200k / 1M-item figures are benchmarks (benchmarks/scale.py), not tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest

import fastm2d.data.file_checks as file_checks
from fastm2d.data.file_list import FileList
from fastm2d.data.sources import check_files, list_digest
from fastm2d.user_cache import user_cache

from .conftest import TINY_TRAIN, write_tone


def _mixed_folder(root, real: bool = False):
    """Good clips, a short one, an empty file, a WAV cut in half, a folder named like audio, a dangling link, and
    (when fetched: benchmarks/real_sounds.py) real recordings of LMMS's sample library in OGG, FLAC and WAV,
    mislabelled package files included."""
    from benchmarks.real_sounds import sound_files
    root.mkdir()
    for i in range(12):
        write_tone(root / f"ok{i:02d}.wav", seconds=0.5 + 0.1 * i)
    for f in sound_files("lmms-common", "usr/share/lmms/samples")[::12][:20] if real else []:
        os.symlink(f, root / f"real_{f.parent.name}_{f.name}")
    write_tone(root / "short.wav", seconds=0.05)
    (root / "empty.wav").write_bytes(b"")
    data = (root / "ok00.wav").read_bytes()
    (root / "cut.wav").write_bytes(data[: len(data) // 2])
    (root / "dir.wav").mkdir()
    (root / "gone.wav").symlink_to(root / "nowhere.wav")
    return sorted(p for p in root.iterdir())


def _counting(monkeypatch):
    calls = []
    real = file_checks.probe_file
    monkeypatch.setattr(file_checks, "probe_file", lambda p, *a: calls.append(str(p)) or real(p, *a))
    return calls


def test_parallel_checks_equal_the_sequential_ones_and_are_reused(tmp_path, monkeypatch):
    files = _mixed_folder(tmp_path / "clips", real=True)
    settings = dict(n_mels=80, min_seconds=0.16, min_frames=16)
    want_good, want_bad = check_files(files, **settings)
    calls = _counting(monkeypatch)
    good, bad = file_checks.check_files_once(files, **settings, cache_dir=tmp_path, workers=2)
    assert list(good) == want_good and [str(b) for b in bad] == [str(b) for b in want_bad]
    assert len(calls) == len(files)
    calls.clear()  # a resume: nothing is probed again but what cannot be stat'ed (it may have appeared since)
    good2, bad2 = file_checks.check_files_once(files, **settings, cache_dir=tmp_path, workers=2)
    assert calls == [str(tmp_path / "clips" / "gone.wav")] and list(good2) == want_good and [str(b) for b in bad2] == [str(b) for b in want_bad]
    # a file that changed (new size and time) is checked again, and only that one
    calls.clear()
    changed = tmp_path / "clips" / "ok03.wav"
    assert changed in want_good
    write_tone(changed, seconds=0.05)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    good3, bad3 = file_checks.check_files_once(files, **settings, cache_dir=tmp_path, workers=2)
    assert sorted(calls) == sorted([str(changed), str(tmp_path / "clips" / "gone.wav")])
    assert changed not in list(good3)
    assert any(str(changed) in str(b) and "too short" in str(b) for b in bad3)
    calls.clear()  # another list (other order) is another data set: checked in full
    file_checks.check_files_once(files[::-1], **settings, cache_dir=tmp_path, workers=2)
    assert len(calls) == len(files)


def test_a_resumed_run_probes_no_file_again(tmp_path, monkeypatch, tiny_config):
    from fastm2d.train import Trainer, pretrain
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(8):
        write_tone(clips / f"c{i}.wav", seconds=1.0, freq=200 + 50 * i)
    cfg = tiny_config(f"data.train={clips}", "train.max_steps=2", "data.norm_stats=[-10,3.5]")
    calls = _counting(monkeypatch)
    pretrain(cfg)
    assert len(calls) == 8 and len(list(user_cache("file_checks").glob("file_checks-*.npz"))) >= 1
    calls.clear()
    cfg.train.max_steps = 4
    tr = Trainer(cfg, resume=True)
    tr.close()
    assert calls == [] and tr.step == 2


def test_a_second_fresh_run_on_a_checked_list_reads_no_header(tmp_path, monkeypatch, tiny_config):
    """Every ablation on one list starts without checking it again: the checks live in the user cache, keyed by
    the list and each file's size and time; a file changed since is checked again, the others are not."""
    from fastm2d.train import Trainer
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(8):
        write_tone(clips / f"c{i}.wav", seconds=1.0, freq=200 + 50 * i)
    calls = _counting(monkeypatch)
    Trainer(tiny_config(f"data.train={clips}", "data.norm_stats=[-10,3.5]", f"out_dir={tmp_path / 'a'}")).close()
    assert len(calls) == 8
    calls.clear()
    Trainer(tiny_config(f"data.train={clips}", "data.norm_stats=[-10,3.5]", f"out_dir={tmp_path / 'b'}")).close()
    assert calls == []  # a new run folder: no header read
    write_tone(clips / "c3.wav", seconds=2.0, freq=999)  # changed since: checked again, alone
    os.utime(clips / "c3.wav", ns=(1, 1))
    Trainer(tiny_config(f"data.train={clips}", "data.norm_stats=[-10,3.5]", f"out_dir={tmp_path / 'c'}")).close()
    assert [Path(c).name for c in calls] == ["c3.wav"]
    calls.clear()
    Trainer(tiny_config(f"data.train={clips}", "data.norm_stats=[-10,3.5]", f"out_dir={tmp_path / 'd'}",
                        "data.check_cache=run")).close()  # the run's own folder only: checked there, kept there
    assert len(calls) == 8 and len(list((tmp_path / "d").glob("file_checks-*.npz"))) == 1


def _rank(rank, world, init, clips, out, counts):
    """One process of a 2-process gloo job on one node: LOCAL_RANK 0 checks, LOCAL_RANK 1 reads its result."""
    import torch
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = []
    real = file_checks.probe_file
    file_checks.probe_file = lambda p, *a: calls.append(str(p)) or real(p, *a)
    from fastm2d.config import load_config
    from fastm2d.data.open_source import file_source
    config = load_config(None, [*TINY_TRAIN, f"data.train={clips}"])
    if rank == 1:
        time.sleep(1.0)  # the slow case on purpose: rank 1 must still wait for rank 0's result
    source, bad = file_source(str(clips), config, cache_dir=out)
    open(counts / f"{rank}", "w").write(f"{len(calls)} {len(source)} {len(bad)}")
    torch.distributed.destroy_process_group()


def test_one_rank_per_node_checks_the_files(tmp_path):
    import torch.multiprocessing as mp
    clips = tmp_path / "clips"
    _mixed_folder(clips)
    counts = tmp_path / "counts"
    counts.mkdir()
    mp.start_processes(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", clips, tmp_path, counts), nprocs=2,
                       start_method="spawn")
    first, second = ((counts / r).read_text().split() for r in ("0", "1"))
    assert first[0] == "17" and second[0] == "0"  # every file probed once, by local rank 0 only
    assert first[1:] == second[1:] == ["12", "5"]


def test_file_list_holds_any_name_compactly():
    names = ["/data/a.wav", "/data/ünïcødé/b c,d.flac", "/data/\udcff\udcfebad-bytes.wav", "/x/" + "y" * 300 + ".wav"]
    fl = FileList(names)
    assert len(fl) == 4 and [str(p) for p in fl] == names and fl.name(-1) == names[-1]
    assert list(fl.names()) == names and fl.digest() == list_digest(names)
    assert [str(p) for p in fl[1:3]] == names[1:3]
    with pytest.raises(IndexError):
        fl.name(4)
    big = FileList(f"/corpus/audioset/{i:07d}.wav" for i in range(100_000))
    assert big.nbytes == 28 * len(big) + 8 * (len(big) + 1)  # the name's bytes + one offset per item, nothing else
    assert isinstance(big.buffer, np.ndarray) and big.buffer.dtype == np.uint8


def _store_files(store):
    return {p.name: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file() and not p.name.startswith(".")
            and p.name not in ("manifest.json", "index.npz")}  # index.npz: a cache keyed by index.tsv's time


@pytest.mark.slow
def test_prepare_survives_kill_9_at_any_moment(tmp_path):
    """SIGKILL the preparation at three moments, re-run it each time: the store ends identical (index, shards,
    statistics) to one prepared in a single go."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        write_tone(src / f"t{i:02d}.wav", seconds=1.0 + 0.05 * (i % 7), freq=150 + 10 * i)
    args = ["--files-per-shard", "6", "--workers", "0", "--stats-items", "20", "--crop-frames", "208"]
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-m", "fastm2d.cli", "prepare", str(src), "--out", str(whole), *args], check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Killed: as its first shard's record appears, two more shards on, and 0.3 s into a restart (while it
    # opens the half-done store); a shard's .json record is written after its data.
    done = lambda: len(list(killed.glob("shard-*.json")))  # noqa: E731
    for more, extra in ((1, 0.0), (2, 0.02), (None, 0.3)):
        start = done()
        p = subprocess.Popen([sys.executable, "-m", "fastm2d.cli", "prepare", str(src), "--out", str(killed), *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        t0 = time.time()
        while more is not None and done() < start + more and time.time() - t0 < 60:
            assert p.poll() is None, "prepare finished before it could be killed"
            time.sleep(0.005)
        time.sleep(extra)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert done() < 10, "killed too late: nothing left to resume"
    r = subprocess.run([sys.executable, "-m", "fastm2d.cli", "prepare", str(src), "--out", str(killed), *args],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _store_files(whole), _store_files(killed)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != "stats.json":
            assert a[name] == b[name], name
    from fastm2d.data import LogMelStore
    s1, s2 = LogMelStore(whole), LogMelStore(killed)
    assert len(s1) == len(s2) == 60 and s1.norm_stats == pytest.approx(s2.norm_stats, rel=1e-6)
    assert list(s1.names) == list(s2.names) and (s1.offset == s2.offset).all() and (s1.frames == s2.frames).all()


def test_a_store_index_is_parsed_once_and_equals_the_tsv(tmp_path):
    """index.npz (written at the first opening) gives the same names and columns as parsing index.tsv, names with
    tabs, quotes and backslashes included; an edited index.tsv is parsed again."""
    from fastm2d.data import LogMelStore
    from fastm2d.data.store import parse_index
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["plain", 'quo"te', "back\\slash", "tab\tname", "ünï"]):
        write_tone(src / f"{name}{i}.wav", seconds=0.5 + 0.1 * i)
    from fastm2d.data.prepare import prepare
    prepare(str(src), tmp_path / "store", workers=0, stats_items=4, progress=False)
    a = LogMelStore(tmp_path / "store")
    assert (tmp_path / "store" / "index.npz").is_file()
    b = LogMelStore(tmp_path / "store")  # read from index.npz
    names, columns = parse_index(tmp_path / "store" / "index.tsv")
    assert list(a.names) == list(b.names) == list(names.names()) and len(names) == 5
    assert (b.offset == columns[:, 1]).all() and (b.audio_frames == columns[:, 3]).all()
    import json
    tsv = tmp_path / "store" / "index.tsv"
    lines = tsv.read_text().splitlines(keepends=True)
    first = lines[1].split("\t")
    lines[1] = "\t".join([json.dumps("renamed.wav"), *first[1:]])
    tsv.write_text("".join(lines))
    assert LogMelStore(tmp_path / "store").names[0] == "renamed.wav"


def test_m2d_x_runs_from_a_prepared_store_as_from_the_files(tmp_path, tiny_config):
    """Labels (M2D-AS) and precomputed teacher features (M2D-S) reach the store's items by their names: the
    offline targets equal those of the same files read directly, and a step trains."""
    from fastm2d.data.prepare import prepare
    from fastm2d.train import Trainer

    from .conftest import labelled_folder
    folder = labelled_folder(tmp_path)
    prepare(str(folder), tmp_path / "store", workers=0, stats_items=4, progress=False, crop_frames=64)
    common = ["train.batch_size=2", "data.norm_stats=[-8,4]", "train.max_steps=1", "offline.task=labels",
              f"offline.labels={folder / 'labels.csv'}"]
    direct = Trainer(tiny_config(f"data.train={folder}", *common, f"out_dir={tmp_path / 'a'}"))
    stored = Trainer(tiny_config(f"data.train={tmp_path / 'store'}", *common, f"out_dir={tmp_path / 'b'}"))
    assert list(stored.data.source.names) == list(direct.data.source.names)
    assert np.array_equal(stored.offline.targets.matrix, direct.offline.targets.matrix)
    assert stored.offline.targets.matrix.sum() > len(direct.data.source)  # multi-hot rows: some clips hold two labels
    stored.fit()
    direct.close()
    feats = tmp_path / "feats"
    feats.mkdir()
    for f in sorted(folder.glob("*.wav")):
        import soundfile as sf
        np.save(feats / f"{f.stem}.npy", np.ones((int(sf.info(str(f)).duration * 50), 6), np.float32))
    distill = Trainer(tiny_config(f"data.train={tmp_path / 'store'}", "train.batch_size=2", "data.norm_stats=[-8,4]",
                                  "train.max_steps=1", "offline.task=distill", f"offline.features={feats}",
                                  f"out_dir={tmp_path / 'c'}"))
    assert distill.model.cfg.off_dim == 6
    distill.fit()
