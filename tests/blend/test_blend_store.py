"""Standalone chunk keys and store-backed segments: a passage stored once is found in any prompt, passages
span several chunks (the partial tail included), and a chunk missing from the store is computed."""

from __future__ import annotations

import torch

from blend import BlendConfig, Part, Segment, blend, passage_refs, store_segments
from connectors.hf import compute_chunks, model_fingerprint
from kvstore.keys import ChunkKind
from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier


def _setup(shipped, chunk_tokens=64):
    from benchmarks.models.evalset import load_rag

    model, tok = shipped
    ex = load_rag()[2]
    enc = lambda s: torch.tensor(tok(s, add_special_tokens=False)["input_ids"])
    passages = [enc(p) for p in ex.passages[:3]]
    store = TieredStore([MemoryTier(256 << 20)], chunk_tokens=chunk_tokens)
    fp = model_fingerprint(model)
    for p in passages:
        store.put(compute_chunks(model, p, fingerprint=fp, chunk_tokens=chunk_tokens, kind=ChunkKind.STANDALONE,
                                 include_partial=True))
    return model, store, fp, passages, enc(ex.prompt_tail), enc("\n\n")


def test_passage_keys_agree_with_compute_chunks_and_span_chunks(shipped):
    model, store, fp, passages, _, _ = _setup(shipped)
    for p in passages:
        refs = passage_refs(store, p, fingerprint=fp)
        chunks = compute_chunks(model, p, fingerprint=fp, chunk_tokens=64, kind=ChunkKind.STANDALONE,
                                include_partial=True)
        assert [r.key for r in refs] == [c.key for c in chunks]
        assert len(refs) == -(-p.numel() // 64) >= 2  # several chunks, the partial tail keyed too
        assert all(c is not None for c in store.get(refs))
    # Position-independent: the same passage has the same keys whatever precedes it in a prompt.
    fetch = store_segments(store, [Part.passage(passages[1]), Part.passage(passages[0])], fingerprint=fp)
    fetch2 = store_segments(store, [Part.passage(passages[0])], fingerprint=fp)
    assert all(s.is_cached for s in fetch.fetch()) and all(s.is_cached for s in fetch2.fetch())


def test_store_segments_match_in_memory_segments(shipped):
    model, store, fp, passages, q, sep = _setup(shipped)
    parts = [x for p in passages for x in (Part.passage(p), Part.fresh(sep))] + [Part.fresh(q)]
    fetched = blend(model, store_segments(store, parts, fingerprint=fp), BlendConfig(ratio=0.15))
    segs = []
    for p in passages:
        for c in compute_chunks(model, p, fingerprint=fp, chunk_tokens=64, kind=ChunkKind.STANDALONE,
                                include_partial=True):
            segs.append(Segment.cached(torch.from_numpy(c.tokens.astype("int64")), c.kv, c.start_pos))
        segs.append(Segment.fresh(sep))
    segs.append(Segment.fresh(q))
    direct = blend(model, segs, BlendConfig(ratio=0.15))
    assert torch.equal(fetched.kv, direct.kv) and torch.equal(fetched.logits, direct.logits)
    assert fetched.report.reused == sum(p.numel() for p in passages)


def test_missing_chunk_is_computed_not_an_error(shipped):
    model, store, fp, passages, q, sep = _setup(shipped)
    victim = passage_refs(store, passages[1], fingerprint=fp)[1]  # the middle passage's second chunk
    assert store.delete([victim.key]) == 1
    parts = [x for p in passages for x in (Part.passage(p), Part.fresh(sep))] + [Part.fresh(q)]
    for ratio in (0.0, 0.15):
        res = blend(model, store_segments(store, parts, fingerprint=fp), BlendConfig(ratio=ratio))
        start = passages[0].numel() + sep.numel() + victim.start
        rows = torch.arange(start, start + len(victim.tokens))
        assert torch.isin(rows, res.report.fresh_rows).all()
        assert res.report.reused == sum(p.numel() for p in passages) - len(victim.tokens)
        # The missing rows were computed by the model at every layer, like the question.
        assert all(c >= rows.numel() + q.numel() for c in res.report.computed)
        assert torch.isfinite(res.logits).all()
    full = blend(model, store_segments(store, parts, fingerprint=fp), BlendConfig(ratio=1.0))
    ids = torch.cat([p.tokens for p in parts])
    with torch.inference_mode():
        ref = model(ids[None]).logits[0, -1]
    assert ((full.logits - ref).abs().max() / ref.abs().max()).item() <= 1e-4
