"""The Triton kernels compile for a Hopper GPU (sm_90) on this machine, without a GPU: Triton's compiler
and ptxas run offline. The CPU tests run the kernels under Triton's interpreter, which executes them as
Python and compiles nothing, so this is what catches an error that only compilation finds (a type, a
layout, a constexpr branch) before a GPU session does. In a subprocess: the kernel tests' conftest
switches the interpreter on for this process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import inspect, sys
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            get_ptxas(90)
        except TypeError:  # Triton before 3.4 takes no architecture
            get_ptxas()
    except Exception as e:  # no Triton, or no NVIDIA backend / ptxas in this Triton
        print("NO-BACKEND", type(e).__name__, e)
        sys.exit(0)
    from kernels.triton_kernels import _paged_kernel, _rows_kernel

    def compile_for_hopper(kernel, types, consts):
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert ".target sm_90" in k.asm["ptx"] and len(k.asm["cubin"]) > 0

    strides = {n: "i64" for n in ("c_kv", "c_blk", "c_off", "c_h", "c_d", "o_l", "o_kv", "o_t", "o_h", "o_d")}
    for to_chunk in (True, False):
        compile_for_hopper(_paged_kernel, {"cache_ptr": "*i16", "layer_off_ptr": "*i64", "chunk_ptr": "*i16",
                                           "slot_ptr": "*i64", **strides},
                           dict(HEAD_DIM=128, TO_CHUNK=to_chunk, LAYER_ALIGN=8, BLOCK_T=16, BLOCK_H=8, BLOCK_D=128))
    row_strides = {n: "i64" for n in ("s_b", "s_t", "s_h", "s_d", "o_b", "o_t", "o_h", "o_d")}
    # re-rotation of indexed rows (bf16), in place or not; a pure move of bits without indices
    for in_place in (False, True):
        compile_for_hopper(_rows_kernel, {"src_ptr": "*bf16", "dst_ptr": "*bf16", "src_idx_ptr": "*i64",
                                          "dst_idx_ptr": "*i64", "old_ptr": "*i64", "new_ptr": "*i64",
                                          "inv_freq_ptr": "*fp32", **row_strides},
                           dict(BLOCK_T=16, BLOCK_H=8, BLOCK_D=128, HEAD_DIM=128, SRC_INDEXED=True,
                                DST_INDEXED=True, ROTATE=True, HALF=64, IN_PLACE=in_place))
    compile_for_hopper(_rows_kernel, {"src_ptr": "*i16", "dst_ptr": "*i16", **row_strides},
                       dict(BLOCK_T=16, BLOCK_H=8, BLOCK_D=128, HEAD_DIM=128, SRC_INDEXED=False, DST_INDEXED=False,
                            ROTATE=False, HALF=1, IN_PLACE=False, src_idx_ptr=None, dst_idx_ptr=None, old_ptr=None,
                            new_ptr=None, inv_freq_ptr=None))
    print("COMPILED")
""")


def test_triton_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if r.returncode == 0 and r.stdout.startswith("NO-BACKEND"):
        pytest.skip(f"Triton cannot compile for NVIDIA GPUs here: {r.stdout.strip()[:160]}")
    assert r.returncode == 0 and "COMPILED" in r.stdout, (r.stdout[-2000:], r.stderr[-4000:])
