"""Lossless codecs (raw, zstd): bit-exact round trips, parameters, and hostile payloads."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec import Codec, CodecError, codec_class, codec_from_params, codec_names, make_codec, register
from codec.lossless import RawCodec, ZstdCodec, _shuffle, _unshuffle

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CODECS = [RawCodec(), ZstdCodec(), ZstdCodec(level=1, shuffle=False), ZstdCodec(level=-7), ZstdCodec(level=19)]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shape_st = st.tuples(st.integers(1, 3), st.just(2), st.integers(1, 64), st.integers(1, 4), st.sampled_from([1, 3, 8, 16]))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def round_trip(codec: Codec, kv: torch.Tensor) -> torch.Tensor:
    payload = memoryview(bytes(memoryview(codec.encode(kv)).cast("B")))  # a private copy, as off the wire
    out = torch.empty(kv.shape, dtype=kv.dtype)
    codec_from_params(codec.name, codec.params()).decode(payload, out)
    return out


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}{c.params().hex()}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_exact_on_special_values(codec, dtype, kv_factory, same_bits):
    # Random bit patterns: NaNs with payloads, +-inf, -0.0, subnormals; plus plain gaussian values.
    for special in (True, False):
        kv = kv_factory((2, 2, 33, 3, 8), dtype, seed=11, special=special)
        if special:
            assert torch.isnan(kv).any() and torch.isinf(kv).any() and (bits(kv) == bits(torch.tensor(-0.0, dtype=dtype))).any()
        assert same_bits(round_trip(codec, kv), kv)


@FUZZ
@given(shape=shape_st, dtype=st.sampled_from(DTYPES), codec=st.sampled_from(CODECS), seed=st.integers(0, 2**31))
def test_bit_exact_round_trip_property(shape, dtype, codec, seed, kv_factory, same_bits):
    kv = kv_factory(shape, dtype, seed=seed, special=seed % 2 == 0)
    assert same_bits(round_trip(codec, kv), kv)


def test_non_contiguous_input(kv_factory, same_bits):
    kv = kv_factory((2, 2, 16, 2, 8), torch.float16, seed=3)
    strided = kv.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    for codec in CODECS:
        assert same_bits(round_trip(codec, strided), kv)


def test_raw_payload_is_the_tensor_bytes(kv_factory):
    kv = kv_factory((1, 2, 4, 1, 8), torch.bfloat16, seed=5)
    assert bytes(RawCodec().encode(kv)) == kv.contiguous().view(torch.uint8).numpy().tobytes()
    assert RawCodec.payload_is_raw and not ZstdCodec.payload_is_raw
    assert RawCodec.lossless and ZstdCodec.lossless


def test_shuffle_groups_byte_planes():
    import numpy as np

    src = np.arange(12, dtype=np.uint8)  # 3 elements of 4 bytes
    planes = _shuffle(src, 4)
    assert planes.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    back = np.empty_like(src)
    _unshuffle(planes, back, 4)
    assert back.tolist() == src.tolist()


def test_shuffle_helps_on_kv_like_data(kv_factory):
    # Over several zstd blocks (128 KiB each): within one block, literals share a Huffman table and
    # only their histogram counts, so the shuffle shows once planes fill blocks of their own.
    kv = kv_factory((4, 2, 128, 4, 64), torch.float16, seed=0)
    shuffled = len(ZstdCodec(shuffle=True).encode(kv))
    plain = len(ZstdCodec(shuffle=False).encode(kv))
    assert shuffled < plain < kv.numel() * 2 * 1.01


# -- parameters and registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("level", [-7, -1, 0, 1, 3, 9, 22])
@pytest.mark.parametrize("shuffle", [True, False])
def test_zstd_params_round_trip(level, shuffle):
    c = ZstdCodec(level=level, shuffle=shuffle)
    assert len(c.params()) == 2
    d = codec_from_params("zstd", c.params())
    assert isinstance(d, ZstdCodec) and (d.level, d.shuffle) == (level, shuffle)
    assert d.params() == c.params()


def test_raw_params_round_trip():
    assert RawCodec().params() == b""
    assert isinstance(codec_from_params("raw", b""), RawCodec)


@pytest.mark.parametrize(
    "name,params",
    [("raw", b"\x00"), ("zstd", b""), ("zstd", b"\x03"), ("zstd", b"\x03\x01\x00"), ("zstd", b"\x03\x02"),
     ("zstd", b"\x17\x01"), ("zstd", b"\xf8\x01"), ("zstd", b"\x7f\x01")],
)
def test_bad_params(name, params):
    with pytest.raises(CodecError):
        codec_from_params(name, params)


@pytest.mark.parametrize("level", [-8, 23, 100])
def test_bad_zstd_level(level):
    with pytest.raises(CodecError):
        ZstdCodec(level=level)
    with pytest.raises(CodecError):
        make_codec("zstd", level)


def test_unknown_codec_name():
    for call in (lambda: codec_class("nope"), lambda: codec_from_params("nope", b""), lambda: make_codec("nope")):
        with pytest.raises(CodecError, match="nope"):
            call()


def test_make_codec():
    assert isinstance(make_codec("raw"), RawCodec)
    z = make_codec("zstd")
    assert isinstance(z, ZstdCodec) and z.level == 3 and z.shuffle
    assert make_codec("zstd", 7).level == 7
    with pytest.raises(CodecError):
        make_codec("raw", 3)
    assert {"raw", "zstd"} <= set(codec_names())
    assert codec_names() == sorted(codec_names())


def test_register_twice_is_refused():
    with pytest.raises(ValueError):
        register(RawCodec)
    assert codec_class("raw") is RawCodec


# -- hostile payloads ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zstd_case():
    kv = torch.randn(2, 2, 32, 2, 16, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    return kv, bytes(ZstdCodec().encode(kv))


def _decode(codec, payload, shape, dtype=torch.float16):
    codec.decode(memoryview(payload), torch.empty(shape, dtype=dtype))


def test_zstd_truncated_frames(zstd_case):
    kv, frame = zstd_case
    for n in list(range(0, 40)) + list(range(len(frame) - 40, len(frame))):
        with pytest.raises(CodecError):
            _decode(ZstdCodec(), frame[:n], kv.shape)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 64, b"not a zstd frame at all", b"\x28\xb5\x2f\xfd", b"\x28\xb5\x2f\xfd" + b"\xff" * 60])
def test_zstd_garbage(payload):
    with pytest.raises(CodecError):
        _decode(ZstdCodec(), payload, (1, 2, 4, 1, 8))


def test_zstd_wrong_size_frame(zstd_case):
    kv, frame = zstd_case
    for shape in [(2, 2, 31, 2, 16), (2, 2, 33, 2, 16)]:
        with pytest.raises(CodecError, match="expected"):
            _decode(ZstdCodec(), frame, shape)
    with pytest.raises(CodecError):  # same bytes, other dtype: 2x the elements' bytes
        _decode(ZstdCodec(), frame, kv.shape, torch.float32)


def test_zstd_frame_without_content_size():
    kv = torch.zeros(1, 2, 8, 1, 8, dtype=torch.float16)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(kv.numel() * 2))
    with pytest.raises(CodecError):
        _decode(ZstdCodec(), frame, kv.shape)


def _with_content_size(frame: bytes, size: int) -> bytes:
    """The frame with its header's content-size field rewritten (same field width)."""
    fhd = frame[4]
    single, dict_flag, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    value = size - 256 if width == 2 else size
    return frame[:pos] + value.to_bytes(width, "little") + frame[pos + width :]


