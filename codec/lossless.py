"""Lossless codecs: `raw` (the tensor's bytes) and `zstd` (byte-plane shuffle, then zstd).

Why the shuffle: a 16-bit float's high byte (sign, exponent, top mantissa bits) is highly repetitive
across a KV tensor and its low byte is close to noise. Grouping all high bytes, then all low bytes, lets
zstd compress the first plane well instead of seeing interleaved noise everywhere.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import torch
import zstandard

from codec.base import Codec, CodecError, register


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of any dtype -> its bytes as uint8 [numel * itemsize] (no copy)."""
    return t.reshape(-1).view(torch.uint8)


# Plane by plane through numpy column views: ~7x faster than a transposed torch copy on uint8.
def _shuffle(src: np.ndarray, itemsize: int) -> np.ndarray:
    """bytes [N * itemsize] -> planes [itemsize * N], plane p holding byte p of every element."""
    n = src.size // itemsize
    cols = src.reshape(n, itemsize)
    planes = np.empty(src.size, dtype=np.uint8)
    for p in range(itemsize):
        planes[p * n : (p + 1) * n] = cols[:, p]
    return planes


def _unshuffle(planes: np.ndarray, dst: np.ndarray, itemsize: int) -> None:
    n = dst.size // itemsize
    cols = dst.reshape(n, itemsize)
    for p in range(itemsize):
        cols[:, p] = planes[p * n : (p + 1) * n]


@register
class RawCodec(Codec):
    name = "raw"
    lossless = True
    payload_is_raw = True

    def encode(self, kv: torch.Tensor) -> memoryview:
        kv = kv.contiguous()
        return memoryview(_byte_view(kv).numpy())

    def decode(self, payload: memoryview, out: torch.Tensor) -> None:
        dst = _byte_view(out)
        if len(payload) != dst.numel():
            raise CodecError(f"raw payload has {len(payload)} bytes, expected {dst.numel()}")
        dst.numpy()[:] = np.frombuffer(payload, dtype=np.uint8)


_ZSTD_PARAMS = struct.Struct("<bB")  # level, shuffle (0/1)


@register
class ZstdCodec(Codec):
    name = "zstd"
    lossless = True

    def __init__(self, level: int = 3, shuffle: bool = True) -> None:
        if not -7 <= level <= 22:
            raise CodecError(f"zstd level must be in [-7, 22], got {level}")
        self.level = level
        self.shuffle = shuffle
        # zstandard contexts must not be shared between threads: one per thread that encodes.
        self._local = threading.local()

    @classmethod
    def at_level(cls, level: int) -> "ZstdCodec":
        return cls(level=level)

    def params(self) -> bytes:
        return _ZSTD_PARAMS.pack(self.level, int(self.shuffle))

    @classmethod
    def from_params(cls, params: bytes) -> "ZstdCodec":
        if len(params) != _ZSTD_PARAMS.size:
            raise CodecError("zstd parameters must be 2 bytes")
        level, shuffle = _ZSTD_PARAMS.unpack(params)
        if shuffle > 1:
            raise CodecError("zstd shuffle flag must be 0 or 1")
        return cls(level, bool(shuffle))

    def nominal_bits(self, element_bits: int) -> float:
        return 0.85 * element_bits  # SmolLM2's fp32 KV: 27.3 bits

    def encode(self, kv: torch.Tensor) -> bytes:
        raw = _byte_view(kv.contiguous()).numpy()
        if self.shuffle and kv.element_size() > 1:
            raw = _shuffle(raw, kv.element_size())
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return cctx.compress(memoryview(raw))

    def decode(self, payload: memoryview, out: torch.Tensor) -> None:
        dst = _byte_view(out)
        n = dst.numel()
        try:
            size = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as e:
            raise CodecError(f"not a zstd frame: {e}") from None
        if size != n:
            raise CodecError(f"zstd frame holds {size} bytes, expected {n}")
        try:
            # max_output_size bounds the allocation whatever the frame claims.
            plain = zstandard.ZstdDecompressor().decompress(payload, max_output_size=n)
        except zstandard.ZstdError as e:
            raise CodecError(f"corrupt zstd payload: {e}") from None
        if len(plain) != n:
            raise CodecError(f"zstd payload decoded to {len(plain)} bytes, expected {n}")
        src = np.frombuffer(plain, dtype=np.uint8)
        itemsize = out.element_size()
        if self.shuffle and itemsize > 1:
            _unshuffle(src, dst.numpy(), itemsize)
        else:
            dst.numpy()[:] = src
