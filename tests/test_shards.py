"""Streamed tar shards (data/shards.py): written by `prepare --format shards` from real files, served by an HTTP
server on 127.0.0.1 started here, dealt disjointly to ranks and loader workers, and trained on."""
from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fastm2d.cli import main
from fastm2d.data.shards import ShardBatches, ShardCrops, ShardSource, deal_shards
from fastm2d.run_folder import RunFolder
from fastm2d.train import pretrain, read_metrics

from .conftest import TINY_TRAIN, write_tone

pytest.importorskip("webdataset", reason="streamed shards need webdataset (the test extra)")


@pytest.fixture
def shard_folder(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(12):
        write_tone(clips / f"c{i:02d}.wav", seconds=0.5 + 0.1 * i, freq=200 + 40 * i)
    (clips / "broken.wav").write_bytes(b"RIFF....not audio")
    out = tmp_path / "shards"
    assert main(["prepare", str(clips), "--out", str(out), "--format", "shards", "--files-per-shard", "3"]) == 0
    return clips, out


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list  # every path asked for, in order (set per server)
    cut_once: set  # paths whose first answer breaks off midway

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        if self.path in self.cut_once:  # the first answer breaks off after half of the shard, as a network would
            self.cut_once.discard(self.path)
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_server(shard_folder):
    """The shard folder served over HTTP on 127.0.0.1 (a thread of this test: no network beyond this machine);
    -> (base URL, the list of paths requested)."""
    _, out = shard_folder
    requests, cut_once = [], set()
    handler = functools.partial(type("Handler", (_Handler,), {"requests": requests, "cut_once": cut_once}),
                                directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests, cut_once
    server.shutdown()


@pytest.fixture
def http_base(http_server):
    return http_server[0]


def test_prepare_writes_the_original_bytes_and_lists_failures(shard_folder):
    clips, out = shard_folder
    manifest = json.loads((out / "shards.json").read_text())
    assert manifest["samples"] == 12 and manifest["failures"] == 1 and len(manifest["shards"]) == 4
    assert "broken.wav" in (out / "failures.tsv").read_text()
    with tarfile.open(out / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    name = json.loads(members["000000000.json"])["name"]
    assert members["000000000.wav"] == (clips / name.split("/")[-1]).read_bytes()  # no re-encoding


def test_shards_are_dealt_disjointly_to_two_ranks_of_two_workers(http_base):
    """Every shard to exactly one (rank, worker) pair per epoch, their union the whole list; the order changes
    with the epoch and is the same on every machine (seed, epoch)."""
    for epoch in range(3):
        dealt = [deal_shards(10, 42, epoch, r, 2, w, 2) for r in range(2) for w in range(2)]
        flat = sorted(k for d in dealt for k in d)
        assert flat == list(range(10))
    assert deal_shards(10, 42, 0, 0, 2, 0, 2) != deal_shards(10, 42, 1, 0, 2, 0, 2)
    # Over HTTP, two ranks with two DataLoader workers each (the ranks' code is a function of rank and world size
    # only, run here one after the other): the crops of an epoch come from disjoint samples, every sample once,
    # the same number of batches on every rank.
    src = ShardSource(f"{http_base}/shard-{{000000..000003}}.tar", 16000, 32, 0, stats_items=4)
    assert len(src) == 12
    seen = []
    for rank in range(2):
        batches = list(ShardBatches(ShardCrops(src, 0, 42, rank, 2, batches=3, batch_size=2), workers=2))
        assert len(batches) == 3 and all(b["lms"].shape == (2, 1, 80, 32) for b in batches)
        seen += [key for b in batches for key in b["keys"]]
    assert sorted(seen) == [f"{i:09d}" for i in range(12)]  # 2 ranks x 3 batches x 2 = every sample exactly once


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores: on purpose
def test_an_epoch_cut_after_any_batch_continues_with_the_same_batches(http_base):
    """Three workers making chunks of 3 crops into batches of 2 (chunks split across batches, workers out of step):
    from the positions after any batch k, a new stream gives exactly the uninterrupted stream's batches k+1...
    (their samples and crops), whatever order the workers' chunks arrive in."""
    src = ShardSource(f"{http_base}/shard-{{000000..000003}}.tar", 16000, 32, 0, stats_items=4)

    def stream(start=None):
        return ShardBatches(ShardCrops(src, 1, 42, 0, 1, batches=6, batch_size=2, start=start, chunk=3), workers=3)

    whole, states = [], []
    it = stream()
    for batch in it:
        whole.append(batch)
        states.append([list(row) for row in it.state])
    assert len(whole) == 6 and sorted(k for b in whole for k in b["keys"]) == [f"{i:09d}" for i in range(12)]
    for k in (0, 1, 2, 4):
        rest = list(stream(states[k]))
        assert [b["keys"] for b in rest] == [b["keys"] for b in whole[k + 1:]], k
        assert all(torch.equal(a["lms"], b["lms"]) for a, b in zip(rest, whole[k + 1:]))


def test_a_stream_broken_midway_is_fetched_again_without_repeating_samples(http_server):
    """The first answer for a shard breaks off after half its bytes: the worker fetches it again and gives each of
    its samples once (a retry that started over would give the first ones twice)."""
    base, requests, cut_once = http_server
    cut_once.add("/shard-000001.tar")
    src = ShardSource(f"{base}/shard-{{000000..000003}}.tar", 16000, 32, 0, stats_items=4)
    keys = [key for b in ShardBatches(ShardCrops(src, 0, 42, 0, 1, batches=6, batch_size=2), 0) for key in b["keys"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(12)]  # 12 crops from 12 samples: each exactly once
    assert requests.count("/shard-000001.tar") == 2
    # statistics (and the monitors' clips) stream through the same retries: the same values as an unbroken read
    whole = ShardSource(f"{base}/shard-{{000000..000003}}.tar", 16000, 32, 0, stats_items=6).norm_stats
    cut_once.add("/shard-000000.tar")
    assert ShardSource(f"{base}/shard-{{000000..000003}}.tar", 16000, 32, 0, stats_items=6).norm_stats == whole


def test_a_shard_that_cannot_be_fetched_is_listed_and_the_epoch_keeps_its_length(shard_folder, http_server, tmp_path):
    """A shard the manifest lists but the server answers 404 for: tried three times, listed with the reason, and
    the run goes on; the worker reads its other shards again so the epoch keeps its 6 batches."""
    _, out = shard_folder
    base, requests, _ = http_server
    (out / "shard-000002.tar").unlink()
    bad = tmp_path / "bad.txt"
    src = ShardSource(f"{base}/shard-{{000000..000003}}.tar", 16000, 32, 0, stats_items=4)
    batches = list(ShardBatches(ShardCrops(src, 0, 42, 0, 1, batches=6, batch_size=2, bad_list=bad), 0))
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == 6 and not {f"{i:09d}" for i in (6, 7, 8)} & set(keys)  # shard 2 holds samples 6-8
    assert requests.count("/shard-000002.tar") == 3
    assert "shard-000002.tar: cannot be read" in bad.read_text() and "after 3 tries" in bad.read_text()


def test_pretrain_streams_shards_over_http_and_resumes(http_base, tmp_path, capsys):
    run = tmp_path / "run"
    spec = f"{http_base}/shard-{{000000..000003}}.tar"
    args = ["pretrain", f"out_dir={run}", *[a for a in TINY_TRAIN if not a.startswith("data.num_workers")],
            f"data.train={spec}", "data.num_workers=2", "train.batch_size=2", "data.stats_items=6"]
    tr = pretrain_from(args + ["train.max_steps=3"])
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in read_metrics(run))
    stats = json.loads((run / "norm_stats.json").read_text())["norm_stats"]
    assert stats[1] > 0 and tr.data.sampler.batches_per_epoch == 12 // 2
    assert main(args + ["train.max_steps=5", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    bad = (run / "bad_training_files.txt")
    assert not bad.exists() or "broken" not in bad.read_text()  # listed at prepare time, never shipped


def test_a_resume_mid_epoch_continues_the_stream_exactly(http_base, tmp_path):
    """Checkpoints after every step of an epoch of 6 steps; from step 3's, `--resume` to 5 gives the very weights
    the uninterrupted run had at 5: the two workers continue their streams after their last used crops (a
    restarted epoch would feed steps 4-5 the samples of steps 1-2 and differ)."""
    run = tmp_path / "run"
    spec = f"{http_base}/shard-{{000000..000003}}.tar"
    args = ["pretrain", f"out_dir={run}", *[a for a in TINY_TRAIN if not a.startswith("data.num_workers")],
            f"data.train={spec}", "data.num_workers=2", "train.batch_size=2", "data.norm_stats=[-10,3.5]",
            "train.save_every=1", "train.keep_checkpoints=10", "train.max_steps=5"]
    assert main(args) == 0
    whole = torch.load(run / "checkpoint-5.pth", weights_only=True)
    assert whole["shard_position"]["epoch"] == 0 and len(whole["shard_position"]["rows"]) == 1
    used = sum(row[1] + row[5] for row in whole["shard_position"]["rows"][0])  # chunk start + its used crops
    assert used == 5 * 2  # the crops of 5 steps of 2
    for step in (4, 5):
        (run / f"checkpoint-{step}.pth").unlink()
    assert main(args + ["--resume"]) == 0
    resumed = torch.load(run / "checkpoint-5.pth", weights_only=True)
    assert resumed["shard_position"] == whole["shard_position"]
    for k, v in whole["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_a_damaged_stream_position_is_refused_naming_it(http_base, tmp_path, capsys):
    run = tmp_path / "run"
    spec = f"{http_base}/shard-{{000000..000003}}.tar"
    args = ["pretrain", f"out_dir={run}", *TINY_TRAIN, f"data.train={spec}", "train.batch_size=2",
            "data.norm_stats=[-10,3.5]", "train.max_steps=1"]
    assert main(args) == 0
    obj = torch.load(run / "checkpoint-1.pth", weights_only=True)
    obj["shard_position"]["rows"][0][0][1] = -4
    torch.save(obj, run / "checkpoint-1.pth")
    assert main(args[:-1] + ["train.max_steps=2", "--resume"]) == 2
    assert "shard_position is not a stream position" in capsys.readouterr().err


def pretrain_from(args):
    from fastm2d.config import load_config
    overrides = [a for a in args[1:]]
    return pretrain(load_config(None, overrides))


def test_what_shards_do_not_do_yet_is_one_line(http_base, tmp_path, capsys):
    spec = f"{http_base}/shard-{{000000..000003}}.tar"
    for extra, said in ((["offline.task=distill", f"offline.features={tmp_path}"], "offline.features"),
                        (["offline.task=labels", f"offline.classes={tmp_path}/c.txt", "offline.balanced=true"],
                         "offline.balanced"),
                        (["offline.task=labels"], "set offline.classes=FILE")):
        assert main(["pretrain", f"out_dir={tmp_path / 'r'}", *TINY_TRAIN, f"data.train={spec}", *extra]) == 2
        assert said in capsys.readouterr().err
    assert main(["pretrain", f"out_dir={tmp_path / 'r2'}", *TINY_TRAIN,
                 f"data.train={http_base}/nothere-{{0..1}}.tar"]) == 2
    assert "shards.json" in capsys.readouterr().err
    # 4 shards cannot give each of 5 loader workers its own
    assert main(["pretrain", f"out_dir={tmp_path / 'r3'}", *[a for a in TINY_TRAIN if not a.startswith("data.num_w")],
                 f"data.train={spec}", "data.num_workers=5", "train.batch_size=2", "data.norm_stats=[-10,3.5]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "4 shards cannot give each of 1 ranks x 5 loader workers its own" in err[-1]


def test_a_small_set_fills_min_epoch_items_and_short_clips_can_be_tiled(http_base, shard_folder):
    """data.min_epoch_items: an epoch of 24 crops from 12 samples reads each sample exactly twice. data.repeat_short:
    a crop of a clip shorter than it is the clip's log-mel tiled (noise.tile_crop on the file's own log-mel, with
    the crop's seed), not padded with silence."""
    from fastm2d.data.noise import tile_crop
    from fastm2d.frontend import LogMelSpectrogram, read_audio
    spec = f"{http_base}/shard-{{000000..000003}}.tar"
    src = ShardSource(spec, 16000, 64, 0, stats_items=4, repeat_short=True)
    batches = list(ShardBatches(ShardCrops(src, 0, 42, 0, 1, batches=12, batch_size=2), 0))
    keys = [key for b in batches for key in b["keys"]]
    crops = torch.cat([b["lms"] for b in batches])  # one worker: crop i is its i-th
    assert sorted(keys) == sorted([f"{i:09d}" for i in range(12)] * 2)
    names = _names_by_key(shard_folder[1])
    fe = LogMelSpectrogram(16000)
    short = 0
    for made, key in enumerate(keys):
        lms = fe(read_audio(Path(names[key]), 16000)).numpy()
        if lms.shape[1] >= 64:
            continue
        short += 1
        expected = tile_crop(lms, 64, np.random.default_rng([42, 0, 0, 0, made]))
        np.testing.assert_allclose(crops[made, 0].numpy(), expected, rtol=1e-5, atol=1e-4)
    assert short >= 2  # 0.5 and 0.6 s clips: 50 and 60 frames, each read twice


def test_noise_numbers_are_the_runs_sample_numbers_across_ranks_workers_and_epochs(http_base):
    """Every crop of 2 ranks x 2 workers x 2 epochs gets a different training-sample number for its background
    (the noise stream keys on it), together exactly 0..47: the numbering the files' sampler gives."""
    src = ShardSource(f"{http_base}/shard-{{000000..000003}}.tar", 16000, 32, 0, stats_items=4)
    numbers = []
    for epoch in range(2):
        for rank in range(2):
            crops = ShardCrops(src, epoch, 42, rank, 2, batches=6, batch_size=2,
                               background=lambda k: np.full((80, 32), k, dtype=np.float32))
            numbers += [int(n) for b in ShardBatches(crops, workers=2) for n in b["bg"][:, 0, 0, 0]]
    assert sorted(numbers) == list(range(48))


def test_m2d_x_from_shards_noise_shards_labels_teacher_and_monitors(shard_folder, http_server, tmp_path):
    """M2D-X as from files, the shards streamed over HTTP: labels from each sample's JSON (`prepare --labels`),
    background noise given as shards (copied once to the machine's cache, then read as files), a regularising
    teacher, and the monitors' clips from the stream's first samples."""
    clips, _ = shard_folder
    base, requests, _ = http_server
    csv = tmp_path / "labels.csv"
    csv.write_text("file,labels\n" + "".join(f"{f},{'low' if i < 6 else 'high'}\n"
                                            for i, f in enumerate(sorted(clips.glob("c*.wav")))))
    (tmp_path / "classes.txt").write_text("low\nhigh\n")
    labelled = tmp_path / "labelled"
    assert main(["prepare", str(clips), "--out", str(labelled), "--format", "shards", "--files-per-shard", "3",
                 "--labels", str(csv)]) == 0
    with tarfile.open(labelled / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert meta["labels"] == ["low"] and meta["name"].endswith("c00.wav")
    spec = f"{base}/shard-{{000000..000003}}.tar"  # the unlabelled shards, as noise
    common = ["pretrain", *TINY_TRAIN, "train.batch_size=2", "data.norm_stats=[-10,3.5]", "train.max_steps=2"]
    run = tmp_path / "labels_noise"
    assert main([*common, f"out_dir={run}", f"data.train={labelled}/shard-{{000000..000003}}.tar",
                 "offline.task=labels", f"offline.classes={tmp_path / 'classes.txt'}", f"data.noise.train={spec}",
                 "data.noise.eta=0.3", "data.noise.norm_stats=[-10,3.5]", "train.eval_every=2", "eval.clips=4"]) == 0
    rows = read_metrics(run)
    assert len(rows) == 2 and all(np.isfinite(r["loss_off"]) and r["loss_off"] > 0 for r in rows)
    assert [r["step"] for r in read_metrics(run, monitors=True)] == [2] and read_metrics(run, True)[0]["rank_me"] > 0
    copies = list((Path(os.environ["FASTM2D_CACHE"]) / "shard_copies").glob("*/complete.json"))
    assert len(copies) == 1 and json.loads(copies[0].read_text())["files"] == 12
    fetched = len(requests)
    run2 = tmp_path / "labels_noise_again"
    assert main([*common, f"out_dir={run2}", f"data.train={labelled}/shard-{{000000..000003}}.tar",
                 f"data.noise.train={spec}", "data.noise.eta=0.3", "data.noise.norm_stats=[-10,3.5]"]) == 0
    assert len(requests) == fetched  # the noise copy was reused: nothing fetched over HTTP again
    # what the trainer hands the step: the noise crop and the labels of every sample
    from fastm2d.config import load_config
    from fastm2d.train import Trainer
    tr = Trainer(load_config(None, [*common[1:], f"out_dir={tmp_path / 'look'}", "offline.task=labels",
                                    f"data.train={labelled}/shard-{{000000..000003}}.tar",
                                    f"offline.classes={tmp_path / 'classes.txt'}", f"data.noise.train={spec}",
                                    "data.noise.eta=0.3", "data.noise.norm_stats=[-10,3.5]"]))
    handed = []
    tr.to_batch = lambda raw, bg=None, offline=None: handed.append((raw, bg, offline))
    next(tr.micro_batches())
    raw, bg, offline = handed[0]
    assert bg.shape == raw.shape == (2, 1, 80, 64) and not torch.equal(bg, raw)
    assert offline.shape == (2, 2) and torch.all(offline.sum(1) == 1)
    teacher = run / "checkpoint-2.pth"
    run3 = tmp_path / "regularize"
    assert main([*common, f"out_dir={run3}", f"data.train={spec}", "offline.task=regularize",
                 f"train.init_from={teacher}"]) == 0
    assert all(np.isfinite(r["loss_off"]) for r in read_metrics(run3))


def _names_by_key(out):
    """key -> the source file `prepare` recorded in each sample's JSON, over the shards in `out`."""
    names = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            names.update({m.name[:-5]: json.loads(tar.extractfile(m).read())["name"]
                          for m in tar.getmembers() if m.name.endswith(".json")})
    return names


def test_clap_targets_are_found_by_each_samples_file_name_and_drawn_by_its_crop(shard_folder, http_base, tmp_path):
    """Precomputed caption embeddings keyed by file stem: every crop's target is one of ITS clip's rows (a clip
    with two captions gets both over two epochs); a clip with no embedding is listed and skipped."""
    from fastm2d.data.captions import NamedCaptions
    _, out = shard_folder
    names = _names_by_key(out)
    rng = np.random.default_rng(0)
    table = {f"c{i:02d}": rng.standard_normal((1 + i % 2, 8)).astype(np.float32) for i in range(12) if i != 5}
    targets = NamedCaptions.from_precomputed(table, "capemb.npz")
    src = ShardSource(f"{http_base}/shard-{{000000..000003}}.tar", 16000, 32, 0, stats_items=4)
    bad, used = tmp_path / "bad.txt", {}
    for epoch in range(2):
        for b in ShardBatches(ShardCrops(src, epoch, 42, 0, 1, batches=5, batch_size=2, bad_list=bad,
                                         targets=targets), 0):
            for key, got in zip(b["keys"], b["offline"].numpy()):
                rows = table[Path(names[key]).stem]
                k = int(np.argmin(np.abs(rows - got).max(axis=1)))
                assert np.array_equal(rows[k], got)
                used.setdefault(Path(names[key]).stem, set()).add(k)
    assert "c05" not in used and "c05.wav: no caption in capemb.npz" in bad.read_text()
    assert any(len(ks) == 2 for ks in used.values())  # both captions of a two-caption clip drawn


def test_clap_pretrains_from_shards_with_a_text_encoder(shard_folder, http_base, tmp_path):
    """offline.task=clap over HTTP with captions in a CSV keyed by the files' paths, encoded by a local text model
    (conftest.tiny_bert): trains, the CLIP term finite; the captions CSV need only hold what the shards hold."""
    from .conftest import tiny_bert
    clips, _ = shard_folder
    tiny_bert(tmp_path / "text", ["low", "high", "tone"])
    csv = tmp_path / "captions.csv"
    csv.write_text("file_name,caption\n" + "".join(f"{f},{'low tone' if i < 6 else 'high tone'}\n"
                                                  for i, f in enumerate(sorted(clips.glob("c*.wav")))))
    run = tmp_path / "clap"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.batch_size=2", "data.norm_stats=[-10,3.5]",
                 f"data.train={http_base}/shard-{{000000..000003}}.tar", "offline.task=clap",
                 f"offline.captions={csv}", f"offline.text_encoder={tmp_path / 'text'}",
                 f"offline.caption_cache={tmp_path / 'cache'}", "model.lambda_off=0.01", "train.max_steps=2"]) == 0
    rows = read_metrics(run)
    assert len(rows) == 2 and all(np.isfinite(r["loss_off"]) and r["loss_off"] > 0 for r in rows)


def test_shards_read_through_a_pipe_command_find_their_manifest_through_it_too(shard_folder):
    """`pipe:CMD` (as `pipe:aws s3 cp s3://bucket/shard-000000.tar -`): shards.json is read by the same command with
    the shard's name replaced, and the samples stream from the commands' output."""
    from fastm2d.data.shards import manifest_address
    assert manifest_address("pipe:aws s3 cp s3://b/as/shard-000007.tar -") == "pipe:aws s3 cp s3://b/as/shards.json -"
    assert manifest_address("https://h/x/shard-1.tar") == "https://h/x/shards.json"
    assert manifest_address("shard-1.tar") == "shards.json"
    _, out = shard_folder
    # a word after the shard, as aws's `-`: the shard's name in shards.json is still found
    src = ShardSource(f"pipe:cat {out}/shard-{{000000..000003}}.tar /dev/null", 16000, 32, 0, stats_items=4)
    assert len(src) == 12
    keys = [k for b in ShardBatches(ShardCrops(src, 0, 42, 0, 1, batches=6, batch_size=2), 0) for k in b["keys"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(12)]


def test_logmel_shards_hold_what_a_store_holds_and_train(shard_folder, tmp_path, capsys, caplog):
    """`prepare --format logmel-shards`: each sample is the log-mel the store holds for its file (fp16, padded by
    the rule for the longest crop, cut as the store cuts it for this crop), so their crops equal the audio shards'
    crops up to fp16 rounding; a run trains on them; a run at another sample rate is refused."""
    clips, audio = shard_folder
    out = tmp_path / "lms"
    assert main(["prepare", str(clips), "--out", str(out), "--format", "logmel-shards", "--files-per-shard", "3",
                 "--crop-frames", "64", "--workers", "2"]) == 0
    manifest = json.loads((out / "shards.json").read_text())
    assert manifest["format"] == "fastm2d-logmel-shards" and manifest["samples"] == 12
    assert manifest["frontend"]["sample_rate"] == 16000 and manifest["max_crop_frames"] == 64
    assert "broken.wav" in (out / "failures.tsv").read_text()
    spec = "shard-{000000..000003}.tar"
    from fastm2d.frontend import pad_samples
    a = ShardSource(f"{audio}/{spec}", 16000, 64, pad_samples(16000, 64), stats_items=4)
    m = ShardSource(f"{out}/{spec}", 16000, 64, pad_samples(16000, 64), stats_items=4)
    ba = list(ShardBatches(ShardCrops(a, 0, 42, 0, 1, batches=6, batch_size=2), 0))
    bm = list(ShardBatches(ShardCrops(m, 0, 42, 0, 1, batches=6, batch_size=2), 0))
    assert [b["keys"] for b in ba] == [b["keys"] for b in bm]
    crops_a, crops_m = torch.cat([b["lms"] for b in ba]), torch.cat([b["lms"] for b in bm])
    assert torch.allclose(crops_a, crops_m, atol=0.02)  # fp16 of log-mel values of magnitude < 16
    assert m.norm_stats == pytest.approx(a.norm_stats, rel=1e-3)
    with caplog.at_level("WARNING", logger="fastm2d.data"):  # a longer crop than prepared for: said, as by a store
        ShardSource(f"{out}/{spec}", 16000, 96, pad_samples(16000, 96))
    assert "prepared for crops of up to 64 frames; crops of 96 frames" in caplog.text
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, f"data.train={out}/{spec}", "train.batch_size=2",
                 "train.max_steps=2", "data.stats_items=6"]) == 0
    assert all(np.isfinite(r["loss"]) for r in read_metrics(run))
    capsys.readouterr()
    assert main(["pretrain", f"out_dir={tmp_path / 'r32'}", *TINY_TRAIN, f"data.train={out}/{spec}",
                 "data.sample_rate=32000", "train.max_steps=1"]) == 2
    assert "log-mel made at 16000 Hz" in capsys.readouterr().err


def test_stats_of_streamed_shards_as_training_computes_them(shard_folder, http_base, capsys):
    """`fastm2d stats <shards>`: mean and std over one crop of each of the first N samples in shard order, equal to
    the same crops computed here from the source files (their padded log-mel, numpy's std in float64)."""
    from fastm2d.data.dataset import crop_clip
    from fastm2d.frontend import LogMelSpectrogram, pad_samples, read_audio
    names = _names_by_key(shard_folder[1])
    assert main(["stats", f"{http_base}/shard-{{000000..000003}}.tar", "--items", "5", *TINY_TRAIN[:8],
                 "train.seed=7"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fe, rng, crops = LogMelSpectrogram(16000), np.random.default_rng(7), []
    for key in sorted(names)[:5]:
        wav = read_audio(Path(names[key]), 16000)
        wav = torch.nn.functional.pad(wav, (0, max(0, pad_samples(16000, 64) - len(wav))))
        crops.append(crop_clip(fe(wav).numpy(), 64, rng)[0].astype(np.float64))
    values = np.concatenate([c.ravel() for c in crops])
    assert record["norm_stats"] == pytest.approx([values.mean(), values.std()], rel=1e-6)


def test_a_resume_of_another_shape_restarts_the_epoch_and_says_so(caplog):
    from fastm2d.data.shards import resume_start
    saved = {"epoch": 3, "rows": [[[0, 32, 0, 1, 5, 2], [1, 0, 0, 0, 0, 0]]] * 2}
    assert resume_start(saved, 3, 4, 1, 2, 2) == saved["rows"][1]  # the same launch: exact
    assert resume_start(saved, 4, 0, 0, 2, 2) is None  # a new epoch starts fresh
    assert resume_start(None, 3, 4, 0, 2, 2) is None
    with caplog.at_level("WARNING", logger="fastm2d.data"):
        assert resume_start(saved, 3, 4, 0, 4, 2) is None  # 4 ranks now
        assert resume_start(saved, 3, 4, 0, 2, 3) is None  # 3 loader workers now
    assert caplog.text.count("restarts from its beginning") == 2


def test_shards_with_no_usable_sample_stop_with_one_line_from_a_loader_worker(tmp_path, capsys):
    """Every sample undecodable: the loader worker's DataError reaches the user as its own one line (torch re-raises
    a worker's error with the worker's traceback as its message), exit 2."""
    import webdataset
    for k in range(2):
        with webdataset.TarWriter(str(tmp_path / f"shard-{k:06d}.tar")) as w:
            for i in range(3):
                w.write({"__key__": f"{k}{i:08d}", "wav": b"RIFF-but-not-audio" * 8})
    (tmp_path / "shards.json").write_text(json.dumps({"shards": [{"file": f"shard-{k:06d}.tar", "samples": 3}
                                                                for k in range(2)]}))
    args = ["pretrain", f"out_dir={tmp_path / 'run'}", *[a for a in TINY_TRAIN if not a.startswith("data.num_w")],
            f"data.train={tmp_path}/shard-{{000000..000001}}.tar", "data.num_workers=1", "train.batch_size=2",
            "data.norm_stats=[-10,3.5]", "train.max_steps=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastm2d pretrain: error: rank 0 worker 0: none of its shards gave a usable sample")
    assert not any("Traceback" in line for line in err)


def test_a_sample_without_labels_is_listed_and_skipped(tmp_path):
    from fastm2d.data.offline_targets import ShardLabels
    from fastm2d.data.sources import DataError
    (tmp_path / "classes.txt").write_text("dog\ncat\nbird\n")
    labels = ShardLabels(tmp_path / "classes.txt")
    np.testing.assert_array_equal(labels({"json": b'{"labels": "cat;2"}'}), [0, 1, 1])
    np.testing.assert_array_equal(labels({"json": b'{"label": ["dog"]}'}), [1, 0, 0])
    for sample, said in (({"__key__": "k1"}, "no labels"), ({"json": b'{"labels": "cow"}'}, "unknown class 'cow'"),
                         ({"json": b"{not json"}, "not JSON")):
        with pytest.raises(DataError, match=said):
            labels(sample)


@pytest.mark.slow
def test_a_kill_9_mid_epoch_resumes_as_stated(http_base, tmp_path):
    """SIGKILL a run streaming shards over HTTP (the trainer and its loader workers) after its step-2 checkpoint;
    `--resume` continues from it: metrics rows 1..8 once each (the weights' exactness: the test above)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    spec = f"{http_base}/shard-{{000000..000003}}.tar"
    args = [sys.executable, "-m", "fastm2d.cli", "pretrain", f"out_dir={run}",
            *[a for a in TINY_TRAIN if not a.startswith(("data.num_workers", "train.log_every"))],
            f"data.train={spec}", "data.num_workers=2", "train.batch_size=2", "data.stats_items=6",
            "train.save_every=2", "train.log_every=1", "train.max_steps=400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.time()
    while not (run / "checkpoint-2.pth").exists():
        assert proc.poll() is None and time.time() - t0 < 180, proc.stderr.read()[-3000:] if proc.poll() else "slow"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers, without warning
    proc.wait()
    killed_at = max(r["step"] for r in read_metrics(run))
    r = subprocess.run([*args[:-1], "train.max_steps=8", "--resume"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [row["step"] for row in read_metrics(run)]
    assert steps == list(range(1, 9)), (killed_at, steps)  # rows after the checkpoint dropped, then continued


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (the test extra)")
def test_two_processes_stream_disjoint_shards_over_http_and_resume_exactly(http_server, tmp_path):
    """`torchrun --nproc_per_node=2` (gloo, DeepSpeed), two loader workers per rank, shards over HTTP: one epoch
    fetches every shard exactly once (4 shards, 2 ranks x 2 workers: disjoint, their union the epoch); then, from the
    step-2 checkpoint (mid-epoch), `--resume` reaches the uninterrupted run's step-3 weights exactly (both ranks'
    stream positions travel in the checkpoint)."""
    base, requests, _ = http_server
    run = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29551", "-m",
            "fastm2d.cli", "pretrain", f"out_dir={run}", *[a for a in TINY_TRAIN if not a.startswith("data.num_w")],
            f"data.train={base}/shard-{{000000..000003}}.tar", "data.num_workers=2", "train.batch_size=2",
            "data.norm_stats=[-10,3.5]", "train.engine=deepspeed", "train.save_every=1", "train.keep_checkpoints=10",
            "train.max_steps=3"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fetched = sorted(p for p in requests if p.endswith(".tar"))
    assert fetched == [f"/shard-{k:06d}.tar" for k in range(4)]  # 3 steps x 2 ranks x 2 crops = the 12 samples
    whole = torch.load(run / "checkpoint-3.pth", weights_only=True)
    assert len(whole["shard_position"]["rows"]) == 2 and whole["world_size"] == 2
    (run / "checkpoint-3.pth").unlink()
    shutil.rmtree(RunFolder(run).deepspeed / RunFolder.deepspeed_tag(3))
    r = subprocess.run(args + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = torch.load(run / "checkpoint-3.pth", weights_only=True)
    assert resumed["shard_position"] == whole["shard_position"]
    for k, v in whole["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert [row["step"] for row in read_metrics(run)] == [1, 2, 3]


@pytest.mark.skipif(__import__("benchmarks.real_sounds", fromlist=["x"]).missing_reason("lmms-common") is not None,
                    reason="real sound package lmms-common not fetched (run: python benchmarks/real_sounds.py fetch)")
def test_real_recordings_stream_from_shards_as_they_read_from_files(tmp_path):
    """Real recordings (LMMS's sample library: OGG, FLAC, WAV at 22.05-96 kHz, 0.1-11 s, some too short or not
    audio; freedesktop's OGA sounds) -> `prepare --format shards` -> HTTP: every crop equals the crop computed
    here from the file itself (read_audio, the short-clip pad, crop_clip with the crop's seed), and a run trains."""
    from benchmarks.real_sounds import sound_files
    from fastm2d.data.dataset import crop_clip
    from fastm2d.frontend import LogMelSpectrogram, pad_samples, read_audio
    clips = tmp_path / "clips"
    clips.mkdir()
    real = sound_files("lmms-common", "usr/share/lmms/samples")[::6] + sound_files("sound-theme-freedesktop")[::5]
    for f in real:
        (clips / f"{f.parent.name}_{f.name}").symlink_to(f)
    out = tmp_path / "shards"
    assert main(["prepare", str(clips), "--out", str(out), "--format", "shards", "--files-per-shard", "8"]) == 0
    manifest = json.loads((out / "shards.json").read_text())
    failures = (out / "failures.tsv").read_text().splitlines()[1:]
    assert manifest["samples"] + len(failures) == len(real) and manifest["samples"] >= 30
    handler = functools.partial(type("H", (_Handler,), {"requests": [], "cut_once": set()}), directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..{len(manifest['shards']) - 1:06d}}}.tar"
        src = ShardSource(spec, 16000, 64, pad_samples(16000, 64), stats_items=8)
        batches = list(ShardBatches(ShardCrops(src, 0, 3, 0, 1, batches=manifest["samples"] // 2, batch_size=2), 0))
        names, fe = _names_by_key(out), LogMelSpectrogram(16000)
        for made, (key, crop) in enumerate(zip([k for b in batches for k in b["keys"]],
                                               torch.cat([b["lms"] for b in batches]))):
            wav = read_audio(Path(names[key]), 16000)
            wav = torch.nn.functional.pad(wav, (0, max(0, pad_samples(16000, 64) - len(wav))))
            want = crop_clip(fe(wav).numpy(), 64, np.random.default_rng([3, 0, 0, 0, made]))[0]
            np.testing.assert_allclose(crop[0].numpy(), want, rtol=1e-5, atol=1e-5, err_msg=names[key])
        run = tmp_path / "run"
        assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, f"data.train={spec}", "train.batch_size=4",
                     "data.stats_items=16", "train.max_steps=2"]) == 0
        assert all(np.isfinite(r["loss"]) for r in read_metrics(run))
    finally:
        server.shutdown()


def _foreign_shards(folder, clips, per_shard=4, writer="shardwriter"):
    """webdataset tars as other tools write them, no fastm2d manifest: webdataset's own ShardWriter (NNNNNN.wav +
    .json), or X-ARES's write_audio_tar (stem.wav + .json)."""
    import webdataset as wds
    folder.mkdir()
    files = sorted(clips.glob("c*.wav"))
    if writer == "xares":
        from xares.audiowebdataset import write_audio_tar
        write_audio_tar([str(f) for f in files], [f.stem for f in files], str(folder / "shard-*.tar"),
                        num_shards=len(files) // per_shard)
    else:
        with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i, f in enumerate(files):
                sink.write({"__key__": f"{i:06d}", "wav": f.read_bytes(), "json": {"name": f.name}})
    return sorted(folder.glob("shard-*.tar"))


@pytest.mark.parametrize("writer", ["shardwriter", "xares"])
def test_shards_other_tools_wrote_are_counted_once_and_trained_on(shard_folder, tmp_path, monkeypatch, caplog,
                                                                   writer):
    if writer == "xares":
        pytest.importorskip("xares.audiowebdataset", reason="X-ARES's writer: pip install xares (the test extra)")
    from fastm2d.config import load_config
    from fastm2d.data.shards import counts, open_shards
    monkeypatch.setenv("FASTM2D_CACHE", str(tmp_path / "cache"))
    clips, _ = shard_folder
    shards = _foreign_shards(tmp_path / "foreign", clips, writer=writer)
    assert len(shards) == 3 and not (tmp_path / "foreign" / "shards.json").exists()
    spec = str(tmp_path / "foreign" / "shard-{000000..000002}.tar")
    cfg = load_config(None, [*TINY_TRAIN, f"data.train={spec}"])
    with caplog.at_level("INFO", logger="fastm2d.data"):
        source = open_shards(spec, cfg, 16)
    assert source.counts == [4, 4, 4] and "counting the samples of 3 shard(s)" in caplog.text
    listed = []
    real = counts.count_samples
    monkeypatch.setattr(counts, "count_samples", lambda url: listed.append(url) or real(url))
    assert open_shards(spec, cfg, 16).counts == [4, 4, 4] and listed == []  # cached: not listed again
    shards[0].write_bytes(shards[1].read_bytes()[:-1024] + b"\0" * 1024)  # changed on disk: listed again
    open_shards(spec, cfg, 16)
    assert listed == [str(shards[0])]
    r = main(["pretrain", f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, f"data.train={spec}", "train.max_steps=2",
              "data.norm_stats=[-10,3.5]", "train.batch_size=2"])
    assert r == 0


def test_foreign_shards_over_http_a_wids_index_or_a_given_count_need_no_listing(shard_folder, tmp_path, monkeypatch):
    import functools
    import json as json_
    from fastm2d.config import load_config
    from fastm2d.data.shards import counts, open_shards
    monkeypatch.setenv("FASTM2D_CACHE", str(tmp_path / "cache"))
    clips, _ = shard_folder
    _foreign_shards(tmp_path / "foreign", clips)
    requests = []
    handler = functools.partial(type("H", (_Handler,), {"requests": requests, "cut_once": set()}),
                                directory=str(tmp_path / "foreign"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        spec = f"{base}/shard-{{000000..000002}}.tar"
        cfg = load_config(None, [*TINY_TRAIN, f"data.train={spec}"])
        assert open_shards(spec, cfg, 16).counts == [4, 4, 4]  # listed over HTTP
        assert sorted(r for r in requests if r.endswith(".tar")) == [f"/shard-00000{i}.tar" for i in range(3)]
        requests.clear()
        assert open_shards(spec, cfg, 16).counts == [4, 4, 4] and not [r for r in requests if r.endswith(".tar")]
        # webdataset's shard index (wids), as `widsindex create` writes it: no shard is opened to count
        (tmp_path / "foreign" / "index.json").write_text(json_.dumps({"wids_version": 1, "shardlist": [
            {"url": f"shard-00000{i}.tar", "nsamples": 4} for i in range(3)]}))
        monkeypatch.setattr(counts, "count_samples", lambda url: pytest.fail(f"listed {url}"))
        with_index = load_config(None, [*TINY_TRAIN, f"data.train={spec}", f"data.shard_index={base}/index.json"])
        assert open_shards(spec, with_index, 16).counts == [4, 4, 4]
        given = load_config(None, [*TINY_TRAIN, f"data.train={spec}", "data.shard_samples=4"])
        assert open_shards(spec, given, 16).counts == [4, 4, 4]
    finally:
        server.shutdown()
