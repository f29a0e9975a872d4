"""The training-step ladder on this machine: the demo model on CPU, ViT-B on a GPU.

    pytest benchmarks/bench_ladder.py -s
"""
import json

import torch

from ladder import RUNGS, ladder


def test_ladder(benchmark):
    on_gpu = torch.cuda.is_available()
    sizes = {"model": "vit_base", "batch": 256} if on_gpu else {"model": "demo", "batch": 8}
    rows = benchmark.pedantic(lambda: ladder(sizes, RUNGS, steps=5 if on_gpu else 15),
                              rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    device = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nladder on {device}, torch {torch.__version__}")
    for r in rows:
        print(json.dumps(r))
