"""The passages a `RagPipeline` answers from, and how a precompute manifest becomes them.

A `Passage` holds the exact token ids its KV was keyed by (a passage is looked up by those ids, never by
re-tokenized text), its text (for retrieval and display), and what the pipeline knows of its KV: `stored`
(a precompute manifest lists its chunks as verified in the store, so a miss means they were evicted) or a
`reason` it cannot be loaded at all ("fingerprint mismatch": the manifest's KV was computed by another model).

`manifest_passages(manifest, documents, tokenizer, fingerprint=..)` reads a `kvstore precompute --mode
passages` manifest (unit id -> chunk keys) beside the corpus it was computed from: each unit's token ids
are the document's ids (tokenized as the job did) from `doc_start`, and are checked against the manifest's
chunk hashes, so a document edited since the job ran is noticed (its passages are looked up under their
new keys, and reported as changed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from connectors.precompute import Document, Manifest, read_corpus, read_manifest
from connectors.rag.errors import RagError
from kvstore.keys import ChunkKind, chunk_refs


@dataclass(frozen=True, slots=True, eq=False)
class Passage:
    id: str
    tokens: torch.Tensor  # [T] int64, as keyed
    text: str
    stored: bool = False  # a manifest lists its chunks as stored (a miss is an eviction)
    reason: str | None = None  # its KV cannot be loaded for this model: computed fresh, reported with this


@dataclass(slots=True)
class ManifestLoad:
    """What `manifest_passages` found."""

    passages: int = 0  # units registered
    usable: int = 0  # their stored KV can serve this model (fingerprint and tokens match)
    fingerprint_mismatch: int = 0  # computed by another model (or dtype, or weights)
    changed: list[str] = field(default_factory=list)  # units whose document no longer gives the keyed tokens
    missing_documents: list[str] = field(default_factory=list)  # documents of the manifest not in the corpus


def _documents(documents: Mapping[str, str] | str | os.PathLike) -> Mapping[str, str]:
    if isinstance(documents, Mapping):
        return documents
    return {d.id: d.text for d in read_corpus(documents) if isinstance(d, Document)}


def manifest_passages(manifest: Manifest | str | os.PathLike, documents: Mapping[str, str] | str | os.PathLike,
                      tokenizer, *, fingerprint: str) -> tuple[Manifest, list[Passage], ManifestLoad]:
    """The passages of a standalone (`--mode passages`) manifest, from the corpus it was computed from
    (`documents`: id -> text, or the corpus path the job read)."""
    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    if m.header is None:
        raise RagError("the manifest has no header (the precompute job never started writing it)")
    if m.header.kind is not ChunkKind.STANDALONE:
        raise RagError("the manifest holds prefix chunks: RAG passages need `kvstore precompute --mode passages`")
    docs = _documents(documents)
    wanted = list(dict.fromkeys(r.doc for r in m.records.values()))
    have = [d for d in wanted if d in docs]
    encoded = tokenizer([docs[d] for d in have], add_special_tokens=m.header.add_special_tokens,
                        verbose=False)["input_ids"] if have else []
    doc_ids = {d: np.asarray(ids, dtype=np.int64) for d, ids in zip(have, encoded)}
    load = ManifestLoad(missing_documents=[d for d in wanted if d not in docs])
    out: list[Passage] = []
    for rec in m.records.values():
        ids = doc_ids.get(rec.doc)
        if ids is None:
            continue
        unit = ids[rec.doc_start : rec.doc_start + rec.tokens]
        refs = chunk_refs(unit, namespace=rec.namespace, fingerprint=rec.fingerprint, chunk_tokens=m.header.chunk_tokens,
                          kind=ChunkKind.STANDALONE, include_partial=True)
        same = len(unit) == rec.tokens and [r.key.chunk_hash for r in refs] == [c.hash for c in rec.chunks]
        whole = rec.doc_start == 0 and rec.tokens == len(ids)
        text = docs[rec.doc] if whole else tokenizer.decode(unit.tolist())
        load.passages += 1
        if not same:
            load.changed.append(rec.id)
            out.append(Passage(rec.id, torch.from_numpy(unit.copy()), text))
        elif rec.fingerprint != fingerprint:
            load.fingerprint_mismatch += 1
            out.append(Passage(rec.id, torch.from_numpy(unit.copy()), text, reason="fingerprint mismatch"))
        else:
            load.usable += 1
            out.append(Passage(rec.id, torch.from_numpy(unit.copy()), text, stored=True))
    return m, out, load
