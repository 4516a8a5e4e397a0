"""The CUDA decoder is bit-exact with the CPU decoder: on the CPU through numba's simulator (in a
subprocess, since NUMBA_ENABLE_CUDASIM must be set before numba is imported), and on a GPU where one is."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import torch
    from codec.cachegen import CacheGenCodec, count_symbols, LEVELS
    from codec.codebook import profile_codebook
    from codec.cuda_decode import decode_cuda
    from codec import CodecError
    g = torch.Generator().manual_seed(0)
    cb = profile_codebook("sim", {2: count_symbols(torch.randn(2, 2, 6, 1, 20, generator=g), LEVELS[2])}, 2, 20)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        kv = (torch.randn(2, 2, 6, 1, 20, generator=g) * 3).to(dtype)
        for codec in (CacheGenCodec(2), CacheGenCodec(2, cb)):
            p = codec.encode(kv)
            a, b = torch.empty_like(kv), torch.full_like(kv, 7.0)
            codec.decode(memoryview(p), a)
            decode_cuda(codec, memoryview(p), b)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), dtype
    # payload version 2: a sink token written over the streams, a codebook with steps from sensitivity
    import numpy as np
    from codec.profile import profile_kv
    cbs = profile_kv("sim-steps", [torch.randn(2, 2, 32, 1, 20, generator=g)], np.linspace(1, 50, 80))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        kv = torch.randn(2, 2, 32, 1, 20, generator=g)
        kv[:, :, 3] *= 0.3
        kv = kv.to(dtype)
        for codec in (CacheGenCodec(2), CacheGenCodec(2, cbs)):
            p = codec.encode(kv)
            assert p[6] & 2, "no sink section"
            a, b = torch.empty_like(kv), torch.full_like(kv, 7.0)
            codec.decode(memoryview(p), a)
            decode_cuda(codec, memoryview(p), b)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), dtype
    bad = bytearray(p); bad[-2] ^= 0x33
    try:
        decode_cuda(codec, memoryview(bytes(bad)), b)
        raise SystemExit("corruption not detected")
    except CodecError:
        pass
    print("SIM-OK")
""")


def test_cuda_decoder_bit_exact_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SIM-OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decoder_bit_exact_on_gpu():
    from codec.cachegen import CacheGenCodec
    from codec.cuda_decode import decode_cuda

    kv = torch.randn(4, 2, 256, 8, 128)
    kv[:, :, 0] *= 0.3  # a sink token: payload version 2's sink section
    kv = kv.to(torch.float16)
    codec = CacheGenCodec(2)
    p = codec.encode(kv)
    a = torch.empty_like(kv)
    codec.decode(memoryview(p), a)
    b = torch.empty_like(kv, device="cuda")
    decode_cuda(codec, memoryview(p), b)
    assert torch.equal(a.view(torch.int16), b.cpu().view(torch.int16))


def test_cuda_decoder_compiles_for_hopper():
    """The CUDA decoder type-checks and compiles to PTX for sm_90 (H100 / H200) where numba reaches NVVM
    without a GPU: the simulator runs the kernel as Python and types nothing, so this is what catches a
    typing error before a GPU session does."""
    import numba
    from numba import cuda
    from numba import types as nt
    from numba.cuda.cudadrv.error import CudaSupportError

    from codec.cuda_decode import _decode_kernel

    for out in (nt.int16, nt.int32):  # float16/bfloat16 and float32 output bits
        sig = (nt.uint16[::1], nt.int64[::1], nt.int64, nt.int64, nt.int64, nt.uint32[:, ::1], nt.uint32[:, ::1],
               nt.uint8[:, ::1], out[:, ::1], out[::1], nt.int32[::1])
        try:
            ptx, _ = cuda.compile_ptx(_decode_kernel.py_func, sig, cc=(9, 0))
        except (CudaSupportError, OSError) as e:  # no NVVM, or this numba wants a driver to compile
            pytest.skip(f"numba {numba.__version__} cannot compile CUDA code here without a GPU driver "
                        f"({type(e).__name__})")
        assert ".target sm_90" in ptx and ".entry" in ptx
