"""The RAG API end to end with the shipped model: precompute a corpus, answer with blend and with a full
prefill, by texts or ids, retrieval with TF-IDF, a passage missing from the store, bad input."""

from __future__ import annotations

import pytest
import torch

from blend import BlendConfig
from connectors.rag import RagConfig, RagError, RagPipeline, TfidfRetriever
from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier


@pytest.fixture(scope="module")
def setup():
    from benchmarks.models.evalset import load_rag
    from connectors.models import load_model

    model, tok = load_model("tiny", torch.float32)
    examples = load_rag()[:3]
    store = TieredStore([MemoryTier(512 << 20)], chunk_tokens=64)
    pipe = RagPipeline(model, tok, store, RagConfig(namespace="ragtest", max_new_tokens=6,
                                                    blend=BlendConfig(ratio=0.15)))
    corpus = {f"e{i}p{j}": p for i, ex in enumerate(examples) for j, p in enumerate(ex.passages)}
    stats = pipe.precompute(corpus)
    return pipe, examples, corpus, stats


def test_precompute_stores_every_passage_once(setup):
    pipe, _, corpus, stats = setup
    assert stats.passages == len(corpus) and stats.passages_already_stored == 0
    assert stats.chunks_computed >= 2 * len(corpus)  # 100-140-token passages in 64-token chunks
    again = pipe.precompute(corpus)
    assert again.passages_already_stored == len(corpus) and again.chunks_computed == 0


def test_full_prefill_answer_is_the_models_greedy_generation(setup):
    pipe, examples, _, _ = setup
    ex = examples[0]
    ans = pipe.answer(ex.prompt_tail, list(ex.passages), full_prefill=True)
    ids = pipe.prefill(ex.prompt_tail, list(ex.passages), full_prefill=True).ids
    with torch.inference_mode():
        gen = pipe.model.generate(ids[None], max_new_tokens=6, do_sample=False,
                                  eos_token_id=pipe.tokenizer.eos_token_id, pad_token_id=0)
    assert ans.token_ids == gen[0, ids.numel():].tolist()
    assert ans.report is None and ans.prompt_tokens == ids.numel()
    exact = pipe.answer(ex.prompt_tail, list(ex.passages), ratio=1.0)
    assert exact.token_ids == ans.token_ids


def test_answer_by_ids_equals_answer_by_texts(setup):
    pipe, examples, _, _ = setup
    ex = examples[1]
    ids = [f"e1p{j}" for j in range(len(ex.passages))]
    by_id = pipe.answer(ex.prompt_tail, passage_ids=ids)
    by_text = pipe.answer(ex.prompt_tail, list(ex.passages))
    assert by_id.token_ids == by_text.token_ids and by_id.text == by_text.text
    rep = by_id.report
    assert rep.reused == sum(pipe.tokens(p).numel() for p in ex.passages)
    assert 0 < rep.recompute_fraction < 1 and by_id.ttft_seconds > 0


def test_reversed_passages_and_a_missing_chunk(setup):
    pipe, examples, _, _ = setup
    ex = examples[2]
    passages = list(reversed(ex.passages))
    ref = pipe.prefill(ex.prompt_tail, passages, full_prefill=True)
    from blend import passage_refs

    victim = passage_refs(pipe.store, pipe.tokens(passages[2]), fingerprint=pipe.fingerprint, namespace="ragtest")[0]
    pipe.store.delete([victim.key])
    try:
        pre = pipe.prefill(ex.prompt_tail, passages, ratio=1.0)
        assert ((pre.logits - ref.logits).abs().max() / ref.logits.abs().max()).item() <= 1e-4
        blended = pipe.prefill(ex.prompt_tail, passages, ratio=0.15)
        assert blended.report.fresh >= len(victim.tokens)
    finally:
        pipe.precompute({"e2p_restore": passages[2]})


def test_tfidf_retriever_finds_the_passage_naming_the_entity(setup):
    _, examples, corpus, _ = setup
    retriever = TfidfRetriever(corpus)
    name = examples[0].question.split(" was ")[-1].split(" born")[0].split(" work")[0]
    for pid in retriever.search(examples[0].question, 3)[:1]:
        assert any(w in corpus[pid] for w in name.split()[-2:])
    with pytest.raises(RagError):
        retriever.search("x", 0)


def test_bad_input(setup):
    pipe, examples, _, _ = setup
    with pytest.raises(RagError, match="unknown passage ids"):
        pipe.answer("Q: x\nA:", passage_ids=["nope"])
    with pytest.raises(RagError, match="not both"):
        pipe.answer("Q: x\nA:", ["a passage"], passage_ids=["e0p0"])
    with pytest.raises(RagError, match="no tokens"):
        pipe.answer("", ["a passage"])
    with pytest.raises(RagError):
        pipe.answer("Q: x\nA:", "a single string")
    with pytest.raises(ValueError):
        pipe.answer("Q: x\nA:", ["a passage"], ratio=2.0)
    with pytest.raises(RagError):
        RagConfig(max_new_tokens=0)
