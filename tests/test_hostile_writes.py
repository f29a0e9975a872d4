"""Writes in shared folders and full disks, for every command (issue "Hostile and unlucky inputs, round 2"):
no fastm2d command writes through a symbolic link planted where its output goes, a full disk is one line and
exit 1 with nothing half-written, and outputs torn by a kill are recomputed or refused with one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastm2d.cli import main

from .conftest import TINY_TRAIN, write_tone

VICTIM_TEXT = "precious: a file the attacker wants overwritten\n"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir(exist_ok=True)
    victim.write_text(VICTIM_TEXT)
    return victim


def _clips(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        write_tone(folder / f"c{i}.wav", seconds=1.0, freq=300 + 100 * i)
    return folder


@pytest.mark.parametrize("planted", ["config.yaml", "metrics.jsonl", "norm_stats.json", ".fastm2d.lock"])
def test_pretrain_never_writes_through_a_link_in_its_run_folder(tmp_path, capsys, planted):
    victim = _victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / planted).symlink_to(victim)
    rc = main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=1"])
    err = capsys.readouterr().err
    assert victim.read_text() == VICTIM_TEXT  # neither truncated, overwritten nor appended to
    assert rc == 2 and "symbolic link" in err and planted in err, err[-2000:]


def test_embed_and_linear_eval_and_prepare_never_write_through_links(tmp_path, capsys, tiny_run):
    victim = _victim(tmp_path)
    clips = _clips(tmp_path)
    feats = tmp_path / "feats"
    feats.mkdir()
    (feats / "manifest.jsonl").symlink_to(victim)
    assert main(["embed", "--weights", str(tiny_run), "--out", str(feats), str(clips)]) == 2
    assert "manifest.jsonl is a symbolic link" in capsys.readouterr().err
    (feats / "manifest.jsonl").unlink()
    (feats / "c0.npy").symlink_to(victim)  # an array's final name
    assert main(["embed", "--weights", str(tiny_run), "--out", str(feats), str(clips)]) == 2
    assert "c0.npy is a symbolic link" in capsys.readouterr().err

    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "results.md").symlink_to(victim)
    assert main(["linear-eval", "synthetic:60", "--weights", str(tiny_run), "--out", str(probes), "--seeds", "1",
                 "--quiet", "max_epochs=2"]) == 2
    assert "results.md is a symbolic link" in capsys.readouterr().err

    store = tmp_path / "store"
    store.mkdir()
    (store / "failures.tsv").symlink_to(victim)
    assert main(["prepare", str(clips), "--out", str(store), "--workers", "0"]) == 2
    assert "failures.tsv is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == VICTIM_TEXT


# ---------------------------------------------------------------------------------------------- full disk ----
def _with_file_size_limit(limit: int, args, cwd: Path) -> subprocess.CompletedProcess:
    """The command under RLIMIT_FSIZE: a write past `limit` bytes fails with EFBIG, as a full disk fails with
    ENOSPC (SIGXFSZ ignored so the write returns the error instead of killing the process)."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from fastm2d.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def _assert_one_line_disk_error(r: subprocess.CompletedProcess, folder: Path) -> None:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if "error:" in x][-1]
    assert "cannot write" in line and "file-size limit" in line, line
    assert not [p for p in folder.rglob(".*.tmp")], "a temporary file was left behind"


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_run, fmt):
    out = tmp_path / "export"
    r = _with_file_size_limit(64 * 1024, ["export", "--weights", str(tiny_run), "--out", str(out), "--format", fmt],
                              tmp_path)
    _assert_one_line_disk_error(r, tmp_path)
    assert not list(out.rglob(f"*.{fmt}"))


def test_embed_linear_eval_and_finetune_on_a_full_disk_are_one_line(tmp_path, tiny_run):
    clips = _clips(tmp_path)
    r = _with_file_size_limit(2048, ["embed", "--weights", str(tiny_run), "--out", str(tmp_path / "f"), str(clips),
                                     "--workers", "2"], tmp_path)
    _assert_one_line_disk_error(r, tmp_path)
    assert not list((tmp_path / "f").rglob("*.npy"))
    # with decoding workers (the default 2): the limit also caps shared-memory files, which the workers' hand-over
    # once went through (the command then waited for a batch PyTorch never said was lost, until killed)
    r = _with_file_size_limit(4096, ["linear-eval", "synthetic:60", "--weights", str(tiny_run), "--out",
                                     str(tmp_path / "p"), "--seeds", "1", "--quiet", "max_epochs=2"], tmp_path)
    _assert_one_line_disk_error(r, tmp_path)
    task = tmp_path / "task.csv"
    task.write_text("file_name,label,split\n" + "".join(f"clips/c{i}.wav,{'ab'[i % 2]},{s}\n" for i, s in
                                                          enumerate(["train", "train", "valid"])) +
                    "clips/c0.wav,a,test\nclips/c1.wav,b,test\n")
    r = _with_file_size_limit(4096, ["finetune", str(task), "--weights", str(tiny_run), "--out", str(tmp_path / "ft"),
                                     "--epochs", "1", "--batch-size", "2"], tmp_path)
    _assert_one_line_disk_error(r, tmp_path)
    assert not list((tmp_path / "ft").glob("*.pth"))


