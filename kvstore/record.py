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
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from codec import Codec, CodecError, codec_from_params
from kvstore.chunk import Chunk
from kvstore.errors import InvalidKeyError, RecordError
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
        raise RecordError(f"record decodes to {header.kv_nbytes} bytes, over the limit of {max_kv_bytes}")
    if payload_len > max(header.kv_nbytes * 2, 1 << 16):
        raise RecordError(f"payload of {payload_len} bytes is implausible for {header.kv_nbytes} bytes of KV")
    return header


def decode_payload(header: RecordHeader, payload: memoryview, out: torch.Tensor | None = None, *, verified: bool = False) -> Chunk:
    """Check the payload against the header and decode it into `out` (allocated when None)."""
    if len(payload) != header.payload_len:
        raise RecordError(f"record payload has {len(payload)} bytes, header says {header.payload_len}")
    if not verified and payload_checksum(payload) != header.payload_checksum:
        raise RecordError("record payload checksum mismatch (corrupted)")
    if out is None:
        out = torch.empty(header.shape, dtype=header.dtype)
    elif tuple(out.shape) != header.shape or out.dtype != header.dtype or not out.is_contiguous():
        raise RecordError(f"output buffer {tuple(out.shape)} {out.dtype} does not fit record {header.shape} {header.dtype}")
    try:
        codec_from_params(header.codec, header.codec_params).decode(payload, out)
    except CodecError as e:
        raise RecordError(f"record payload does not decode with codec {header.codec!r}: {e}") from None
    return Chunk(header.key, out, header.tokens, header.start_pos)


def decode_record(data: bytes | memoryview, out: torch.Tensor | None = None, max_kv_bytes: int = DEFAULT_MAX_KV_BYTES) -> Chunk:
    """A whole record's bytes -> the chunk. Raises `RecordError` on anything malformed."""
    view = memoryview(data).cast("B")
    header = parse_header(view, max_kv_bytes)
    if len(view) != header.record_len:
        raise RecordError(f"record has {len(view)} bytes, header says {header.record_len}")
    return decode_payload(header, view[header.header_len :], out)
