"""Training data: sources, crops, statistics, resumable order and bad input."""
import numpy as np
import pytest
import torch

from fastm2d.data import (CropDataset, DataError, EpochSampler, LogMelSource, check_files, compute_norm_stats,
                          list_files, random_crop, synth_clip)
from fastm2d.data.sources import require_usable
from fastm2d.config import ConfigError
from fastm2d.train import Trainer, pretrain, read_metrics

from .conftest import write_tone


def test_synthetic_clips_are_deterministic_and_varied():
    a, b = synth_clip(0, 3), synth_clip(0, 3)
    assert np.array_equal(a, b) and a.dtype == np.float32 and len(a) == 97600
    assert not np.array_equal(a, synth_clip(0, 4)) and np.abs(a).max() <= 1.0
    lms = LogMelSource(synthetic=(0, 8, 6.1)).load(0)
    assert lms.shape == (80, 611) and lms.std() > 1.0  # real structure, not a flat floor


def test_random_crop_and_pad():
    rng = np.random.default_rng(0)
    lms = np.arange(80 * 700, dtype=np.float32).reshape(80, 700)
    crop = random_crop(lms, 608, rng)
    start = int(crop[0, 0])
    assert np.array_equal(crop, lms[:, start:start + 608])
    short = random_crop(lms[:, :100], 608, rng)
    # Padded with the log-mel of digital silence, log(float32 eps), not 0 (which normalises to loud sound).
    assert np.array_equal(short[:, :100], lms[:, :100])
    assert np.all(short[:, 100:] == np.float32(np.log(np.finfo(np.float32).eps)))


def test_norm_stats_match_numpy_over_the_same_crops():
    src = LogMelSource(synthetic=(1, 6, 1.0))
    mean, std = compute_norm_stats(src, 64, n_items=6, seed=3)
    rng = np.random.default_rng(3)
    picks = rng.choice(6, size=6, replace=False)
    crops = np.stack([random_crop(src.load(int(i)), 64, rng) for i in picks]).astype(np.float64)
    assert mean == pytest.approx(crops.mean(), abs=1e-9) and std == pytest.approx(crops.std(), abs=1e-9)


def test_sampler_is_deterministic_and_resumes_mid_epoch():
    s = EpochSampler(10, batch_size=3, seed=7)
    assert s.batches_per_epoch == 3 and len(list(s)) == 9
    full = list(s)
    s.set_position(0, 2)
    assert list(s) == full[6:]
    s.set_position(1, 0)
    assert [i for i, *_ in s] != [i for i, *_ in full]
    small = EpochSampler(4, batch_size=2, seed=0, min_epoch_items=10)
    items = [i for i, *_ in small]
    assert len(items) == 10 and set(items) == {0, 1, 2, 3}


def _make_files(tmp_path):
    good = [write_tone(tmp_path / f"good{i}.wav", seconds=0.7) for i in range(3)]
    np.save(tmp_path / "good.npy", np.random.randn(1, 80, 90).astype(np.float32))
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.flac").write_bytes(b"not flac at all" * 50)
    np.save(tmp_path / "wrong_shape.npy", np.zeros((3, 64, 10), dtype=np.float32))
    nan = np.random.randn(1, 80, 90).astype(np.float32)
    nan[0, 3, :] = np.nan  # one mel bin, every frame: any crop contains it
    np.save(tmp_path / "has_nan.npy", nan)
    return good


def test_folder_and_csv_sources(tmp_path):
    _make_files(tmp_path)
    files = list_files(str(tmp_path))
    assert len(files) == 8
    csv = tmp_path / "list.csv"
    csv.write_text("file_name,label\ngood0.wav,x\ngood.npy,y\n")
    assert list_files(str(csv)) == [tmp_path / "good0.wav", tmp_path / "good.npy"]
    with pytest.raises(DataError, match="nowhere"):
        list_files(str(tmp_path / "nowhere"))


