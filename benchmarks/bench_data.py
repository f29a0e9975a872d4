"""Data-path throughput on this machine (pytest-benchmark records the run; samples/s are printed).

    pytest benchmarks/bench_data.py -s
"""
import os
import platform

import pytest
import torch

from data_cases import dali_rate, make_clips, prepare_rate, reference_loader_rate, shard_loader_rate

WORKERS = os.cpu_count() or 1
CLIPS = 64


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    make_clips(folder, CLIPS)
    return folder


@pytest.fixture(scope="module")
def store(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    prepare_rate(clips, out, WORKERS)
    return out


def _report(benchmark, what, rate, unit, **extra):
    benchmark.extra_info.update(rate=rate, unit=unit, workers=WORKERS, machine=f"{platform.machine()}, {WORKERS} cores",
                                **extra)
    print(f"\n{what}: {rate:.1f} {unit} ({WORKERS} workers, {platform.machine()}, {WORKERS} cores)")


def test_prepare_throughput(benchmark, clips, tmp_path):
    summary = benchmark.pedantic(lambda: prepare_rate(clips, tmp_path / f"s{os.getpid()}", WORKERS), rounds=1,
                                 iterations=1)
    _report(benchmark, "prepare (10 s WAV -> fp16 shards)", summary["files_per_s"], "files/s")


def test_reference_loader(benchmark, clips):
    files = sorted(clips.iterdir())
    rate = benchmark.pedantic(lambda: reference_loader_rate(files, WORKERS), rounds=3, iterations=1)
    _report(benchmark, "reference loader (decode + log-mel + crop)", rate, "crops/s")


def test_shard_loader(benchmark, store):
    rate = benchmark.pedantic(lambda: shard_loader_rate(store, WORKERS), rounds=3, iterations=1)
    _report(benchmark, "shard loader (memory-mapped fp16 80x608 crops)", rate, "crops/s")


def test_dali_pipeline(benchmark, clips):
    from fastm2d.data.dali import dali_missing_reason
    if dali_missing_reason():
        pytest.skip(dali_missing_reason())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = sorted(clips.iterdir())
    rate = benchmark.pedantic(lambda: dali_rate(files, device, WORKERS), rounds=3, iterations=1)
    _report(benchmark, f"DALI WAV pipeline ({device.type})", rate, "clips/s")
