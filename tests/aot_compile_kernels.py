"""Compile every Triton kernel ahead of time for an H100 (sm_90) down to a cubin, on a machine with no GPU.

Run by tests/test_triton_compile.py in a fresh process without TRITON_INTERPRET (the interpreter accepts code
that the real compiler rejects). Prints one line per compiled variant.
"""
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastm2d.kernels import l2norm_mse as L
from fastm2d.kernels import masking as M
from fastm2d.kernels import noise_mix as N

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = ("fp32", "bf16", "fp16")


def compile_one(fn, signature: dict, constexprs: dict) -> None:
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET)
    assert kernel.asm.get("cubin"), fn.__name__
    print(fn.__name__, {k: v for k, v in signature.items() if v.startswith("*")}, constexprs)


def main() -> int:
    for p, t in [("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")]:
        for std in (True, False):
            compile_one(L._l2norm_mse_fwd, {"P": f"*{p}", "T": f"*{t}", "LOSS": "*fp32", "D": "i32", "stride_p": "i32",
                                            "stride_t": "i32"}, {"STANDARDIZE": std, "BLOCK_D": 1024})
            for need_dt in (True, False):
                compile_one(L._l2norm_mse_bwd, {"P": f"*{p}", "T": f"*{t}", "GRAD": "*fp32", "DP": f"*{p}",
                                                "DT": f"*{t}", "D": "i32", "stride_p": "i32",
                                                "stride_t": "i32"},
                            {"STANDARDIZE": std, "NEED_DT": need_dt, "BLOCK_D": 1024})
    scalars = {"L": "i32", "x_mean": "fp32", "bg_mean": "fp32", "inv_std": "fp32", "log_eps": "fp32",
               "eta_scalar": "fp32"}
    for dt, per_sample in itertools.product(FLOATS, (True, False)):
        compile_one(N._noise_mix_fwd, {"X": f"*{dt}", "BG": f"*{dt}", "ETA": "*fp32", "OUT": f"*{dt}", **scalars},
                    {"PER_SAMPLE": per_sample, "BLOCK": N.BLOCK})
        compile_one(N._noise_mix_bwd, {"X": f"*{dt}", "BG": f"*{dt}", "ETA": "*fp32", "GOUT": f"*{dt}",
                                       "DX": f"*{dt}", "DBG": f"*{dt}", **scalars},
                    {"PER_SAMPLE": per_sample, "BLOCK": N.BLOCK})
    for dt, on_src, has_add in itertools.product(FLOATS, (True, False), (True, False)):
        compile_one(M._move_rows, {"SRC": f"*{dt}", "IDX": "*i64", "ADD": f"*{dt}", "OUT": f"*{dt}", "n_src": "i32",
                                   "n_idx": "i32", "n_out": "i32", "D": "i32", "idx_stride": "i32"},
                    {"IDX_ON_SRC": on_src, "HAS_ADD": has_add, "BLOCK_D": 1024})
    return 0


if __name__ == "__main__":
    sys.exit(main())