def test_ogg_audio_named_oga_and_opus_is_found_and_read(tmp_path):
    """Desktop sound themes ship Ogg audio as .oga; Opus in Ogg is .opus: both listed and decoded (libsndfile),
    not silently left out of a folder."""
    import soundfile as sf
    tone = (0.3 * np.sin(np.arange(48000) * 2 * np.pi * 440 / 48000)).astype(np.float32)
    sf.write(str(tmp_path / "bell.oga"), tone, 48000, format="OGG", subtype="VORBIS")
    sf.write(str(tmp_path / "voice.opus"), tone, 48000, format="OGG", subtype="OPUS")
    files = list_files(str(tmp_path))
    assert [f.name for f in files] == ["bell.oga", "voice.opus"]
    good, bad = check_files(files)
    assert len(good) == 2 and not bad
    lms = LogMelSource(good).load(1)
    assert lms.shape == (80, 101) and np.isfinite(lms).all()


def test_bad_files_are_all_found_before_training(tmp_path):
    _make_files(tmp_path)
    good, bad = check_files(list_files(str(tmp_path)))
    assert sorted(b.path.name for b in bad) == ["corrupt.flac", "empty.wav", "wrong_shape.npy"]
    assert len(good) == 5
    with pytest.raises(DataError, match="3 of 8 training files are unusable.*listed in .*bad.txt"):
        require_usable(good, bad, "error", "training", tmp_path / "bad.txt")


def test_bad_files_skip_mode_counts_and_continues(tmp_path, tiny_config):
    _make_files(tmp_path)
    cfg = tiny_config(f"data.train={tmp_path}", "train.max_steps=3", "train.batch_size=2", "data.norm_stats=[-8,4]")
    tr = pretrain(cfg)
    bad = (tr.out_dir / "bad_training_files.txt").read_text()
    assert "empty.wav" in bad and "corrupt.flac" in bad and "wrong_shape.npy" in bad
    # has_nan.npy passes the header check; the NaN is found when first read, listed, counted, and left out.
    assert len(tr.data.source) == 5
    nan_index = tr.data.source.names.index(str(tmp_path / "has_nan.npy"))
    rows = read_metrics(tr.out_dir)
    assert all(np.isfinite(r["loss"]) for r in rows)
    if rows[-1]["skipped_items"]:  # drawn in these 3 steps: listed once with its reason, known to the sampler
        assert "has_nan.npy: log-mel contains NaN" in bad and tr.data.sampler.bad == {nan_index}
    ds = CropDataset(tr.data.source, 64)
    item = ds[(nan_index, 0)]
    assert item["skipped"] == 1 and torch.isfinite(item["lms"]).all()
    strict = CropDataset(tr.data.source, 64, on_bad_file="error")
    with pytest.raises(DataError, match="has_nan.npy.*NaN"):
        strict[(nan_index, 0)]


def test_all_files_bad_is_one_clear_error(tmp_path, tiny_config):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(DataError, match="empty.wav"):
        Trainer(tiny_config(f"data.train={tmp_path}"))


def test_too_few_items_for_a_batch(tiny_config):
    with pytest.raises(ConfigError, match="2 usable training items cannot fill one batch of 4 x 1.*"
                                          "train.batch_size.*data.min_epoch_items"):
        Trainer(tiny_config("data.synthetic_clips=2", "train.batch_size=4"))


def test_batches_are_the_same_with_or_without_workers_across_epochs(tiny_config, tmp_path):
    def first_batches(workers, n=20):  # 32 clips / batch 4 = 8 per epoch: 20 batches cross two epoch ends
        tr = Trainer(tiny_config(f"data.num_workers={workers}", "data.norm_stats=[-9,3]",
                                 f"out_dir={tmp_path / str(workers)}"))
        it = tr.micro_batches()
        return [next(it).x for _ in range(n)]

    for a, b in zip(first_batches(0), first_batches(2)):
        assert torch.equal(a, b)


