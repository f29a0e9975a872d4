"""Hostile and unlucky inputs, round 3 (the cases fixed so far): every user-given block index checked in one place,
a fine-tuning length below one patch, model configs read as data (types checked, nothing interpolated), text
models that would run code refused without a prompt, temporaries deleted only when they are this program's, a FIFO
planted as an output refused instead of hanging, save_pretrained on a full disk in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastm2d.cli import main

from .conftest import tiny_bert


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err[-2000:]
    lines = [x for x in err.strip().splitlines() if "error" in x.lower()]
    assert lines, err
    return lines[-1]


def test_linear_eval_checks_layers_against_the_depth_before_any_work(tiny_run, tmp_path, capsys):
    assert main(["linear-eval", "synthetic", "--weights", str(tiny_run), "--layers", "99",
                 "--out", str(tmp_path / "le")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--layers 99" in line and "2 blocks" in line


def test_finetune_refuses_frames_below_one_patch(tiny_run, tmp_path, capsys):
    assert main(["finetune", "synthetic", "--weights", str(tiny_run), "--frames", "1", "--epochs", "1",
                 "--out", str(tmp_path / "ft")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--frames 1" in line and "16 frames" in line


def test_a_model_folder_config_of_the_wrong_types_is_refused_naming_the_key(tiny_run, tmp_path, capsys):
    from fastm2d import save_pretrained
    folder = save_pretrained(tiny_run, tmp_path / "model")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_config"]["depth"] = "4"  # a string where the schema has an integer: once loaded as if fine
    (folder / "config.json").write_text(json.dumps(cfg))
    wav = tmp_path / "a.wav"
    from .conftest import write_tone
    write_tone(wav)
    assert main(["tag", str(wav), "--weights", str(folder)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "depth='4'" in line and "integer" in line


def test_a_checkpoint_config_is_data_nothing_in_it_is_interpolated(tiny_run, tmp_path, monkeypatch, capsys):
    """`${oc.env:NAME}` in a downloaded checkpoint's config once copied the secret into an export and an error line;
    `${nope}` was an InterpolationKeyError traceback. Both are kept as the characters they are."""
    from fastm2d.checkpoint import resolve_checkpoint_file
    monkeypatch.setenv("FASTM2D_TEST_SECRET", "hunter2")
    obj = torch.load(resolve_checkpoint_file(tiny_run), weights_only=True)
    obj["model_config"]["text_encoder"] = "${oc.env:FASTM2D_TEST_SECRET}"
    obj["config"]["data"]["train"] = "${nope}"
    obj["config"]["model"]["text_encoder"] = "${oc.env:FASTM2D_TEST_SECRET}"
    planted = tmp_path / "w" / "checkpoint-2.pth"
    planted.parent.mkdir()
    torch.save(obj, planted)
    assert main(["export", "--weights", str(planted), "--out", str(tmp_path / "x"), "--format", "safetensors"]) == 0
    out = capsys.readouterr()
    exported = b"".join(p.read_bytes() for p in (tmp_path / "x").rglob("*") if p.is_file())
    assert b"hunter2" not in exported and "hunter2" not in out.out + out.err
    from fastm2d.config import config_from_dict, model_config_from_dict
    assert model_config_from_dict(obj["model_config"]).text_encoder == "${oc.env:FASTM2D_TEST_SECRET}"
    assert config_from_dict(obj["config"]).data.train == "${nope}"


def _marker_model(folder, marker):
    """A text model folder whose config asks for custom code (auto_map) that would leave `marker` if run."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                             "from transformers import BertConfig as EvilConfig, BertModel as EvilModel\n")


def test_a_text_model_with_custom_code_is_refused_without_asking_or_running_it(tmp_path):
    from fastm2d.errors import CheckpointError
    from fastm2d.transfer.clap import TextEncoder
    tiny_bert(tmp_path / "text", ["dog", "rain"])
    marker = tmp_path / "ran.txt"
    _marker_model(tmp_path / "text", marker)
    code = ("import sys; from fastm2d.transfer.clap import TextEncoder\n"
            f"TextEncoder({str(tmp_path / 'text')!r}, 'mean')")
    r = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=300, input=None)
    assert not marker.exists(), "the folder's code ran"
    assert "Do you wish to run the custom code" not in r.stdout + r.stderr
    with pytest.raises(CheckpointError, match="no custom code"):
        TextEncoder(str(tmp_path / "text"), "mean")
    assert not marker.exists()


def test_a_pickled_text_model_that_would_run_code_is_refused(tmp_path):
    from fastm2d.errors import CheckpointError
    from fastm2d.transfer.clap import TextEncoder
    tiny_bert(tmp_path / "text", ["dog", "rain"])
    marker = tmp_path / "ran.txt"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    import pickle
    for f in (tmp_path / "text").glob("model.safetensors"):
        f.unlink()
    (tmp_path / "text" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError, match="text encoder"):
        TextEncoder(str(tmp_path / "text"), "mean")
    assert not marker.exists()


