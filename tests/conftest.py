"""Shared helpers of the store and codec tests: random chunks and bit-exact comparison.

Helpers are handed out as session-scoped fixtures (factories), so hypothesis tests can use them without
function-scoped state leaking between examples.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.chunk import Chunk
from kvstore.keys import ChunkKind, chunk_refs

# A small chunk: [num_layers=2, 2, num_tokens=16, num_kv_heads=2, head_dim=8]
SMALL_SHAPE = (2, 2, 16, 2, 8)

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def random_kv(shape=SMALL_SHAPE, dtype=torch.float16, seed: int = 0, special: bool = False) -> torch.Tensor:
    """Random KV [L, 2, T, H, D]. With `special`, random bit patterns: NaNs with payloads, infs, -0.0,
    subnormals, so a codec that goes through float arithmetic anywhere is caught."""
    g = torch.Generator().manual_seed(seed)
    if special:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        bits = torch.randint(-(2 ** (8 * itemsize - 1)), 2 ** (8 * itemsize - 1), shape, generator=g, dtype=_INT_VIEW[itemsize])
        kv = bits.view(dtype).clone()
        flat = kv.view(-1)
        specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0], dtype=dtype)
        flat[: len(specials)] = specials[: flat.numel()]
        return kv
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers (NaN == NaN, -0.0 != 0.0)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a.cpu()), bits(b.cpu()))


def make_chunk(
    seed: int = 0,
    shape=SMALL_SHAPE,
    dtype=torch.float16,
    *,
    namespace: str = "test",
    fingerprint: str = "m",
    tokens=None,
    start_pos: int = 0,
    kind: ChunkKind = ChunkKind.STANDALONE,
    special: bool = False,
) -> Chunk:
    """A chunk with random KV whose key is the (standalone) key of its tokens; tokens derive from `seed`."""
    n = shape[2]
    if tokens is None:
        tokens = (np.arange(n, dtype=np.int64) + seed * 100_003) % (2**32)
    ref = chunk_refs(tokens, namespace=namespace, fingerprint=fingerprint, chunk_tokens=n, kind=kind)[0]
    return Chunk(ref.key, random_kv(shape, dtype, seed, special), ref.tokens, start_pos)


@pytest.fixture(scope="session")
def chunk_factory():
    return make_chunk


@pytest.fixture(scope="session")
def kv_factory():
    return random_kv


@pytest.fixture(scope="session")
def same_bits():
    return bitwise_equal
