"""The codec contract and its registry.

A `Codec` turns one chunk's KV tensor `[L, 2, T, H, D]` into bytes and back:
- `encode(kv) -> bytes-like`: a pure function of the tensor and the codec's parameters;
- `decode(payload, out)`: fills the preallocated `out` (dtype and shape from the record header);
- `at_level(level)`: the codec at one of its levels (zstd, cachegen), `CodecError` for the others;
- `params() -> bytes`: the parameters a decoder needs, stored in each record's header, so that a record
  decodes with the codec it was written with, whatever the reader's configuration says;
- `bind(fingerprint) -> Codec`: the codec for chunks of one model (default: itself); record writers call
  it with the chunk's model fingerprint before `encode` and store the bound codec's `params()`.
`decode` treats its input as untrusted: on anything malformed it raises `CodecError`, never crashes,
hangs or allocates more than `out` already is.

This package imports nothing else of the project.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class CodecError(Exception):
    """Payload or parameters that a codec cannot decode; or a codec name that is not registered."""


class Codec(ABC):
    name: ClassVar[str]
    lossless: ClassVar[bool]
    # True when the payload is exactly the tensor's bytes: readers may then read it straight into `out`.
    payload_is_raw: ClassVar[bool] = False

    def params(self) -> bytes:
        """Serialized parameters, stored in the record header (at most 64 KiB); none by default."""
        return b""

    @classmethod
    def from_params(cls, params: bytes) -> "Codec":
        """The codec that decodes what an instance with these `params()` encoded (by default: a codec
        without parameters, which refuses any)."""
        if params:
            raise CodecError(f"{cls.name} codec takes no parameters")
        return cls()

    @classmethod
    def at_level(cls, level: int) -> "Codec":
        """This codec at `level`, for codecs that have levels; the others raise `CodecError`."""
        raise CodecError(f"codec {cls.name!r} takes no level")

    def nominal_bits(self, element_bits: int) -> float:
        """Bits per element that a record of this codec is expected to take for KV of `element_bits`, before
        one is measured (adaptive loading plans with it until it has fetched or encoded this codec's
        records); by default the element's own size."""
        return float(element_bits)

    def bind(self, fingerprint: str) -> "Codec":
        """The codec to encode chunks of the model with this fingerprint. Most codecs ignore it; `cachegen`
        returns itself with that model's codebook, whose digest its `params()` then carry."""
        return self

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> bytes | bytearray | memoryview:
        """kv: [L, 2, T, H, D] on the CPU -> payload."""

    @abstractmethod
    def decode(self, payload: memoryview, out: torch.Tensor) -> None:
        """payload -> out [L, 2, T, H, D] (CPU, contiguous, preallocated)."""


_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    if cls.name in _REGISTRY:
        raise ValueError(f"codec {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


def codec_class(name: str) -> type[Codec]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; registered: {', '.join(codec_names())}") from None


def codec_from_params(name: str, params: bytes) -> Codec:
    return codec_class(name).from_params(params)
