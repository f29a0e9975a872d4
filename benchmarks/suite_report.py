"""The device suite's markdown: the plan (sections, shares), then each section's rows in the order they ran."""
from __future__ import annotations


def _train_table(rows: list) -> list:
    lines = ["| rung | batch | precision | attention | compile | ms | samples/s | x eager | MFU | peak GiB | "
             "first step s | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "samples_s" not in r:
            lines.append(f"| {r['rung']} | {r.get('note', 'no result')} | | | | | | | | | | {r.get('wall_s', '-')} |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        mem = f"{r['peak_GiB']:.1f}" if r.get("peak_GiB") else "-"
        x = f"{r['x_vs_eager']:.2f}" if "x_vs_eager" in r else "-"
        lines.append(f"| {r['rung']} | {r['batch']} | {r['precision']} | {r['attention']} | {r.get('compile', '-')} | "
                     f"{r['ms']:.1f} | {r['samples_s']:.1f} | {x} | {mfu} | {mem} | {r['first_step_s']:.1f} | "
                     f"{r.get('wall_s', '-')} |")
    return lines


def _with_x_vs_eager(rows: list) -> list:
    base = next((r["samples_s"] for r in rows if "samples_s" in r), None)
    return [{**r, "x_vs_eager": r["samples_s"] / base} if base and "samples_s" in r else r for r in rows]


def markdown(result: dict) -> str:
    from fastm2d.train.flops import MFU_MILESTONE, MFU_TARGET, MILESTONE_SAMPLES_PER_S, TARGET_SAMPLES_PER_S
    h = result["header"]
    peak = f"; MFU against this CPU's measured {h['peak_tflops']} TFLOP/s (dry run)" if h.get("peak_tflops") else ""
    lines = [f"# fastm2d device suite: {h['card']}", "",
             f"torch {h['torch']}, triton {h['triton']}, Python {h['python']}, {h['date']}{peak}", "",
             "| section | share | budget s | items |", "|---|---|---|---|"]
    lines += [f"| {p['section']} | {p['share']:.0%} | {p['budget_s']} | {', '.join(p['items'])} |"
              for p in result.get("plan", [])]
    lines += ["", f"MFU = achieved model FLOPs / the card's dense bf16 data-sheet peak. Target >= {MFU_TARGET:.0%} for "
              f"the recipe's step ({TARGET_SAMPLES_PER_S:,} samples/s of ViT-B on an H100 SXM); first milestone "
              f"{MFU_MILESTONE:.0%} ({MILESTONE_SAMPLES_PER_S:,}).", "", "## The recipe, as `pretrain` runs it", ""]
    lines += _train_table(result["recipe"])
    for r in result.get("trace", []):
        lines += ["", "## Where the recipe's step goes (torch.profiler)", ""]
        lines += r.get("table", [r.get("note", "no trace")])
    lines += ["", "## Kernels", "", f"copy bandwidth {result['copy_GB_s']:.0f} GB/s. GB/s from the minimum bytes (each "
              "input read once, each output written once); the Triton design issues the bytes beside it", "",
              "| kernel | provider | mode | ms | min MB | Triton issues MB | GB/s | % copy BW | x vs compile |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        if "ms" not in r:
            lines.append(f"| {r['kernel']} | {r['provider']} | error | {r.get('error', '')} | | | | | |")
        else:
            pct = f"{r['pct_copy_bw']:.0f}" if "pct_copy_bw" in r else "-"
            lines.append(f"| {r['kernel']} | {r['provider']} | {r['mode']} | {r['ms']:.3f} | {r['min_MB']:.1f} | "
                         f"{r['issued_MB']:.1f} | {r['GB_s']:.0f} | {pct} | "
                         f"{r.get('speedup_vs_compile', float('nan')):.2f} |")
    lines += ["", "## The decomposition", ""] + _train_table(_with_x_vs_eager(result["ladder"]))
    lines += ["", f"GPU tests: {result['gpu_tests'].get('summary', 'not run')}", "",
              "## Data paths", "", f"Against the recipe's appetite: {MILESTONE_SAMPLES_PER_S:,} crops/s at the first "
              f"MFU milestone, {TARGET_SAMPLES_PER_S:,} at the target.", "",
              "| data path | workers | rate | per worker | workers to feed the target |", "|---|---|---|---|---|"]
    for r in result["data"]:
        if "rate" not in r:
            lines.append(f"| {r['path']} | {r['workers']} | {r.get('note', '')} | | |")
            continue
        per = r["rate"] / r["workers"] if isinstance(r["workers"], int) and r["workers"] else None
        loader = r["unit"] in ("crops/s", "clips/s") and not r["path"].startswith("embed")
        feed = f"{TARGET_SAMPLES_PER_S / per:.1f}" if per and loader else "-"
        lines.append(f"| {r['path']} | {r['workers']} | {r['rate']:.0f} {r['unit']} | "
                     f"{f'{per:.0f}' if per else '-'} | {feed} |")
    return "\n".join(lines) + "\n"
