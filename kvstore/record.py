"""The record: what byte tiers (disk, remote) hold for one chunk. Versioned, self-describing, no pickle.

Layout (little-endian):
    prelude   magic b"KVSR" | version u16 | flags u16 | header_len u32          (12 bytes)
    header    namespace (u8 len + utf-8) | model fingerprint (u8 len + utf-8) | chunk hash (16)
              | codec name (u8 len + ascii) | codec params (u32 len + bytes)
              | dtype code u8 | ndim u8 | dims u32 x ndim | start_pos u64
              | token_count u32 | token ids u32 x token_count
              | payload_len u64 | payload xxh3-64 u64 | header xxh3-64 u64 (of prelude + header before it)
    payload   codec output, payload_len bytes

Why it is safe to decode bytes from an untrusted peer: every length is checked against the bytes that
are actually there and against fixed bounds before anything is allocated; the header carries its own
checksum, checked before any field is trusted; the decoded tensor's size is bounded by `max_kv_bytes`;
and the payload checksum is checked before the codec sees the payload. Any failure is one `RecordError`.

This module is the one serializer of the byte tiers: `encode_record` (chunk -> header, payload),
`decode_record` (bytes -> chunk, into the caller's buffer where given), `read_record` (the same from a
file or a stream; `read_header`, its first half), `verify_record` (all checks but decoding, for records
moved as bytes). A caller's buffer of
the wrong shape or dtype is the caller's `InvalidChunkError`, never mistaken for a bad record.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
import xxhash

from codec import Codec, CodecError, codec_class, codec_from_params
from kvstore.chunk import Chunk, check_out
from kvstore.errors import InvalidKeyError, RecordError, RecordTooLargeError
from kvstore.keys import HASH_BYTES, TOKEN_DTYPE, ChunkKey

MAGIC = b"KVSR"
VERSION = 1
PRELUDE = struct.Struct("<4sHHI")
MAX_HEADER_BYTES = 1 << 20
MAX_TOKENS = 1 << 17
MAX_CODEC_PARAMS = 1 << 16
DEFAULT_MAX_KV_BYTES = 1 << 30  # one chunk of a 70B model at 256 tokens is 80 MiB

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_TRAILER = struct.Struct("<QQQ")  # payload_len, payload checksum, header checksum


@dataclass(frozen=True, slots=True)
class RecordHeader:
    key: ChunkKey
    codec: str
    codec_params: bytes
    dtype: torch.dtype
    shape: tuple[int, ...]  # [L, 2, T, H, D]
    start_pos: int
    tokens: np.ndarray  # [T] uint32
    payload_len: int
    payload_checksum: int
    header_len: int  # prelude + header bytes: where the payload starts

    @property
    def kv_nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    @property
    def record_len(self) -> int:
        return self.header_len + self.payload_len


def payload_checksum(payload) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def encode_header(chunk: Chunk, codec: Codec, payload_len: int, checksum: int) -> bytes:
    """The prelude and header of a record for `chunk` whose payload (already encoded) has this length."""
    key = chunk.key
    ns, fp, cname, params = key.namespace.encode(), key.fingerprint.encode(), codec.name.encode(), codec.params()
    shape = tuple(chunk.kv.shape)
    tokens = np.ascontiguousarray(chunk.tokens, dtype=TOKEN_DTYPE)
    body = b"".join(
        [
            struct.pack("<B", len(ns)), ns,
            struct.pack("<B", len(fp)), fp,
            key.chunk_hash,
            struct.pack("<B", len(cname)), cname,
            struct.pack("<I", len(params)), params,
            struct.pack("<BB", _DTYPE_CODES[chunk.kv.dtype], len(shape)),
            struct.pack(f"<{len(shape)}I", *shape),
            struct.pack("<QI", chunk.start_pos, len(tokens)),
            tokens.tobytes(),
            struct.pack("<QQ", payload_len, checksum),
        ]
    )
    header_len = len(body) + 8
    prelude = PRELUDE.pack(MAGIC, VERSION, 0, header_len)
    return prelude + body + struct.pack("<Q", xxhash.xxh3_64_intdigest(prelude + body))


def encode_record(chunk: Chunk, codec: Codec) -> tuple[bytes, memoryview]:
    """(header, payload): write them back to back (writev) to make the record without joining them."""
    kv = chunk.kv.detach()
    if kv.device.type != "cpu":
        kv = kv.cpu()
    codec = codec.bind(chunk.key.fingerprint)  # e.g. cachegen picks the model's codebook; its params name it
    payload = memoryview(codec.encode(kv)).cast("B")
    return encode_header(chunk, codec, len(payload), payload_checksum(payload)), payload


class _Reader:
    """A bounds-checked cursor over the header bytes."""

    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise RecordError("record header is truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(s))


def header_length(prelude: bytes | memoryview) -> int:
    """Total prelude + header length announced by the first `PRELUDE.size` bytes of a record."""
    if len(prelude) < PRELUDE.size:
        raise RecordError("record is shorter than its prelude")
    magic, version, flags, header_len = PRELUDE.unpack(prelude[: PRELUDE.size])
    if magic != MAGIC:
        raise RecordError("not a kvstore record (bad magic)")
    if version != VERSION:
        raise RecordError(f"record format version {version} is not supported (this build reads {VERSION})")
    if flags != 0:
        raise RecordError(f"record has unknown flags {flags:#x}")
    if not _TRAILER.size < header_len <= MAX_HEADER_BYTES:
        raise RecordError(f"record header length {header_len} out of bounds")
    return PRELUDE.size + header_len


def parse_header(buf: bytes | memoryview, max_kv_bytes: int = DEFAULT_MAX_KV_BYTES) -> RecordHeader:
    """Parse and check the header at the start of `buf` (which may hold more, e.g. the payload)."""
    buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    total = header_length(buf)
    if len(buf) < total:
        raise RecordError("record header is truncated")
    (stored,) = struct.unpack("<Q", buf[total - 8 : total])
    if xxhash.xxh3_64_intdigest(buf[: total - 8]) != stored:
        raise RecordError("record header checksum mismatch (corrupted)")
    r = _Reader(buf[: total - 8], PRELUDE.size)
    try:
        (n,) = r.unpack("<B")
        namespace = bytes(r.take(n)).decode()
        (n,) = r.unpack("<B")
        fingerprint = bytes(r.take(n)).decode()
        chunk_hash = bytes(r.take(HASH_BYTES))
        key = ChunkKey(namespace, fingerprint, chunk_hash)
        (n,) = r.unpack("<B")
        codec = bytes(r.take(n)).decode("ascii")
        (n,) = r.unpack("<I")
        if n > MAX_CODEC_PARAMS:
            raise RecordError(f"codec parameters of {n} bytes exceed {MAX_CODEC_PARAMS}")
        params = bytes(r.take(n))
        code, ndim = r.unpack("<BB")
        dtype = _CODE_DTYPES.get(code)
        if dtype is None:
            raise RecordError(f"unknown dtype code {code}")
        if ndim != 5:
            raise RecordError(f"KV must have 5 dimensions, record says {ndim}")
        shape = r.unpack(f"<{ndim}I")
        start_pos, count = r.unpack("<QI")
        if count > MAX_TOKENS:
            raise RecordError(f"token count {count} exceeds {MAX_TOKENS}")
        tokens = np.frombuffer(r.take(count * 4), dtype=TOKEN_DTYPE).copy()
        payload_len, checksum = r.unpack("<QQ")
    except (UnicodeDecodeError, InvalidKeyError) as e:
        raise RecordError(f"record header has an invalid field: {e}") from None
    if r.pos != len(r.buf):
        raise RecordError("record header has trailing bytes")
    if shape[1] != 2 or shape[2] != count or min(shape) <= 0:
        raise RecordError(f"record shape {shape} does not fit {count} tokens of K and V")
    header = RecordHeader(key, codec, params, dtype, tuple(shape), start_pos, tokens, payload_len, checksum, total)
    if header.kv_nbytes > max_kv_bytes:
        raise RecordTooLargeError(f"record decodes to {header.kv_nbytes} bytes, over the limit of {max_kv_bytes}")
    if payload_len > max(header.kv_nbytes * 2, 1 << 16):
        raise RecordError(f"payload of {payload_len} bytes is implausible for {header.kv_nbytes} bytes of KV")
    return header


def decode_payload(header: RecordHeader, payload: memoryview, out: torch.Tensor | None = None) -> Chunk:
    """Check the payload against the header and decode it into `out` (allocated when None)."""
    _check_payload(header, payload)
    direct = out if out is not None and out.device.type == "cpu" and out.is_contiguous() else None
    target = direct if direct is not None else torch.empty(header.shape, dtype=header.dtype)  # [L, 2, T, H, D]
    try:
        codec_from_params(header.codec, header.codec_params).decode(payload, target)
    except CodecError as e:
        raise RecordError(f"record payload does not decode with codec {header.codec!r}: {e}") from None
    if out is not None and direct is None:
        out.copy_(target)  # a GPU or strided buffer: decoded on the CPU, then copied
        target = out
    return Chunk(header.key, target, header.tokens, header.start_pos)


def decode_record(data: bytes | memoryview, out: torch.Tensor | None = None, *, key: ChunkKey | None = None,
                  max_kv_bytes: int = DEFAULT_MAX_KV_BYTES) -> Chunk:
    """A whole record's bytes -> the chunk, decoded into `out` where given.

    `RecordError` for bytes that are not a valid record (or hold another key than `key`, where given);
    `InvalidChunkError` for an `out` of the wrong shape or dtype: the caller's error, not the record's.
    """
    view = memoryview(data).cast("B")
    header = _checked_header(view, key, out, max_kv_bytes)
    if len(view) != header.record_len:
        raise RecordError(f"record has {len(view)} bytes, header says {header.record_len}")
    return decode_payload(header, view[header.header_len :], out)


def read_record(f: BinaryIO, out: torch.Tensor | None = None, *, key: ChunkKey | None = None,
                max_kv_bytes: int = DEFAULT_MAX_KV_BYTES, size: int | None = None) -> Chunk:
    """`decode_record` from a stream at the record's start: a file the record fills, or any reader
    (`read`, `readinto`) of exactly `size` bytes (a record in a network stream).

    The payload of a codec that stores the tensor's own bytes (`Codec.payload_is_raw`) is read straight
    into the output's memory: no copy in between."""
    header = read_header(f, key=key, out=out, max_kv_bytes=max_kv_bytes, size=size)
    target = _raw_target(header, out)
    if target is None:
        payload = bytearray(header.payload_len)
        _read_into(f, memoryview(payload))
        return decode_payload(header, memoryview(payload), out)
    view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    _read_into(f, view)
    _check_payload(header, view)
    return Chunk(header.key, target, header.tokens, header.start_pos)