def test_a_fifo_planted_as_embeds_manifest_is_refused_not_waited_on(tiny_run, tmp_path):
    from .conftest import write_tone
    write_tone(tmp_path / "clips" / "a.wav" if (tmp_path / "clips").mkdir() is None else None)
    out = tmp_path / "feats"
    out.mkdir()
    os.mkfifo(out / "manifest.jsonl")
    r = subprocess.run([sys.executable, "-m", "fastm2d.cli", "embed", "--weights", str(tiny_run), "--out", str(out),
                        str(tmp_path / "clips")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r.stderr)
    assert "manifest.jsonl is a FIFO" in line


def test_save_pretrained_on_a_full_disk_is_one_line(tiny_run, tmp_path):
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); import fastm2d\n"
            "try:\n"
            f"    fastm2d.save_pretrained({str(tiny_run)!r}, {str(tmp_path / 'model')!r})\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, '|', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    name, _, text = r.stdout.strip().partition(" | ")
    assert name == "CheckpointWriteError" and "\n" not in text and "cannot write the model folder" in text, r
    assert not [p for p in (tmp_path / "model").glob(".fastm2d-*.tmp")]


def _shards(folder, n_shards=3, per_shard=2, name=lambda s, i: f"{s:02d}{i:04d}"):
    import webdataset as wds

    from .conftest import write_tone
    folder.mkdir(parents=True)
    write_tone(folder / "t.wav", seconds=1.0)
    data = (folder / "t.wav").read_bytes()
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                sink.write({"__key__": name(s, i), "wav": data})
    return str(folder / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def test_shards_holding_fewer_samples_than_one_batch_are_one_line(tmp_path, capsys, monkeypatch):
    from .conftest import TINY_TRAIN
    monkeypatch.setenv("FASTM2D_CACHE", str(tmp_path / "cache"))
    spec = _shards(tmp_path / "s", n_shards=2, per_shard=1)
    assert main(["pretrain", f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, f"data.train={spec}",
                 "data.norm_stats=[-10,3.5]"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "2 usable training items cannot fill one batch of 4" in line


def test_a_logmel_manifest_with_a_sample_rate_that_is_no_integer_is_one_line(tmp_path, capsys, monkeypatch):
    from .conftest import TINY_TRAIN
    spec = _shards(tmp_path / "s")
    (tmp_path / "s" / "shards.json").write_text(json.dumps({
        "format": "fastm2d-logmel-shards", "frontend": {"sample_rate": "16k"},
        "shards": [{"file": f"shard-{k:06d}.tar", "samples": 2} for k in range(3)]}))
    assert main(["pretrain", f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, f"data.train={spec}"]) == 2
    assert "frontend.sample_rate='16k'" in _one_line(capsys.readouterr().err)


def test_statistics_go_on_past_a_shard_that_cannot_be_fetched(tmp_path, monkeypatch, caplog):
    """docs/data_at_scale.md: a shard that cannot be fetched is listed and the run goes on; the statistics once
    stopped at it."""
    from fastm2d.config import load_config
    from fastm2d.data.shards import fetching, open_shards
    from .conftest import TINY_TRAIN
    monkeypatch.setenv("FASTM2D_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetching, "FETCH_TRIES", 1)
    spec = _shards(tmp_path / "s")
    cfg = load_config(None, [*TINY_TRAIN, f"data.train={spec}"])
    source = open_shards(spec, cfg, 16)
    (tmp_path / "s" / "shard-000001.tar").unlink()  # gone after the listing, as a 404 at start
    with caplog.at_level("WARNING", logger="fastm2d.data"):
        mean, std = source.norm_stats
    assert std > 0 and "shard-000001.tar" in caplog.text and "the other shards go on" in caplog.text


def test_a_noise_shard_member_with_a_name_too_long_for_a_file_system_is_copied(tmp_path):
    from fastm2d.data.shards import local_copy
    spec = _shards(tmp_path / "s", n_shards=1, per_shard=2, name=lambda s, i: f"{'n' * 300}{i}")
    folder = local_copy(spec, tmp_path / "cache")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".wav")
    assert len(files) == 2 and all(len(p.name.encode()) < 255 for p in files)


def test_a_one_sample_file_is_embedded_beside_a_good_one_and_the_interfaces_take_it(tiny_run, tmp_path):
    """Shorter than half an STFT window: reflection had nothing to mirror and the whole embed died."""
    import numpy as np
    import soundfile as sf

    from fastm2d.transfer.interfaces import hear
    from fastm2d.transfer.interfaces.xares import M2DEncoder
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "one.wav", np.array([0.1], np.float32), 16000)
    sf.write(tmp_path / "clips" / "good.wav", (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(
        np.float32), 16000)
    assert main(["embed", "--weights", str(tiny_run), "--out", str(tmp_path / "out"), str(tmp_path / "clips")]) == 0
    one = np.load(tmp_path / "out" / "one.npy")
    assert one.shape[0] == 1 and np.isfinite(one).all()
    assert M2DEncoder(tiny_run)(torch.randn(1, 1)).shape[1] == 1
    model = hear.load_model(str(tiny_run))
    assert hear.get_scene_embeddings(torch.randn(2, 1), model).shape == (2, model.scene_embedding_size)


def test_embed_mirrors_an_input_tree_1500_levels_deep(tiny_run, tmp_path):
    """Listing such a tree was fixed in round 2; writing its mirror in --out ended in RecursionError."""
    from fastm2d.atomic import make_dirs

    from .conftest import write_tone
    deep = (tmp_path / "in").joinpath(*(["d"] * 1500))
    make_dirs(deep)
    try:
        write_tone(tmp_path / "a.wav", seconds=0.5)
        os.replace(tmp_path / "a.wav", deep / "a.wav")  # libsndfile takes no path that long; fastm2d reads file objects
        assert main(["embed", "--weights", str(tiny_run), "--out", str(tmp_path / "out"), str(tmp_path / "in")]) == 0
        assert (tmp_path / "out").joinpath(*(["d"] * 1500), "a.npy").is_file()
    finally:  # removed here, bottom up: pytest's own clean-up of old temporary folders recurses and would fail
        for root in (tmp_path / "in", tmp_path / "out"):
            _remove_deep(root)


def _remove_deep(root):
    """rm -r without recursion, for trees thousands of levels deep."""
    stack = [root]
    while stack:
        folder = stack[-1]
        if not folder.is_dir():
            stack.pop()
            continue
        subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
        for p in folder.iterdir():
            if not (p.is_dir() and not p.is_symlink()):
                p.unlink()
        if subfolders:
            stack.extend(subfolders)
        else:
            folder.rmdir()
            stack.pop()


def test_embed_reuses_an_array_only_when_weights_settings_and_input_are_the_same(tiny_run, tmp_path, capsys):
    """The manifest was keyed by the input path alone: other weights, another level or a replaced input gave exit 0,
    "already there" and the old array."""
    import numpy as np

    from fastm2d.checkpoint import resolve_checkpoint_file

    from .conftest import write_tone
    (tmp_path / "clips").mkdir()
    clip = tmp_path / "clips" / "a.wav"
    write_tone(clip, seconds=1.0, freq=300)
    out = tmp_path / "feats"

    def embed(weights, *extra):
        assert main(["embed", "--weights", str(weights), "--out", str(out), str(clip), "--quiet", *extra]) == 0
        return capsys.readouterr(), np.load(out / "a.npy")
    first, a = embed(tiny_run)
    again, a2 = embed(tiny_run)
    assert "1 already there" in again.out and np.array_equal(a, a2)
    other = tmp_path / "other" / "checkpoint-2.pth"  # the same architecture, other weights
    other.parent.mkdir()
    obj = torch.load(resolve_checkpoint_file(tiny_run), weights_only=True)
    obj["model"] = {k: v + 0.05 if v.is_floating_point() and k.startswith("blocks.") else v
                    for k, v in obj["model"].items()}
    torch.save(obj, other)
    by_other, b = embed(other)
    assert "already there" not in by_other.out and "replacing 1 array" in by_other.err and not np.allclose(a, b)
    by_level, c = embed(other, "--level", "clip")
    assert c.ndim == 1 and "replacing 1 array" in by_level.err
    write_tone(clip, seconds=1.5, freq=500)  # the input replaced at the same path
    by_input, d = embed(other, "--level", "clip")
    assert "replacing 1 array" in by_input.err and not np.allclose(c, d)
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 1  # one row per input, the last one made


def test_a_second_export_into_the_same_out_is_refused_not_a_silent_replacement(tiny_run, tmp_path, capsys):
    args = ["export", "--weights", str(tiny_run), "--out", str(tmp_path / "x")]
    assert main(args) == 0
    written = sorted((tmp_path / "x").rglob("*.pth"))
    before = written[0].read_bytes()
    assert main(args) == 2
    assert "exists: an export never replaces a file" in _one_line(capsys.readouterr().err)
    assert sorted((tmp_path / "x").rglob("*.pth")) == written and written[0].read_bytes() == before


def test_a_checkpoint_of_overlapping_zip_records_is_refused_before_loading(tmp_path):
    """An 8 MB .pth whose stored records overlap once made torch.load allocate 3 GB: each record's declared size
    fits the file, their sum does not. Crafted here: 300 central-directory entries onto one 1 MiB record."""
    import io
    import struct
    import zipfile

    from fastm2d.checkpoint import read_checkpoint
    from fastm2d.errors import CheckpointError
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data/0", b"\0" * 2**20)
    data = buf.getvalue()
    eocd = data.rfind(b"PK\x05\x06")
    cd_size, cd_off = struct.unpack("<II", data[eocd + 12:eocd + 20])
    record = data[cd_off:cd_off + 46]  # one central-directory record, its name after the 46 fixed bytes
    names = [f"archive/data/{i:04d}".encode() for i in range(300)]
    central = b"".join(record[:28] + struct.pack("<H", len(n)) + record[30:46] + n for n in names)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(names), len(names), len(central), cd_off, 0)
    path = tmp_path / "bomb.pth"
    path.write_bytes(data[:cd_off] + central + end)
    with pytest.raises(CheckpointError, match="records that overlap"):
        read_checkpoint(path)


def test_an_audio_header_declaring_1_hz_is_refused_before_its_samples_are_read(tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    from fastm2d.frontend import read_audio
    from fastm2d.errors import AudioReadError
    path = tmp_path / "slow.flac"
    sf.write(path, np.zeros(4000, np.float32), 1, format="FLAC")
    read = []
    real = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: read.append(1) or real(self, *a, **k))
    with pytest.raises(AudioReadError, match="sample rate 1 Hz"):
        read_audio(path, 16000)
    assert read == []  # refused from the header


def test_a_server_that_stalls_mid_shard_is_a_broken_stream_not_a_wait(tmp_path, monkeypatch, caplog):
    """It sends 8 KB of a shard, then nothing: the statistics once waited forever. A stream that delivers nothing
    for FASTM2D_STALL_SECONDS (60 by default) is broken: tried again, then left out with the others going on."""
    import http.server
    import threading
    import time

    from fastm2d.config import load_config
    from fastm2d.data.shards import fetching, open_shards
    from .conftest import TINY_TRAIN
    monkeypatch.setenv("FASTM2D_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTM2D_STALL_SECONDS", "2")
    monkeypatch.setattr(fetching, "FETCH_TRIES", 1)
    _shards(tmp_path / "s", n_shards=2)
    folder = tmp_path / "s"

    class Stalling(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path.endswith("000001.tar"):
                data = (folder / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:8192])
                self.wfile.flush()
                time.sleep(20)
                return
            super().do_GET()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: Stalling(*a, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000001}}.tar"
        cfg = load_config(None, [*TINY_TRAIN, f"data.train={url}", "data.shard_samples=2"])
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="fastm2d.data"):
            mean, std = open_shards(url, cfg, 16).norm_stats
        assert time.monotonic() - t0 < 15 and std > 0 and "shard-000001.tar" in caplog.text
    finally:
        server.shutdown()


