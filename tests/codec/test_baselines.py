"""int8 and KIVI baselines against plain references; sizes as documented; typed errors."""

from __future__ import annotations

import pytest
import torch

from codec import CodecError, codec_from_params, make_codec
from codec.quant import GROUP

SHAPE = (2, 2, 45, 2, 24)  # T and C not multiples of the KIVI group


def kv(dtype=torch.float16, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def roundtrip(name, x):
    c = make_codec(name)
    p = c.encode(x)
    out = torch.empty_like(x)
    codec_from_params(name, c.params()).decode(memoryview(p), out)
    return p, out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_matches_reference(dtype):
    x = kv(dtype)
    p, out = roundtrip("int8", x)
    L, _, T, H, D = SHAPE
    assert len(p) == L * 2 * T * (2 + H * D)
    # reference: per (layer, K/V, token) symmetric max-abs scale over channels
    xf = x.float().reshape(L, 2, T, H * D)
    scale = (xf.abs().amax(-1, keepdim=True) / 127).half().float()
    ref = (torch.round(xf / scale).clamp(-127, 127) * scale).to(dtype).reshape(SHAPE)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name,bits", [("kivi2", 2), ("kivi4", 4)])
def test_kivi_within_step_and_grouping(name, bits):
    x = kv(torch.float32, seed=bits)
    p, out = roundtrip(name, x)
    L, _, T, H, D = SHAPE
    C = H * D
    n_scales = L * (C * -(-T // GROUP) + T * -(-C // GROUP))
    assert len(p) == 4 * n_scales + -(-n_scales * GROUP * bits // 8)
    xf, of = x.reshape(L, 2, T, C), out.reshape(L, 2, T, C)
    # keys: per channel over token groups; values: per token over channel groups
    for kvi, axis in ((0, 1), (1, 2)):
        err = (of[:, kvi] - xf[:, kvi]).abs()
        span = xf[:, kvi].amax(dim=axis, keepdim=True) - xf[:, kvi].amin(dim=axis, keepdim=True)
        assert (err <= span / (2**bits - 1) * 0.51 + 1e-3).all()
    assert ((out - x).norm() / x.norm()).item() < (0.45 if bits == 2 else 0.1)


@pytest.mark.parametrize("name", ["int8", "kivi2", "kivi4"])
def test_wrong_length_and_params(name):
    c = make_codec(name)
    p = c.encode(kv())
    out = torch.empty(SHAPE, dtype=torch.float16)
    for bad in (p[:-1], p + b"\x00", b""):
        with pytest.raises(CodecError):
            c.decode(memoryview(bad), out)
    with pytest.raises(CodecError):
        codec_from_params(name, b"\x01")
    with pytest.raises(CodecError):
        make_codec(name, 3)
