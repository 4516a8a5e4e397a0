"""Record format: round trips, and decoding of hostile bytes (always one `RecordError`, bounded memory)."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from codec import make_codec
from kvstore.chunk import Chunk
from kvstore.errors import InvalidChunkError, RecordError
from kvstore.record import (
    MAGIC,
    MAX_CODEC_PARAMS,
    MAX_HEADER_BYTES,
    MAX_TOKENS,
    PRELUDE,
    VERSION,
    decode_payload,
    decode_record,
    encode_record,
    header_length,
    parse_header,
    payload_checksum,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CODECS = ["raw", "zstd"]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def record_bytes(chunk: Chunk, codec_name: str = "raw") -> bytes:
    header, payload = encode_record(chunk, make_codec(codec_name))
    return header + bytes(payload)


@pytest.fixture(scope="module")
def valid_records(chunk_factory):
    return {c: record_bytes(chunk_factory(3, (2, 2, 8, 2, 8), torch.float16, start_pos=40), c) for c in CODECS}


def build_record(
    *,
    namespace: bytes = b"ns",
    fingerprint: bytes = b"m",
    chunk_hash: bytes = bytes(range(16)),
    codec: bytes = b"raw",
    params: bytes = b"",
    params_len: int | None = None,
    dtype_code: int = 1,
    dims: tuple[int, ...] = (1, 2, 2, 1, 4),
    ndim: int | None = None,
    start_pos: int = 0,
    token_count: int | None = None,
    token_bytes: bytes | None = None,
    payload: bytes | None = None,
    payload_len: int | None = None,
    payload_cs: int | None = None,
    version: int = VERSION,
    flags: int = 0,
    header_len_delta: int = 0,
    magic: bytes = MAGIC,
) -> bytes:
    """A record built field by field, with a *valid* header checksum, so that the checks behind the
    checksum (lengths, bounds, shapes) are what is exercised."""
    if token_bytes is None:  # as many token ids as dims say, within reason
        token_bytes = np.arange(dims[2] if len(dims) > 2 and dims[2] <= MAX_TOKENS else 0, dtype="<u4").tobytes()
    if token_count is None:
        token_count = len(token_bytes) // 4
    if payload is None:
        n = {1: 2, 2: 2, 3: 4}.get(dtype_code, 2)
        for d in dims:
            n *= d
        payload = bytes(n) if n <= 1 << 20 else b""
    body = b"".join(
        [
            struct.pack("<B", len(namespace)), namespace,
            struct.pack("<B", len(fingerprint)), fingerprint,
            chunk_hash,
            struct.pack("<B", len(codec)), codec,
            struct.pack("<I", len(params) if params_len is None else params_len), params,
            struct.pack("<BB", dtype_code, len(dims) if ndim is None else ndim),
            struct.pack(f"<{len(dims)}I", *dims),
            struct.pack("<QI", start_pos, token_count),
            token_bytes,
            struct.pack("<QQ", len(payload) if payload_len is None else payload_len,
                        payload_checksum(payload) if payload_cs is None else payload_cs),
        ]
    )
    prelude = PRELUDE.pack(magic, version, flags, len(body) + 8 + header_len_delta)
    return prelude + body + struct.pack("<Q", xxhash.xxh3_64_intdigest(prelude + body)) + payload


def assert_record_error(data, out=None, max_kv_bytes=None, peak_limit=1 << 20):
    """Decoding `data` raises RecordError, and nothing big was allocated on the way."""
    kwargs = {} if max_kv_bytes is None else {"max_kv_bytes": max_kv_bytes}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(RecordError):
            decode_record(data, out, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < peak_limit, f"decoding a bad record allocated {peak} bytes"


# -- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec_name", CODECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("special", [False, True])
def test_round_trip(codec_name, dtype, special, chunk_factory, same_bits):
    chunk = chunk_factory(7, (2, 2, 16, 2, 8), dtype, start_pos=512, special=special)
    data = record_bytes(chunk, codec_name)
    got = decode_record(data)
    assert got.key == chunk.key
    assert got.start_pos == 512
    assert np.array_equal(got.tokens, chunk.tokens) and got.tokens.dtype == np.uint32
    assert same_bits(got.kv, chunk.kv)
    header = parse_header(data)
    assert header.codec == codec_name
    assert header.shape == tuple(chunk.kv.shape) and header.dtype == dtype
    assert header.record_len == len(data)
    assert header.kv_nbytes == chunk.nbytes
    # Decoding into a preallocated buffer fills that very buffer.
    out = torch.empty_like(chunk.kv)
    got = decode_record(data, out)
    assert got.kv is out and same_bits(out, chunk.kv)


def test_zstd_record_is_smaller_for_compressible_kv(chunk_factory):
    chunk = chunk_factory(0)
    chunk = Chunk(chunk.key, torch.zeros_like(chunk.kv), chunk.tokens)
    assert len(record_bytes(chunk, "zstd")) < len(record_bytes(chunk, "raw")) // 4


def test_record_from_a_non_contiguous_tensor(chunk_factory, same_bits):
    chunk = chunk_factory(1)
    kv = chunk.kv.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)  # same values, other strides
    assert not kv.is_contiguous()
    for name in CODECS:
        got = decode_record(record_bytes(Chunk(chunk.key, kv, chunk.tokens), name))
        assert same_bits(got.kv, chunk.kv)


@pytest.mark.parametrize(
    "out",
    [
        torch.empty(2, 2, 8, 2, 4, dtype=torch.float16),  # wrong shape
        torch.empty(2, 2, 8, 2, 8, dtype=torch.float32),  # wrong dtype
        torch.empty(512, dtype=torch.float16),  # right numel, wrong shape
    ],
    ids=["shape", "dtype", "flat"],
)
@pytest.mark.parametrize("codec_name", CODECS)
def test_decode_into_wrong_out_is_the_callers_error(valid_records, codec_name, out):
    # A buffer that cannot take the KV is the caller's mistake, not a bad record: a tier must not drop
    # (or delete, or quarantine) a valid record because of it.
    with pytest.raises(InvalidChunkError) as e:
        decode_record(valid_records[codec_name], out)
    assert not isinstance(e.value, RecordError)


@pytest.mark.parametrize("codec_name", CODECS)
def test_decode_into_a_strided_out(valid_records, codec_name, same_bits):
    want = decode_record(valid_records[codec_name])
    out = torch.full((2, 2, 8, 2, 16), 7.0, dtype=torch.float16)[..., ::2]  # right shape, not contiguous
    got = decode_record(valid_records[codec_name], out)
    assert got.kv is out and same_bits(out.contiguous(), want.kv)


# -- corruption ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec_name", CODECS)
def test_truncation_at_every_length(valid_records, codec_name):
    data = valid_records[codec_name]
    for n in range(len(data)):
        with pytest.raises(RecordError):
            decode_record(data[:n])
    with pytest.raises(RecordError):
        decode_record(data + b"\x00")  # trailing bytes too


@FUZZ
@given(st.sampled_from(CODECS), st.data())
def test_any_byte_flip_is_detected(valid_records, codec_name, data):
    rec = bytearray(valid_records[codec_name])
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(rec) - 1), st.integers(1, 255)), min_size=1, max_size=4))
    for pos, x in flips:
        rec[pos] ^= x
    assume(bytes(rec) != valid_records[codec_name])
    with pytest.raises(RecordError):
        decode_record(bytes(rec))


def test_payload_checksum_mismatch(valid_records):
    rec = bytearray(valid_records["raw"])
    rec[-1] ^= 1
    with pytest.raises(RecordError, match="payload checksum"):
        decode_record(bytes(rec))
    header = parse_header(bytes(rec))  # the header itself is intact
    with pytest.raises(RecordError, match="payload checksum"):
        decode_payload(header, memoryview(bytes(rec))[header.header_len :])


def test_header_checksum_mismatch(valid_records):
    rec = bytearray(valid_records["raw"])
    rec[PRELUDE.size + 1] ^= 0x20  # a namespace byte
    with pytest.raises(RecordError, match="header checksum"):
        decode_record(bytes(rec))
    rec = bytearray(valid_records["raw"])
    h = parse_header(bytes(rec))
    rec[h.header_len - 1] ^= 1  # the stored header checksum itself
    with pytest.raises(RecordError, match="header checksum"):
        decode_record(bytes(rec))


@FUZZ
@given(st.binary(max_size=4096))
def test_random_garbage(blob):
    with pytest.raises(RecordError):
        decode_record(blob)


@FUZZ
@given(st.binary(max_size=4096), st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1))
def test_random_bytes_behind_a_valid_magic(blob, version, header_len):
    data = PRELUDE.pack(MAGIC, VERSION, 0, header_len) + blob
    assert_record_error(data)
    with pytest.raises(RecordError):
        decode_record(PRELUDE.pack(MAGIC, version, 0, header_len) + blob)


def test_prelude_checks():
    with pytest.raises(RecordError, match="magic"):
        header_length(PRELUDE.pack(b"KVSX", VERSION, 0, 100))
    with pytest.raises(RecordError, match="version"):
        header_length(PRELUDE.pack(MAGIC, VERSION + 1, 0, 100))
    with pytest.raises(RecordError, match="flags"):
        header_length(PRELUDE.pack(MAGIC, VERSION, 1, 100))
    for bad in (0, 24, MAX_HEADER_BYTES + 1, 2**32 - 1):
        with pytest.raises(RecordError, match="header length"):
            header_length(PRELUDE.pack(MAGIC, VERSION, 0, bad))
    with pytest.raises(RecordError):
        header_length(MAGIC)
    assert header_length(PRELUDE.pack(MAGIC, VERSION, 0, 100)) == PRELUDE.size + 100


# -- hand-built headers: oversized and inconsistent fields ------------------------------------------------


def test_build_record_helper_builds_valid_records(same_bits):
    # The fuzzing below leans on this builder; check that its defaults give a record that decodes.
    chunk = decode_record(build_record())
    assert chunk.kv.shape == (1, 2, 2, 1, 4) and chunk.key.namespace == "ns"
    assert torch.count_nonzero(chunk.kv) == 0 and chunk.tokens.tolist() == [0, 1]


HOSTILE = {
    "payload 2**40 bytes": dict(payload=b"", payload_len=2**40),
    "payload 2**64-1 bytes": dict(payload=b"", payload_len=2**64 - 1),
    "dims claim 2**40 bytes": dict(dims=(2**10, 2, 1, 2**9, 2**10), token_bytes=bytes(4)),
    "dims at u32 max": dict(dims=(2**32 - 1, 2, 1, 2**32 - 1, 2**32 - 1), token_bytes=bytes(4)),
    "1 GiB + 2 of KV": dict(dims=(1, 2, 1, 1, 2**28 + 1), dtype_code=2, token_bytes=bytes(4)),
    "token_count u32 max, no ids": dict(token_count=2**32 - 1, token_bytes=b""),
    "token_count MAX_TOKENS, no ids": dict(token_count=MAX_TOKENS, token_bytes=b""),
    "token_count over MAX_TOKENS": dict(token_count=MAX_TOKENS + 1, token_bytes=b""),
    "codec params u32 max": dict(params_len=2**32 - 1),
    "codec params over limit": dict(params_len=MAX_CODEC_PARAMS + 1),
    "codec params longer than header": dict(params_len=MAX_CODEC_PARAMS),
    "unknown codec": dict(codec=b"nope"),
    "non-ascii codec name": dict(codec=b"\xffraw"),
    "bad raw params": dict(params=b"x"),
    "bad zstd params": dict(codec=b"zstd", params=b"\x03\x05"),
    "unknown dtype": dict(dtype_code=9),
    "ndim 4": dict(dims=(1, 2, 2, 4)),
    "ndim 255, 5 dims": dict(ndim=255),
    "ndim 0": dict(ndim=0, dims=()),
    "dim 1 is not 2": dict(dims=(1, 3, 2, 1, 4)),
    "zero dim": dict(dims=(1, 2, 2, 0, 4)),
    "tokens do not match dims": dict(dims=(1, 2, 3, 1, 4), token_bytes=bytes(8)),
    "invalid namespace": dict(namespace=b"../x"),
    "empty namespace": dict(namespace=b""),
    "non-utf8 namespace": dict(namespace=b"\xff\xfe"),
    "empty fingerprint": dict(fingerprint=b""),
    "non-printable fingerprint": dict(fingerprint=b"m\x00"),
    "header_len too long": dict(header_len_delta=8),
    "header_len too short": dict(header_len_delta=-8),
    "payload shorter than declared": dict(payload_len=63),
    "payload longer than declared": dict(payload_len=65),
    "payload checksum wrong": dict(payload_cs=0),
    "raw payload of the wrong size": dict(payload=bytes(8)),
    "zstd payload that is not zstd": dict(codec=b"zstd", params=b"\x03\x01", payload=bytes(16)),
}


@pytest.mark.parametrize("fields", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_header_fields(fields):
    assert_record_error(build_record(**fields))


def test_max_kv_bytes_bounds_the_decoded_size(valid_records):
    data = valid_records["raw"]
    h = parse_header(data)
    assert_record_error(data, max_kv_bytes=h.kv_nbytes - 1)
    assert decode_record(data, max_kv_bytes=h.kv_nbytes).kv.numel() * 2 == h.kv_nbytes


def test_zstd_bomb_inside_a_record():
    # A valid header for a tiny tensor whose payload is a frame that inflates to 1 MiB.
    import zstandard

    frame = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    assert_record_error(build_record(codec=b"zstd", params=b"\x03\x01", payload=frame), peak_limit=1 << 19)


_FIELD_VALUES = {
    "namespace": st.binary(max_size=70),
    "fingerprint": st.binary(max_size=20),
    "codec": st.sampled_from([b"raw", b"zstd", b"", b"nope", b"RAW"]),
    "params": st.binary(max_size=4),
    "params_len": st.integers(0, 2**32 - 1),
    "dtype_code": st.integers(0, 255),
    "dims": st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 4), min_size=0, max_size=6).map(tuple),
    "ndim": st.integers(0, 255),
    "start_pos": st.integers(0, 2**64 - 1),
    "token_count": st.integers(0, 2**32 - 1) | st.integers(0, 8),
    "token_bytes": st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]),
    "payload": st.binary(max_size=64),
    "payload_len": st.integers(0, 2**64 - 1) | st.integers(0, 128),
    "payload_cs": st.integers(0, 2**64 - 1),
    "header_len_delta": st.integers(-16, 16),
}


@FUZZ
@given(
    base=st.fixed_dictionaries(
        {"dims": st.tuples(st.integers(1, 3), st.just(2), st.integers(1, 4), st.integers(1, 3), st.integers(1, 8)),
         "dtype_code": st.integers(1, 3)}
    ),
    data=st.data(),
)
def test_fuzzed_header_fields_give_record_error_or_a_consistent_chunk(base, data):
    # One to three fields take arbitrary values, the rest stay consistent, so that every check behind
    # the header checksum is reached.
    names = data.draw(st.lists(st.sampled_from(sorted(_FIELD_VALUES)), min_size=1, max_size=3, unique=True))
    fields = {**base, **{n: data.draw(_FIELD_VALUES[n], label=n) for n in names}}
    record = build_record(**fields)
    tracemalloc.start()
    try:
        try:
            chunk = decode_record(record)
        except RecordError as e:
            chunk = None
            event(str(e)[:30])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20)
    if chunk is not None:  # only a fully consistent record decodes
        event("decoded")
        h = parse_header(record)
        assert h.record_len == len(record)
        assert tuple(chunk.kv.shape) == h.shape and chunk.kv.shape[2] == len(chunk.tokens)
        assert chunk.nbytes == h.kv_nbytes
