"""`fastm2d linear-eval` as one call: one set of weights (or the same architecture freshly initialised) probed on
every task of a spec with the linear-evaluation protocol (eval/linear.py), each task's result in
`<out>/<task>.json` and a row of `<out>/results.md` (a re-run of the same weights and task replaces its row)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

from ..atomic import atomic_file, write_atomic
from ..folder_lock import waiting_lock
from .embeddings import cached_embeddings, weights_key
from .linear import ProbeConfig, linear_eval
from .tasks import load_tasks
from ..transfer.runtime import load_encoder

RESULTS_LOCK = ".results.lock"  # beside results.md: held for one row's update at a time

RESULTS_HEADER = "| weights | task | metric | % (95 % CI) | seeds |\n| --- | --- | --- | --- | --- |"


def probe_weights(weights: str, task_spec: str, out: Path, probe: ProbeConfig, seeds: int = 5,
                  layers: Optional[Sequence[int]] = None, hidden: Sequence[int] = (),
                  untrained_seed: Optional[int] = None, batch_size: int = 64, device="cpu",
                  progress: bool = True, precision: str = "auto", workers: int = 0) -> List[str]:
    """-> the results rows written; `untrained_seed`: probe the architecture re-initialised with that seed. Several
    `linear-eval`s may share an output folder: each cache file is written whole (atomically), and results.md is
    updated under a lock that waits, so every run adds its row."""
    return _probe_weights(weights, task_spec, out, probe, seeds, layers, hidden, untrained_seed, batch_size,
                          device, progress, precision, workers)


def _probe_weights(weights, task_spec, out, probe, seeds, layers, hidden, untrained_seed, batch_size, device,
                   progress, precision, workers) -> List[str]:
    runtime = load_encoder(weights, device=device, untrained_seed=untrained_seed)  # None: the weights themselves
    runtime.set_precision(precision)
    runtime.check_layers(layers)
    layers = list(layers) if layers else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = weights_key(weights, layers, untrained_seed) + ("-int8" if runtime.int8 else "")  # other features
    rows = []
    for task in load_tasks(task_spec):
        emb, rate = cached_embeddings(runtime, task, out / "cache", key, layers=layers, batch_size=batch_size,
                                      progress=progress, workers=workers)
        result = linear_eval(emb, task, seeds=seeds, hidden=tuple(hidden), device=device, **vars(probe))
        result.update(weights=str(weights), untrained_seed=untrained_seed, layers=layers,
                      embedding_dim=emb.shape[1], clips_per_s=rate, probe=vars(probe))
        name = task.name + (f"-untrained-seed{untrained_seed}" if untrained_seed is not None else "") \
            + ("-int8" if runtime.int8 else "")
        write_atomic(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
        baseline = f" (untrained, init seed {untrained_seed})" if untrained_seed is not None else ""
        baseline += " (int8)" if runtime.int8 else ""
        row = (f"| {weights}{baseline} | {task.name} | {result['metric']} | "
               f"{100 * result['mean']:.2f} +- {100 * result['ci95']:.2f} | {seeds} |")
        upsert_row(out / "results.md", row)
        rows.append(row)
    return rows


def upsert_row(path: Path, row: str) -> None:
    """Add a results row, replacing the row of the same weights and task: a re-run updates, never duplicates."""
    key = "|".join(row.split("|")[:3])
    with waiting_lock(path.parent / RESULTS_LOCK):  # another run's update finishes first, then this row is added
        rows = [r for r in path.read_text().splitlines() if "|".join(r.split("|")[:3]) != key] \
            if path.is_file() else []
        with atomic_file(path) as f:
            f.write("".join(r + "\n" for r in [*rows, row]).encode())
