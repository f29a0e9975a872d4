"""AdamW moments across world sizes: ZeRO-1/2 keeps them as flat per-group partitions, one file per rank; a run
resumed on another number of processes (or on one, without DeepSpeed) needs them per parameter.

  consolidate(folder, tag, groups)   every rank's partition file -> a torch.optim.AdamW state dict over `groups`
  push_into_zero(zero_optimizer, state, groups)   such a state dict -> this rank's partitions (any world size)

ZeRO flattens each optimiser group's parameters in order into one buffer, pads it at the end for alignment, and
gives rank r the r-th equal slice; the moments follow the same layout. So the full moments of a group are the
rank slices concatenated with the padding dropped, and a parameter's moments are its span in that buffer.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import torch

from ..checkpoint import deepspeed_safe_globals, safe_load

BASE, STEP, PADDINGS, FP32 = ("base_optimizer_state", "base_optimizer_state_step", "group_paddings",
                              "single_partition_of_fp32_groups")
MOMENTS = ("exp_avg", "exp_avg_sq")


def _rank_files(folder: Path, tag: str) -> List[Path]:
    files = list((Path(folder) / tag).glob("*zero_pp_rank_*_optim_states.pt"))
    rank = lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1))  # noqa: E731
    return sorted(files, key=rank)


def consolidate(folder: Path, tag: str, groups: List[List[torch.nn.Parameter]]) -> Dict:
    """-> {'state': {index: {'step', 'exp_avg', 'exp_avg_sq'}}} with indices counted over `groups` in order."""
    files = _rank_files(folder, tag)
    if not files:
        raise FileNotFoundError(f"{Path(folder) / tag}: no ZeRO optimiser partitions")
    # Written by DeepSpeed with a few of its own data classes inside; read without running any code.
    sds = [safe_load(f, deepspeed_safe_globals())["optimizer_state_dict"] for f in files]
    state, index = {}, 0
    for g, params in enumerate(groups):
        full, step = {}, None
        for key in MOMENTS:
            parts = []
            for sd in sds:
                base = sd[BASE]
                s = base[g] if isinstance(base, list) else base["state"][g]  # elastic (lean) or rigid (padded)
                parts.append(s[key].flatten().float())
                step = s.get("step", sd.get(STEP, step))
            flat = torch.cat(parts)
            if not isinstance(sds[0][BASE], list):  # rigid: padding sits at the end of the last partitions
                flat = flat[: flat.numel() - sum(sd[PADDINGS][g] for sd in sds)]
            full[key] = flat
        offset = 0
        for p in params:
            n = p.numel()
            state[index] = {"step": torch.tensor(float(step)), **{k: full[k][offset:offset + n].view_as(p).clone()
                                                                  for k in MOMENTS}}
            offset += n
            index += 1
        if offset != full["exp_avg"].numel():
            raise RuntimeError(f"ZeRO group {g}: {full['exp_avg'].numel()} moments for {offset} parameter values")
    return {"state": state}


def push_into_zero(zero_optimizer, state: Dict, groups: List[List[torch.nn.Parameter]]) -> None:
    """Load per-parameter AdamW moments into a DeepSpeed ZeRO-1/2 optimiser of any world size."""
    per_group, index, step = [], 0, None
    for params in groups:
        moments = {k: [] for k in MOMENTS}
        for _ in params:
            s = state["state"][index]
            step = float(s["step"])
            for k in MOMENTS:
                moments[k].append(s[k].flatten().float())
            index += 1
        per_group.append({k: torch.cat(v) for k, v in moments.items()})
    sd = {BASE: [{**g, "step": torch.tensor(step)} for g in per_group], STEP: step,
          FP32: [g["exp_avg"] for g in per_group]}  # shapes only: marks the moments as partitioned tensors
    zero_optimizer._restore_elastic_base_optimizer_state([sd])