# -------------------------------------------------------------------------------------------- torn outputs ----
def test_a_model_folder_torn_between_its_two_files_is_refused(tmp_path, tiny_run, monkeypatch):
    import fastm2d.transfer.pretrained as pretrained
    from fastm2d import from_pretrained, save_pretrained
    from fastm2d.checkpoint import CheckpointError
    folder = tmp_path / "model"
    save_pretrained(tiny_run, folder)
    from_pretrained(folder)  # a whole save loads

    def killed(*a, **k):  # the process dies after the weights, before the config
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrained, "write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(tiny_run, folder)
    with pytest.raises(CheckpointError, match="come from two different saves"):
        from_pretrained(folder)


def test_a_torn_embedding_cache_is_recomputed(tmp_path, tiny_run, capsys):
    out = tmp_path / "probes"
    args = ["linear-eval", "synthetic:60", "--weights", str(tiny_run), "--out", str(out), "--seeds", "1", "--quiet",
            "max_epochs=2"]
    assert main(args) == 0
    cache = next((out / "cache").glob("*.npy"))
    good = np.load(cache)
    cache.write_bytes(cache.read_bytes()[: len(cache.read_bytes()) // 2])  # a kill or a full disk, before
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    assert np.allclose(np.load(cache), good)


# --------------------------------------------------------------------------------- two commands, one output ----
def test_a_second_command_on_a_folder_in_use_is_refused(tmp_path, capsys, tiny_run):
    """Another process holds the output (a running embed or prepare): the second command says so, exit 2, and leaves
    the folder as it was. (linear-eval shares its folder instead: test_two_linear_evals_on_one_results_file.)"""
    clips = _clips(tmp_path)
    for command, out in (["embed", tmp_path / "f"], ["prepare", tmp_path / "s"]):
        out.mkdir()
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastm2d.folder_lock import RunLock; "
                                   "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                                   str(out)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            args = {"embed": ["embed", "--weights", str(tiny_run), "--out", str(out), str(clips)],
                    "linear-eval": ["linear-eval", "synthetic:60", "--weights", str(tiny_run), "--out", str(out),
                                    "--quiet"],
                    "prepare": ["prepare", str(clips), "--out", str(out), "--workers", "0"]}[command]
            assert main(args) == 2
            assert f"{out} is in use by pid {holder.pid}" in capsys.readouterr().err
            assert sorted(p.name for p in out.iterdir()) == [".fastm2d.lock"]
        finally:
            holder.kill()
            holder.wait()


def test_a_killed_embed_leaves_no_temporary_behind_its_rerun(tmp_path, tiny_run):
    clips = _clips(tmp_path)
    out = tmp_path / "f"
    (out / "sub").mkdir(parents=True)
    for stale in (out / ".fastm2d-c0.npy.abc123.tmp", out / "sub" / ".fastm2d-x.npy.def456.tmp"):  # a kill's leftovers
        stale.write_bytes(b"torn")
    (out / "sub" / "notes.tmp").write_text("the user's own: never ours to delete")
    assert main(["embed", "--weights", str(tiny_run), "--out", str(out), str(clips)]) == 0
    assert [p.name for p in out.rglob("*.tmp")] == ["notes.tmp"] and len(list(out.glob("c*.npy"))) == 3


# -------------------------------------------------------------------------------- output names on disk ----
def test_a_rerun_into_the_same_out_keeps_an_earlier_array_of_the_same_stem(tmp_path, tiny_run):
    import json
    a = write_tone(tmp_path / "x" / "a.wav" if (tmp_path / "x").mkdir() or True else None, seconds=1.0, freq=300)
    b = write_tone(tmp_path / "y" / "a.wav" if (tmp_path / "y").mkdir() or True else None, seconds=2.0, freq=900)
    out = tmp_path / "f"
    assert main(["embed", "--weights", str(tiny_run), "--out", str(out), str(a)]) == 0
    first = np.load(out / "a.npy")
    assert main(["embed", "--weights", str(tiny_run), "--out", str(out), str(b)]) == 0
    assert np.array_equal(np.load(out / "a.npy"), first)  # the earlier run's array, not replaced
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["file"]: r["array"] for r in rows} == {str(a): "a.npy", str(b): "a_.npy"}
    assert np.load(out / "a_.npy").shape[0] > first.shape[0]  # 2 s of frames
    assert main(["embed", "--weights", str(tiny_run), "--out", str(out), str(a), str(b)]) == 0  # both skipped
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2