@pytest.mark.parametrize("factor", [2, 64, 4096])
def test_zstd_bomb(factor):
    out = torch.empty(1, 2, 50, 1, 1000, dtype=torch.float16)  # 200,000 bytes
    n = out.numel() * 2
    frame = zstandard.ZstdCompressor().compress(bytes(n * factor))  # inflates to n * factor
    assert zstandard.frame_content_size(frame) == n * factor
    lying = _with_content_size(frame, n)  # ... while its header claims exactly n
    assert zstandard.frame_content_size(lying) == n
    tracemalloc.start()
    try:
        for payload in (frame, lying):
            with pytest.raises(CodecError):
                ZstdCodec().decode(memoryview(payload), out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * n  # never more than one output's worth, whatever the frame claims


def test_raw_wrong_size():
    for n in (0, 127, 129, 256):
        with pytest.raises(CodecError):
            _decode(RawCodec(), bytes(n), (1, 2, 4, 1, 8))


@FUZZ
@given(st.data())
def test_zstd_random_damage_raises_codec_error_or_fills_out(zstd_case, data):
    # zstd frames carry no checksum here (the record's payload checksum guards them), so damage may
    # decode to other values; what must never happen is another exception or a crash.
    kv, frame = zstd_case
    buf = bytearray(frame)
    for pos in data.draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=8)):
        buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        _decode(ZstdCodec(), bytes(buf[:cut]) + bytes(buf[cut:]), kv.shape)
    except CodecError:
        pass
