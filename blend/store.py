"""Segments of a prompt whose passages are looked up in a `TieredStore` under standalone keys.

A passage's KV is stored once, position-independent: its own token ids prefilled alone from position 0
and cut into `ChunkKind.STANDALONE` chunks (`connectors.hf.compute_chunks(kind=STANDALONE,
include_partial=True)`; `kvstore precompute` does the same in batch), chained within the passage from the
fixed standalone root. A passage longer than a chunk spans several chunks; its trailing partial chunk is
stored too, so short passages hit.

`store_segments(store, parts, fingerprint=..)` -> a `SegmentFetch`: the token ids now, and a `fetch()` that
gets every passage chunk in one batched `store.get` (token ids verified on hit). A chunk no tier holds
becomes a fresh segment: blend computes it, it is not an error, and its report says why: "missing", or
"evicted" for a passage known to have been stored (`Part.passage(ids, stored=True)`, e.g. from a precompute
manifest). A passage whose stored KV cannot serve this model is given as `Part.fresh(ids, reason=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from blend.errors import BlendInputError
from blend.types import RECOMPUTE_REASONS, Segment, SegmentFetch, as_ids
from kvstore.keys import DEFAULT_NAMESPACE, ChunkKind, ChunkRef, chunk_refs


@dataclass(frozen=True, slots=True, eq=False)
class Part:
    """Prompt tokens: a stored passage (`lookup=True`) or tokens that are always computed."""

    tokens: torch.Tensor  # [T] int64
    lookup: bool
    stored: bool = False  # a passage known to have been stored (a miss is "evicted", else "missing")
    reason: str | None = None  # fresh tokens standing in for a passage: why (`blend.RECOMPUTE_REASONS`)

    @classmethod
    def passage(cls, tokens, *, stored: bool = False) -> "Part":
        return cls(as_ids(tokens), True, stored)

    @classmethod
    def fresh(cls, tokens, reason: str | None = None) -> "Part":
        if reason is not None and reason not in RECOMPUTE_REASONS:
            raise BlendInputError(f"reason must be one of {RECOMPUTE_REASONS}, got {reason!r}")
        return cls(as_ids(tokens), False, False, reason)


def passage_refs(store, tokens, *, fingerprint: str, namespace: str = DEFAULT_NAMESPACE,
                 chunk_tokens: int | None = None) -> list[ChunkRef]:
    """The standalone chunk refs of one passage (the trailing partial chunk included), in chunks of
    `chunk_tokens` (default: the store's)."""
    return chunk_refs(as_ids(tokens).numpy(), namespace=namespace, fingerprint=fingerprint,
                      chunk_tokens=chunk_tokens or store.chunk_tokens, kind=ChunkKind.STANDALONE, include_partial=True)


def store_segments(store, parts: Sequence[Part], *, fingerprint: str, namespace: str = DEFAULT_NAMESPACE,
                   chunk_tokens: int | None = None) -> SegmentFetch:
    """A `SegmentFetch` over `parts` in prompt order: one segment per passage chunk, one per fresh part."""
    plan: list[tuple[ChunkRef | torch.Tensor, Part]] = []  # (a ref to look up, or fresh tokens [T]; its part)
    for p in parts:
        if not isinstance(p, Part):
            raise BlendInputError(f"parts must be Part objects, got {type(p).__name__}")
        if p.tokens.numel() == 0:
            continue
        if p.lookup:
            plan.extend((r, p) for r in passage_refs(store, p.tokens, fingerprint=fingerprint, namespace=namespace,
                                                     chunk_tokens=chunk_tokens))
        else:
            plan.append((p.tokens, p))
    tokens = [torch.from_numpy(x.tokens.astype("int64")) if isinstance(x, ChunkRef) else x for x, _ in plan]
    refs = [x for x, _ in plan if isinstance(x, ChunkRef)]

    def fetch() -> list[Segment]:
        got = iter(store.get(refs) if refs else [])
        out = []
        for (x, part), tok in zip(plan, tokens):
            if isinstance(x, ChunkRef):
                chunk = next(got)
                out.append(Segment.fresh(tok, "evicted" if part.stored else "missing") if chunk is None
                           else Segment.cached(tok, chunk.kv, chunk.start_pos))
            else:
                out.append(Segment.fresh(tok, part.reason))
        return out

    return SegmentFetch(tokens, fetch)