def read_header(f: BinaryIO, *, key: ChunkKey | None = None, out: torch.Tensor | None = None,
                max_kv_bytes: int = DEFAULT_MAX_KV_BYTES, size: int | None = None) -> RecordHeader:
    """The checked header of the record that `f` holds from its current position (`read_record`'s first
    half): its checksum, `key` and `out` where given, and the record's length against `size` (or, for a
    file, the file's size) before anything as large as the payload is allocated."""
    prelude = _read_exact(f, PRELUDE.size)
    header = _checked_header(prelude + _read_exact(f, header_length(prelude) - PRELUDE.size), key, out, max_kv_bytes)
    if size is None:
        size = os.fstat(f.fileno()).st_size
    if size != header.record_len:
        raise RecordError(f"record of {size} bytes is not the {header.record_len} bytes its header says (truncated?)")
    return header


def verify_record(data: bytes | memoryview, *, key: ChunkKey | None = None,
                  max_kv_bytes: int = DEFAULT_MAX_KV_BYTES, payload: bool = True) -> RecordHeader:
    """Every check of `decode_record` but the codec's own decoding (header, key, a codec this build knows,
    length, payload checksum): what a record that moves between byte tiers as bytes goes through, and what
    the sidecar checks of every record it takes in. `payload=False` leaves out the payload's checksum."""
    view = memoryview(data).cast("B")
    header = _checked_header(view, key, None, max_kv_bytes)
    try:
        codec_class(header.codec)
    except CodecError as e:
        raise RecordError(str(e)) from None
    if len(view) != header.record_len:
        raise RecordError(f"record has {len(view)} bytes, header says {header.record_len}")
    if payload:
        _check_payload(header, view[header.header_len :])
    return header


