"""Segments of a prompt whose passages are looked up in a `TieredStore` under standalone keys.

A passage's KV is stored once, position-independent: its own token ids prefilled alone from position 0
and cut into `ChunkKind.STANDALONE` chunks (`connectors.hf.compute_chunks(kind=STANDALONE,
include_partial=True)`; `kvstore precompute` does the same in batch), chained within the passage from the
fixed standalone root. A passage longer than a chunk spans several chunks; its trailing partial chunk is
stored too, so short passages hit.

`store_segments(store, parts, fingerprint=..)` -> a `SegmentFetch`: the token ids now, and a `fetch()` that
gets every passage chunk in one batched `store.get` (token ids verified on hit). A chunk no tier holds
becomes a fresh segment: blend computes it, it is not an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from blend.errors import BlendInputError
from blend.types import Segment, SegmentFetch, as_ids
from kvstore.keys import ChunkKind, ChunkRef


@dataclass(frozen=True, slots=True, eq=False)
class Part:
    """Prompt tokens: a stored passage (`lookup=True`) or tokens that are always computed."""

    tokens: torch.Tensor  # [T] int64
    lookup: bool

    @classmethod
    def passage(cls, tokens) -> "Part":
        return cls(as_ids(tokens), True)

    @classmethod
    def fresh(cls, tokens) -> "Part":
        return cls(as_ids(tokens), False)


def passage_refs(store, tokens, *, fingerprint: str, namespace: str = "default") -> list[ChunkRef]:
    """The standalone chunk refs of one passage (the trailing partial chunk included)."""
    return store.chunk_refs(as_ids(tokens), fingerprint=fingerprint, namespace=namespace, kind=ChunkKind.STANDALONE,
                            include_partial=True)


def store_segments(store, parts: Sequence[Part], *, fingerprint: str, namespace: str = "default") -> SegmentFetch:
    """A `SegmentFetch` over `parts` in prompt order: one segment per passage chunk, one per fresh part."""
    plan: list[ChunkRef | torch.Tensor] = []  # a ref to look up, or fresh tokens [T]
    for p in parts:
        if not isinstance(p, Part):
            raise BlendInputError(f"parts must be Part objects, got {type(p).__name__}")
        if p.tokens.numel() == 0:
            continue
        if p.lookup:
            plan.extend(passage_refs(store, p.tokens, fingerprint=fingerprint, namespace=namespace))
        else:
            plan.append(p.tokens)
    tokens = [torch.from_numpy(x.tokens.astype("int64")) if isinstance(x, ChunkRef) else x for x in plan]
    refs = [x for x in plan if isinstance(x, ChunkRef)]

    def fetch() -> list[Segment]:
        got = iter(store.get(refs) if refs else [])
        out = []
        for x, tok in zip(plan, tokens):
            if isinstance(x, ChunkRef):
                chunk = next(got)
                out.append(Segment.fresh(tok) if chunk is None else Segment.cached(tok, chunk.kv, chunk.start_pos))
            else:
                out.append(Segment.fresh(tok))
        return out

    return SegmentFetch(tokens, fetch)
