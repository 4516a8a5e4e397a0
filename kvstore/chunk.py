"""The unit of storage: one chunk of KV with the token ids it was computed from.

Canonical layout of `Chunk.kv`: `[num_layers, 2, num_tokens, num_kv_heads, head_dim]` (K at index 0 of
dim 1, V at 1), layer-major so that layer i can be loaded while layer i-1 computes. Keys are stored
post-RoPE; `start_pos` is the position of the chunk's first token when it was computed, so that blend
can re-rotate them to another position.

Handing KV to a caller's buffer (`out`) follows one rule in every tier: `check_out` accepts any tensor
of the right shape and dtype (any device, any strides) and raises `InvalidChunkError`, the caller's
error, for anything else; `deliver` copies into it (or clones when there is none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvstore.errors import InvalidChunkError
from kvstore.keys import ChunkKey, ChunkRef

KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape and dtype of a model's KV, independent of how many tokens a chunk holds."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_kv_heads, self.head_dim) <= 0:
            raise InvalidChunkError(f"layout dimensions must be positive: {self}")
        if self.dtype not in KV_DTYPES:
            raise InvalidChunkError(f"unsupported KV dtype {self.dtype}")

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def nbytes(self, num_tokens: int) -> int:
        return self.num_layers * 2 * num_tokens * self.num_kv_heads * self.head_dim * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Chunk:
    """KV of consecutive tokens, with its key, its token ids and its start position."""

    key: ChunkKey
    kv: torch.Tensor  # [L, 2, T, H, D]
    tokens: np.ndarray  # [T] uint32
    start_pos: int = 0

    def __post_init__(self) -> None:
        kv = self.kv
        if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
            raise InvalidChunkError("chunk KV must be a tensor [num_layers, 2, num_tokens, num_kv_heads, head_dim]")
        if kv.dtype not in KV_DTYPES:
            raise InvalidChunkError(f"unsupported KV dtype {kv.dtype}")
        if kv.numel() == 0:
            raise InvalidChunkError("chunk KV is empty")
        if len(self.tokens) != kv.shape[2]:
            raise InvalidChunkError(f"chunk has {kv.shape[2]} tokens of KV but {len(self.tokens)} token ids")
        if self.start_pos < 0:
            raise InvalidChunkError(f"start_pos must be >= 0, got {self.start_pos}")

    @classmethod
    def from_ref(cls, ref: ChunkRef, kv: torch.Tensor) -> "Chunk":
        """The chunk for `ref` (a slice of a prompt) holding `kv` [L, 2, T, H, D]."""
        return cls(ref.key, kv, ref.tokens, ref.start)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def copy(self) -> "Chunk":
        """This chunk with a private CPU copy of its KV: valid whatever happens to the original's memory."""
        return Chunk(self.key, self.kv.detach().to("cpu", copy=True), self.tokens, self.start_pos)

    @property
    def layout(self) -> KVLayout:
        return KVLayout(self.kv.shape[0], self.kv.shape[3], self.kv.shape[4], self.kv.dtype)


def check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """`out` can receive KV of this shape [L, 2, T, H, D] and dtype; else the caller's `InvalidChunkError`."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidChunkError(f"output buffer {got} does not fit KV {tuple(shape)} {dtype}")


def deliver(kv: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """kv [L, 2, T, H, D] copied into `out` (checked), or into a fresh tensor when `out` is None."""
    if out is None:
        return kv.clone()
    check_out(out, tuple(kv.shape), kv.dtype)
    out.copy_(kv)
    return out