def test_an_item_found_bad_while_training_is_read_once_and_left_out(tmp_path, tiny_config):
    """NaN content passes the header check; after its first read it must never be read again (this run or a
    resumed one), and the batches must be those of a run that skipped it by the dataset's own rule."""
    for i in range(7):
        write_tone(tmp_path / f"t{i}.wav", seconds=0.8, freq=200 + 90 * i)
    nan = np.random.randn(1, 80, 90).astype(np.float32)
    nan[0, 5, :] = np.nan
    np.save(tmp_path / "has_nan.npy", nan)
    cfg = tiny_config(f"data.train={tmp_path}", "train.batch_size=2", "data.norm_stats=[-8,4]", "train.max_steps=12")
    tr = Trainer(cfg)
    nan_index = tr.data.source.names.index(str(tmp_path / "has_nan.npy"))
    reads = []
    load = tr.data.source.load
    tr.data.source.load = lambda i: (reads.append(i), load(i))[1]
    it = tr.micro_batches()
    batches = [next(it).x for _ in range(12)]  # 8 items / batch 2 = 4 per epoch: three epochs
    assert reads.count(nan_index) == 1 and tr.data.sampler.bad == {nan_index}
    lines = (tr.out_dir / "bad_training_files.txt").read_text().splitlines()
    assert len(lines) == 1 and "has_nan.npy: log-mel contains NaN" in lines[0]
    # The same batches as the dataset's substitution rule alone (no sampler knowledge) gives.
    fresh = Trainer(tiny_config(f"data.train={tmp_path}", "train.batch_size=2", "data.norm_stats=[-8,4]",
                                f"out_dir={tmp_path / 'other'}"))
    it2 = fresh.micro_batches()
    fresh.data.sampler.bad.clear()
    for a in batches:
        fresh.data.sampler.bad.clear()  # forget it every batch: the dataset substitutes by itself
        assert torch.equal(a, next(it2).x)


def test_the_items_found_bad_travel_with_the_checkpoint_and_a_damaged_list_is_refused(tiny_config):
    """The training data's part of a checkpoint: a resumed run leaves out what the interrupted one found bad;
    a list that is not item numbers is refused naming the file and the field, before anything is loaded."""
    from fastm2d.checkpoint import CheckpointError
    cfg = tiny_config("train.max_steps=2")
    tr = Trainer(cfg)
    batches = tr.micro_batches()
    tr.train_step([next(batches)])
    tr.data.sampler.bad.update({3, 5})  # as the loader does when it reads a NaN item
    path = tr.save()
    tr.close()
    resumed = Trainer(cfg, resume=True)
    assert resumed.data.sampler.bad == {3, 5} and resumed.step == 1
    resumed.close()
    obj = torch.load(path, weights_only=True)
    obj["bad_items"] = ["t3.wav"]
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=f"{path.name}.*bad_items is not a list of item numbers"):
        Trainer(cfg, resume=True)