def test_many_inputs_of_one_name_get_short_names_in_linear_time(tmp_path):
    from fastm2d.transfer.embed_corpus import expand_inputs
    paths = [str(tmp_path / f"d{i}" / "clip.wav") for i in range(3000)]
    items = expand_inputs(paths + paths[:5], "timestamp")  # five given twice: embedded once
    names = [it.name for it in items]
    assert len(items) == 3000 and len(set(names)) == 3000
    assert max(len(n) for n in names) <= len("clip_3000")
    long_stem = "x" * 250  # the file system's 255-byte limit once ".timestamps.npy" is added
    (item,) = expand_inputs([str(tmp_path / f"{long_stem}.wav")], "timestamp")
    assert len((item.name + ".timestamps.npy").encode()) <= 255


def test_an_input_with_a_name_near_the_limit_is_embedded(tmp_path, tiny_run):
    clip = write_tone(tmp_path / ("y" * 240 + ".wav"), seconds=1.0)
    out = tmp_path / "f"
    assert main(["embed", "--level", "timestamp", "--weights", str(tiny_run), "--out", str(out), str(clip)]) == 0
    assert len(list(out.glob("*.timestamps.npy"))) == 1


# ------------------------------------------------------------------------------------ odd but valid inputs ----
def test_audio_whose_name_is_not_utf8_is_read_by_prepare_embed_and_tag(tmp_path, tiny_run, capsys):
    """A name that is not valid UTF-8 is still a valid file name (Python keeps its bytes as surrogates);
    soundfile refuses to encode such a path, so fastm2d opens the file itself."""
    import io
    import json

    import soundfile as sf

    from fastm2d.data.store import LogMelStore

    from .test_released_models import build_release
    folder = tmp_path / "clips"
    folder.mkdir()
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.random.default_rng(0).standard_normal(16000)).astype("float32"), 16000, format="WAV")
    odd = os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.wav")  # Latin-1 bytes, not UTF-8
    with open(odd, "wb") as f:
        f.write(buf.getvalue())
    assert main(["prepare", str(folder), "--out", str(tmp_path / "store"), "--workers", "0"]) == 0
    store = LogMelStore(tmp_path / "store")
    assert len(store) == 1 and store.names[0] == odd and store[0].shape[0] == 80
    assert main(["embed", "--weights", str(tiny_run), "--out", str(tmp_path / "f"), str(folder)]) == 0
    row = json.loads((tmp_path / "f" / "manifest.jsonl").read_text())
    assert row["file"] == odd and (tmp_path / "f" / row["array"]).is_file()
    capsys.readouterr()
    weights, _, _, _ = build_release(tmp_path / "w", "m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly",
                                     "weights_ep69it3124-0.48494.pth", "finetuned", ())
    assert main(["tag", odd, "--weights", str(weights), "--topk", "2"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["file"] == odd and len(out["labels"]) == 2


@pytest.mark.parametrize("row", ["shard", "offset", "frames", "negative"])
def test_a_store_index_row_outside_its_shard_is_refused_on_open(tmp_path, row):
    """Rows the size checks cannot see: the shard's bytes are right, the row points past them or into nothing."""
    from fastm2d.data import DataError
    from fastm2d.data.prepare import prepare
    from fastm2d.data.store import INDEX_CACHE, LogMelStore
    clips = _clips(tmp_path, n=4)
    store = tmp_path / "store"
    prepare(str(clips), store, workers=0, files_per_shard=2, stats_items=4, progress=False)
    lines = (store / "index.tsv").read_text().splitlines()
    name, shard, offset, frames, audio = lines[2].split("\t")
    changed = {"shard": [name, "7", offset, frames, audio],
               "offset": [name, shard, str(int(offset) + 10_000), frames, audio],
               "frames": [name, shard, offset, str(int(frames) * 50), audio],
               "negative": [name, shard, "-3", frames, audio]}[row]
    lines[2] = "\t".join(changed)
    (store / "index.tsv").write_text("\n".join(lines) + "\n")
    (store / INDEX_CACHE).unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"index.tsv: 1 rows point outside their shards, e\.g\. row 3"):
        LogMelStore(store)


def test_two_linear_evals_on_one_results_file_both_keep_their_rows(tmp_path, tiny_run):
    """A second linear-eval into a shared results folder once refused, and its row was lost: it now waits for the
    row being written and adds its own."""
    out = tmp_path / "p"
    base = ["linear-eval", "synthetic:60", "--weights", str(tiny_run), "--out", str(out), "--quiet", "--seeds", "1"]
    assert main(base) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from fastm2d.folder_lock import waiting_lock\n"
                               "with waiting_lock(Path(sys.argv[1]) / '.results.lock'):\n"
                               "    print('held', flush=True); time.sleep(3)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another run is writing its row right now
        assert main([*base, "--untrained"]) == 0
    finally:
        holder.wait(timeout=60)
    rows = [r for r in (out / "results.md").read_text().splitlines() if "synthetic" in r]
    assert len(rows) == 4 and sum("untrained" in r for r in rows) == 2, rows  # two synthetic tasks each
