"""Corrupted and truncated cachegen payloads: always `CodecError`, never a crash, hang or large
allocation (hypothesis drives the mutations)."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec import CodecError
from codec.cachegen import CacheGenCodec
from codec.codebook import codebooks
from tests.codec.test_cachegen import _codebook, kv_like

SHAPE = (2, 2, 32, 2, 16)
KV = kv_like(shape=SHAPE, seed=5)
PLAIN = CacheGenCodec(2)
CB = _codebook("fuzz-model", [kv_like(shape=SHAPE, seed=s) for s in range(3)])
codebooks.register(CB)
WITH_CB = CacheGenCodec(2, CB)
SINK_KV = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
SINK_KV[:, :, 2] *= 0.3  # a sink token: the payload carries a sink section
PAYLOADS = {"chunk-tables": (PLAIN, PLAIN.encode(KV)), "codebook": (WITH_CB, WITH_CB.encode(KV)),
            "sinks": (WITH_CB, WITH_CB.encode(SINK_KV))}
assert PAYLOADS["sinks"][1][6] & 2


def try_decode(codec, data: bytes) -> None:
    out = torch.empty(SHAPE, dtype=torch.float16)
    try:
        codec.decode(memoryview(data), out)
    except CodecError:
        pass


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutations_raise_codec_error_or_decode(kind, data):
    codec, payload = PAYLOADS[kind]
    buf = bytearray(payload)
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    elif op == "extend":
        buf += bytes(data.draw(st.binary(min_size=1, max_size=64)))
    else:
        i = data.draw(st.integers(0, len(buf)))
        buf[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    try_decode(codec, bytes(buf))


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_every_truncation_is_an_error(kind):
    codec, payload = PAYLOADS[kind]
    out = torch.empty(SHAPE, dtype=torch.float16)
    for n in range(0, len(payload), max(1, len(payload) // 97)):
        with pytest.raises(CodecError):
            codec.decode(memoryview(payload[:n]), out)


def test_stream_corruption_is_detected():
    codec, payload = PAYLOADS["codebook"]
    buf = bytearray(payload)
    buf[-3] ^= 0x5A  # a word inside the last stream: the state check must catch it
    with pytest.raises(CodecError, match="stream"):
        codec.decode(memoryview(bytes(buf)), torch.empty(SHAPE, dtype=torch.float16))


def test_lying_lengths_do_not_allocate():
    codec, payload = PAYLOADS["chunk-tables"]
    buf = bytearray(payload)
    buf[12:16] = (0xFFFFFFF0).to_bytes(4, "little")  # claims a 4 GB token count
    tracemalloc.start()
    try_decode(codec, bytes(buf))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 << 20