def _checked_header(buf, key: ChunkKey | None, out: torch.Tensor | None, max_kv_bytes: int) -> RecordHeader:
    header = parse_header(buf, max_kv_bytes)
    if key is not None and header.key != key:
        raise RecordError(f"record holds {header.key}, not {key} (foreign or misplaced)")
    if out is not None:
        check_out(out, header.shape, header.dtype)
    return header


def _check_payload(header: RecordHeader, payload: memoryview) -> None:
    if len(payload) != header.payload_len:
        raise RecordError(f"record payload has {len(payload)} bytes, header says {header.payload_len}")
    if payload_checksum(payload) != header.payload_checksum:
        raise RecordError("record payload checksum mismatch (corrupted)")


def _raw_target(header: RecordHeader, out: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor a payload of the tensor's own bytes can be read into (`out`, or a fresh one); None when
    the codec transforms its payload, or `out` is not contiguous CPU memory."""
    try:
        raw = codec_class(header.codec).payload_is_raw
    except CodecError as e:
        raise RecordError(str(e)) from None
    if not raw or (out is not None and (out.device.type != "cpu" or not out.is_contiguous())):
        return None
    if header.payload_len != header.kv_nbytes:
        raise RecordError(f"raw payload of {header.payload_len} bytes does not fit {header.shape} {header.dtype}")
    return out if out is not None else torch.empty(header.shape, dtype=header.dtype)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            raise RecordError("record is truncated")
        data += more
    return data


def _read_into(f: BinaryIO, view: memoryview) -> None:
    """Fill `view` from `f` (a stream may hand it over in several reads)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise RecordError("record is truncated")
        got += n