def test_short_and_broken_audio_is_listed_not_fatal(tmp_path, tiny_config):
    """A WAV cut after its header (8 samples), a clip shorter than one patch width, a dangling link and a folder
    named like audio are listed with reasons before training; the run trains on the rest."""
    for i in range(6):
        write_tone(tmp_path / f"ok{i}.wav", seconds=1.0, freq=300 + 50 * i)
    full = (tmp_path / "ok0.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(full[:60])
    write_tone(tmp_path / "blip.wav", seconds=0.1)  # 100 ms < one 16-frame patch (160 ms)
    (tmp_path / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    (tmp_path / "folder.wav").mkdir()
    tr = pretrain(tiny_config(f"data.train={tmp_path}", "train.batch_size=2", "data.norm_stats=[-8,4]",
                              "train.max_steps=4"))
    listing = (tr.out_dir / "bad_training_files.txt").read_text()
    for name, reason in [("cut.wav", "too short"), ("blip.wav", "too short"), ("gone.wav", "dangling"),
                         ("folder.wav", "a folder")]:
        assert any(name in line and reason in line for line in listing.splitlines()), (name, listing)
    assert len(tr.data.source) == 6 and all(np.isfinite(r["loss"]) for r in read_metrics(tr.out_dir))


def test_noise_statistics_use_the_tiled_crops_training_uses(tmp_path):
    """Short noise clips are tiled in training, so their statistics must come from tiled crops (the original's
    repeat_short), not zero- or silence-padded ones."""
    from fastm2d.data.noise import tile_crop
    src = LogMelSource(synthetic=(5, 6, 1.0))  # 101 frames, crops of 608: six-fold tiling
    mean, std = compute_norm_stats(src, 608, n_items=6, seed=1, crop=tile_crop)
    rng = np.random.default_rng(1)
    picks = rng.choice(6, size=6, replace=False)
    crops = np.stack([tile_crop(src.load(int(i)), 608, rng) for i in picks]).astype(np.float64)
    assert mean == pytest.approx(crops.mean(), abs=1e-9) and std == pytest.approx(crops.std(), abs=1e-9)
    # A clip's tiled crop has the clip's own mean; a padded crop would be dominated by the padding.
    clip = np.stack([src.load(i) for i in range(6)]).astype(np.float64)
    assert mean == pytest.approx(clip.mean(), abs=0.3)


def test_a_folder_tree_deeper_than_the_recursion_limit_is_listed(tmp_path):
    """Path.rglob (and os.walk) recurse: a tree 1,200 folders deep ended in RecursionError. The walk is iterative and
    lists what rglob lists (links to folders listed, not entered; dangling links and folders named like audio kept
    for the checks to refuse with a reason)."""
    import os

    from pathlib import Path

    from fastm2d.data.sources import list_files
    folders = [str(tmp_path / "deep")]
    for _ in range(1200):  # os.makedirs (and shutil.rmtree, below) recurse themselves
        folders.append(os.path.join(folders[-1], "a"))
    try:
        for folder in folders:
            os.mkdir(folder)
        Path(folders[-1], "bottom.wav").write_bytes(b"RIFF")  # listing reads names only (libsndfile's own path
        # length limit would refuse writing a real WAV this deep)
        assert [p.name for p in list_files(folders[0])] == ["bottom.wav"]
    finally:  # pytest's own clean-up of tmp_path would hit the recursion limit
        if os.path.exists(os.path.join(folders[-1], "bottom.wav")):
            os.unlink(os.path.join(folders[-1], "bottom.wav"))
        for folder in reversed(folders):
            if os.path.isdir(folder):
                os.rmdir(folder)
    from fastm2d.data.sources import walk
    tree = tmp_path / "tree"
    (tree / "sub" / "deep").mkdir(parents=True)
    write_tone(tree / "sub" / "deep" / "a.wav", seconds=0.5)
    (tree / "other").mkdir()
    (tree / "other" / "b.flac").write_bytes(b"")
    os.symlink(tree / "other", tree / "sub" / "linked")
    os.symlink(tree / "nowhere.wav", tree / "dangling.wav")
    (tree / "folder.wav").mkdir()
    assert sorted(walk(tree)) == sorted(tree.rglob("*"))


def test_norm_stats_decoded_in_workers_equal_the_sequential_ones(tmp_path):
    """The picked items are decoded by loader workers, the crops drawn here in the picks' order: the statistics of
    2 workers equal those computed in this process, exactly."""
    from .conftest import write_tone
    files = [write_tone(tmp_path / f"c{i}.wav", seconds=0.5 + 0.3 * i, freq=200 + 90 * i) for i in range(7)]
    src = LogMelSource(files)
    assert compute_norm_stats(src, 64, n_items=5, seed=4, workers=2) == compute_norm_stats(src, 64, n_items=5, seed=4)


def test_norm_stats_are_computed_once_per_data_set(tmp_path, monkeypatch):
    """A second run folder on the same list reads the statistics the first computed (kept beside the list's file
    checks, data.check_cache), identical; a picked file changed since, or another crop length, computes again; with
    data.check_cache=run nothing is shared."""
    import fastm2d.data.stats as stats_module
    from fastm2d.config import load_config
    from fastm2d.data.stats import run_norm_stats

    from .conftest import TINY_TRAIN, write_tone
    monkeypatch.setenv("FASTM2D_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "clips"
    folder.mkdir()
    files = [write_tone(folder / f"c{i}.wav", seconds=1.0, freq=300 + 50 * i) for i in range(6)]
    computed = []
    compute = stats_module.compute_norm_stats
    monkeypatch.setattr(stats_module, "compute_norm_stats", lambda *a, **k: computed.append(1) or compute(*a, **k))

    def stats_of(run, *extra):
        (tmp_path / run).mkdir(exist_ok=True)
        config = load_config(None, [f"out_dir={tmp_path / run}", *TINY_TRAIN, f"data.train={folder}", *extra])
        return run_norm_stats(LogMelSource(files), config, None, tmp_path / run / "norm_stats.json")

    first = stats_of("a")
    assert stats_of("b") == first and len(computed) == 1
    assert (tmp_path / "b" / "norm_stats.json").is_file()
    write_tone(files[2], seconds=1.0, freq=1234)  # a picked file's content (size, time) changed
    assert stats_of("c") != first and len(computed) == 2
    stats_of("d", "model.input_size=[80,32]")  # other crops
    assert len(computed) == 3
    stats_of("e", "data.check_cache=run")
    stats_of("f", "data.check_cache=run")
    assert len(computed) == 5
