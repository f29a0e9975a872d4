"""Compile every Triton kernel ahead of time for an H100 (sm_90) down to a cubin, on a machine with no GPU, and report
what the hardware will see: one JSON line per variant with its registers per thread, spill stores / loads (bytes),
shared memory, and the widest global load in the PTX (bytes per thread and instruction: 16 = a 128-bit vector).

Run by tests/test_triton_compile.py in a fresh process without TRITON_INTERPRET (the interpreter accepts code
that the real compiler rejects). Each variant is compiled as the JIT would specialise it at M2D's shapes (pointers
16-byte aligned, widths and strides multiples of 16: Triton's `tt.divisibility` 16) with the launchers' own tile
and warp choices (kernels/_triton.py `column_block`, `row_warps`, `copy_warps`). Registers and spills come from ptxas -v, the
assembler Triton itself runs (its bundled binary).
"""
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastm2d.kernels import l2norm_mse as L
from fastm2d.kernels import masking as M
from fastm2d.kernels import noise_mix as N
from fastm2d.kernels._triton import block_configs, column_block, copy_warps, fitting_tiles, next_pow2, tile_configs

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = ("fp32", "bf16", "fp16")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(ptx: str) -> dict:
    """Registers, spills and the ptxas view of shared memory for sm_90a, from `ptxas -v`."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                           text=True, check=True)
    finally:
        os.unlink(f.name)
    log = r.stderr

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


def widest_global_load(ptx: str) -> int:
    """Bytes per thread of the widest ld.global in the PTX (a .v4.b32 is 16)."""
    loads = re.findall(r"ld\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.[bfus](\d+)", ptx)
    return max((int(v or 1) * int(bits) // 8 for v, bits in loads), default=0)


def compile_one(fn, signature: dict, constexprs: dict, aligned=(), num_warps: int = 4, label: str = "") -> None:
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=TARGET,
                            options={"num_warps": num_warps})
    assert kernel.asm.get("cubin"), fn.__name__
    ptx = kernel.asm["ptx"]
    row = {"kernel": fn.__name__, "label": label, "num_warps": num_warps, **ptxas_report(ptx),
           "shared_bytes": int(kernel.metadata.shared), "widest_load_bytes": widest_global_load(ptx),
           "pointers": {k: v for k, v in signature.items() if v.startswith("*")},
           "constexprs": {k: (v if not isinstance(v, bool) else int(v)) for k, v in constexprs.items()}}
    print(json.dumps(row), flush=True)


def main() -> int:
    # The loss at ViT-B's width (768) and at a wide M2D-X distillation target (3840: eq. 4's 5 x 768 frames), in
    # every tile of its autotune set (ROWS rows per program, warps from the tile's width).
    for d in (768, 3840):
        block = next_pow2(d)
        rows = ("P", "T", "D", "stride_p", "stride_t")
        for cfg in fitting_tiles(tile_configs(), {}, BLOCK_D=block):
            tile, warps = {"BLOCK_D": block, "ROWS": cfg.kwargs["ROWS"]}, cfg.num_warps
            label = f"D={d} ROWS={cfg.kwargs['ROWS']}"
            for p, t in [("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")]:
                for std in (True, False):
                    compile_one(L._l2norm_mse_fwd.fn, {"P": f"*{p}", "T": f"*{t}", "LOSS": "*fp32", "R": "i32",
                                                       "D": "i32", "stride_p": "i32", "stride_t": "i32"},
                                {"STANDARDIZE": std, **tile}, (*rows, "LOSS"), warps, label)
                    for need_dt in (True, False):
                        compile_one(L._l2norm_mse_bwd.fn, {"P": f"*{p}", "T": f"*{t}", "GRAD": "*fp32",
                                                           "DP": f"*{p}", "DT": f"*{t}", "R": "i32", "D": "i32",
                                                           "stride_p": "i32", "stride_t": "i32"},
                                    {"STANDARDIZE": std, "NEED_DT": need_dt, **tile},
                                    (*rows, "GRAD", "DP", "DT"), warps, label)
    scalars = {"L": "i32", "x_mean": "fp32", "bg_mean": "fp32", "inv_std": "fp32", "log_eps": "fp32",
               "eta_scalar": "fp32"}
    for cfg in block_configs():  # the element-wise mix's autotune set, at an 80 x 608 log-mel (L = 48640)
        meta, warps, label = {"BLOCK": cfg.kwargs["BLOCK"]}, cfg.num_warps, f"L=48640 BLOCK={cfg.kwargs['BLOCK']}"
        for dt, per_sample in itertools.product(FLOATS, (True, False)):
            compile_one(N._noise_mix_fwd.fn, {"X": f"*{dt}", "BG": f"*{dt}", "ETA": "*fp32", "OUT": f"*{dt}",
                                              **scalars}, {"PER_SAMPLE": per_sample, **meta},
                        ("X", "BG", "ETA", "OUT", "L"), warps, label)
            compile_one(N._noise_mix_bwd.fn, {"X": f"*{dt}", "BG": f"*{dt}", "ETA": "*fp32", "GOUT": f"*{dt}",
                                              "DX": f"*{dt}", "DBG": f"*{dt}", **scalars},
                        {"PER_SAMPLE": per_sample, **meta}, ("X", "BG", "ETA", "GOUT", "DX", "DBG", "L"), warps, label)
    block = column_block(768)
    for dt, on_src, has_add in itertools.product(FLOATS, (True, False), (True, False)):
        compile_one(M._move_rows, {"SRC": f"*{dt}", "IDX": "*i64", "ADD": f"*{dt}", "OUT": f"*{dt}", "n_src": "i32",
                                   "n_idx": "i32", "n_out": "i32", "D": "i32", "idx_stride": "i32"},
                    {"IDX_ON_SRC": on_src, "HAS_ADD": has_add, "BLOCK_D": block},
                    ("SRC", "IDX", "ADD", "OUT", "D"), copy_warps(block, {"fp32": 4}.get(dt, 2)), "D=768")
    return 0


if __name__ == "__main__":
    sys.exit(main())
