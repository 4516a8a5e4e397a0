"""Planning and computing the KV of corpus units for the precompute job.

- `Unit`: what gets keyed and stored as one sequence from position 0: a whole document, or (standalone
  mode with `passage_tokens`) one passage of it. `unit.refs` are its chunk refs, computed from the token
  ids alone (content hashes): the job asks the target which exist before running the model.
- `split_units(doc_id, ids, ...)`: a document's token ids -> its units.
- `compute_missing(model, work, ...)`: the KV of the chunks each unit still lacks, on the CPU.
  One unit per forward (batch 1) goes through `connectors.hf.compute_chunks`; several units per forward
  go through `prefill_padded`: right-padded, with an attention mask, so every real token sits at the same
  position and sees the same keys as in an unbatched prefill (the values agree to float rounding).

A prefix chunk's KV depends on every token before it, so a unit missing only its last chunks is
prefilled up to the end of its last missing chunk (nothing after it); a standalone passage is
prefilled whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from connectors.hf import cache_layers, compute_chunks, kv_from_layers, run_cached
from kvstore.chunk import Chunk
from kvstore.keys import ChunkKey, ChunkKind, ChunkRef, chunk_refs


@dataclass(frozen=True, slots=True)
class Unit:
    id: str  # document id, or "<doc id>#<n>" for passage n
    doc: str
    doc_start: int  # first token of this unit within its document
    tokens: np.ndarray  # [T] uint32
    refs: tuple[ChunkRef, ...]  # the chunks to store: full chunks (prefix), all chunks (standalone)

    @property
    def keys(self) -> list[ChunkKey]:
        return [r.key for r in self.refs]


@dataclass(frozen=True, slots=True)
class Work:
    """A unit and which of its chunks to compute (the others are in the target already)."""

    unit: Unit
    missing: tuple[int, ...]  # indices into unit.refs

    @property
    def end(self) -> int:
        """Tokens to prefill: up to the end of the last missing chunk."""
        return self.unit.refs[self.missing[-1]].end


def split_units(doc_id: str, ids: np.ndarray, *, kind: ChunkKind, passage_tokens: int | None, namespace: str,
                fingerprint: str, chunk_tokens: int) -> list[Unit]:
    """ids: [T] uint32 of one document -> its units, each keyed from position 0."""
    if kind is ChunkKind.STANDALONE and passage_tokens:
        spans = [(s, min(s + passage_tokens, len(ids))) for s in range(0, len(ids), passage_tokens)]
        names = [f"{doc_id}#{i}" for i in range(len(spans))]
    else:
        spans, names = [(0, len(ids))], [doc_id]
    units = []
    for name, (s, e) in zip(names, spans):
        tokens = ids[s:e]
        # Prefix mode stores full chunks only: the store's prefix lookup never matches a partial chunk.
        refs = chunk_refs(tokens, namespace=namespace, fingerprint=fingerprint, chunk_tokens=chunk_tokens, kind=kind,
                          include_partial=kind is ChunkKind.STANDALONE)
        units.append(Unit(name, doc_id, s, tokens, tuple(refs)))
    return units


def plan_batches(work: Sequence[Work], batch_size: int, batch_tokens: int) -> list[list[Work]]:
    """Group work into forwards: corpus order with batch 1; else similar lengths together (less
    padding), at most `batch_size` units and `batch_size * longest <= batch_tokens` per forward."""
    if batch_size <= 1:
        return [[w] for w in work]
    batches: list[list[Work]] = []
    current: list[Work] = []
    for w in sorted(work, key=lambda w: -w.end):
        longest = current[0].end if current else w.end
        if current and (len(current) >= batch_size or (len(current) + 1) * longest > batch_tokens):
            batches.append(current)
            current = []
        current.append(w)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def prefill_padded(model, seqs: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """seqs: B token arrays [T_i] -> B tensors KV [L, 2, T_i, H, D] (post-RoPE keys), one forward.

    Right padding: position i of every sequence is token i, so its keys are rotated exactly as in an
    unbatched prefill; padding comes after the real tokens and is masked, so no real token attends to it.
    Only the last position's logits are computed (the job needs no logits)."""
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)  # [B, T]
    mask = torch.zeros(len(seqs), width, dtype=torch.int64)  # [B, T]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[i, : len(s)] = 1
    _, cache = run_cached(model, ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=1)
    layers = cache_layers(cache, model.config.num_hidden_layers)  # each [B, H, T, D]
    return [kv_from_layers(layers, row=i, end=n) for i, n in enumerate(lengths)]  # each [L, 2, T_i, H, D]


def compute_missing(model, batch: Sequence[Work], *, fingerprint: str, namespace: str, chunk_tokens: int,
                    kind: ChunkKind) -> list[list[Chunk]]:
    """The missing chunks of each unit of `batch` (one forward), with KV on the CPU."""
    if len(batch) == 1:
        w = batch[0]
        chunks = compute_chunks(model, w.unit.tokens[: w.end], fingerprint=fingerprint, namespace=namespace,
                                chunk_tokens=chunk_tokens, kind=kind, include_partial=kind is ChunkKind.STANDALONE)
        return [[_to_cpu(chunks[i]) for i in w.missing]]
    kvs = prefill_padded(model, [w.unit.tokens[: w.end] for w in batch])
    out = []
    for w, kv in zip(batch, kvs):
        refs = w.unit.refs
        out.append([_to_cpu(Chunk.from_ref(refs[i], kv[:, :, refs[i].start : refs[i].end].contiguous())) for i in w.missing])
    return out


def _to_cpu(chunk: Chunk) -> Chunk:
    if chunk.kv.device.type == "cpu":
        return chunk
    return Chunk(chunk.key, chunk.kv.to("cpu"), chunk.tokens, chunk.start_pos)


__all__ = ["Unit", "Work", "compute_missing", "plan_batches", "prefill_padded", "split_units"]