def test_a_gzipped_shard_with_a_1_gib_member_is_read_in_bounded_memory(tmp_path):
    """1 MiB on disk, 1 GiB declared by one member's header: the member is not read (its sample says why), the
    other samples are, and the reading process stays far below the member's size."""
    import io
    import tarfile

    from .conftest import write_tone
    write_tone(tmp_path / "t.wav", seconds=0.5)

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readinto(self, b):
            k = min(len(b), self.left)
            b[:k] = bytes(k)
            self.left -= k
            return k

        def readable(self):
            return True
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(tmp_path / "t.wav", arcname="000000.wav")
        big = tarfile.TarInfo("000001.wav")
        big.size = 1 << 30
        tar.addfile(big, io.BufferedReader(Zeros(1 << 30), buffer_size=1 << 20))
        tar.add(tmp_path / "t.wav", arcname="000002.wav")
    assert path.stat().st_size < 8 << 20  # 1 GiB declared: over 100x the file
    # The peak from /proc (VmHWM: this address space's own), not ru_maxrss, which a child keeps from its parent
    # across exec (a pytest process of 3 GB made the child look 3 GB).
    code = ("import re, sys; from fastm2d.data.shards.fetching import tar_samples, TOO_LARGE\n"
            "s = list(tar_samples(sys.argv[1]))\n"
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
            "print([k['__key__'] for k in s], [TOO_LARGE in k for k in s], hwm)")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    peak_mb = int(r.stdout.strip().rsplit(" ", 1)[1])
    assert "['000000', '000001', '000002'] [False, True, False]" in r.stdout, r.stderr[-2000:]
    assert peak_mb < 800, peak_mb  # the process itself (torch imported) is ~500 MB; the member would add 1024+
