"""The RAG prompt template: a chat template cut around the user message (prefix, passages, question, suffix),
the prefix stored and reused like a passage, the plain layout where a tokenizer has no chat template."""

from __future__ import annotations

import copy

import pytest
import torch

from blend import BlendConfig, passage_refs
from connectors.rag import PromptTemplate, RagConfig, RagError, RagPipeline
from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def shipped_chat():
    """The tiny model, and a copy of its tokenizer given a chat template."""
    from connectors.models import load_model

    model, tok = load_model("tiny", torch.float32)
    chat = copy.deepcopy(tok)
    chat.chat_template = TEMPLATE
    return model, tok, chat


def test_chat_template_is_cut_around_the_user_message(shipped_chat):
    _, _, chat = shipped_chat
    t = PromptTemplate.chat(chat, system="Answer from the passages.")
    assert t.prefix == "<|system|>Answer from the passages.\n<|user|>" and t.suffix == "\n<|assistant|>"
    passages, question = ["first passage", "second passage"], "Which one?"
    user = "".join(p + t.separator for p in passages) + question
    want = chat.apply_chat_template([{"role": "system", "content": "Answer from the passages."},
                                     {"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    assert t.render(passages, question) == want
    assert t.render(passages, question, answer_prefix="It is") == want + "It is"
    assert PromptTemplate.for_tokenizer(chat) == PromptTemplate.chat(chat)


def test_plain_layout_without_a_chat_template_and_bad_templates(shipped_chat):
    _, tok, _ = shipped_chat
    assert not getattr(tok, "chat_template", None)
    assert PromptTemplate.for_tokenizer(tok) == PromptTemplate.plain()
    assert PromptTemplate.plain().render(["a", "b"], "q") == "a\n\nb\n\nq"
    with pytest.raises(RagError, match="no chat template"):
        PromptTemplate.chat(tok)
    with pytest.raises(RagError):
        PromptTemplate(prefix="x", separator="")
    with pytest.raises(RagError):
        PromptTemplate(prefix=3)
    with pytest.raises(RagError):
        RagConfig(template="plain")


def test_the_prefix_is_stored_once_and_reused_like_a_passage(shipped_chat):
    from benchmarks.models.evalset import load_rag

    model, _, chat = shipped_chat
    ex = load_rag()[0]
    store = TieredStore([MemoryTier(256 << 20)], chunk_tokens=64)
    pipe = RagPipeline(model, chat, store, RagConfig(namespace="prompt", blend=BlendConfig(ratio=0.15)))
    assert pipe.template == PromptTemplate.chat(chat)
    pipe.precompute(list(ex.passages))
    prefix = pipe.tokens(pipe.template.prefix)
    refs = passage_refs(store, prefix, fingerprint=pipe.fingerprint, namespace="prompt")
    assert prefix.numel() > 0 and all(store.contains([r.key for r in refs]))
    pre = pipe.prefill(ex.prompt_tail, list(ex.passages))
    # the prompt's own tokens, piece by piece: prefix, passages and separators, then question and suffix
    want = torch.cat([prefix] + [x for p in ex.passages for x in (pipe.tokens(p), pipe.tokens("\n\n"))] +
                     [pipe.tokens(ex.prompt_tail + pipe.template.suffix)])
    assert torch.equal(pre.ids, want)
    rep = pre.report
    assert not bool(torch.isin(torch.arange(prefix.numel()), rep.fresh_rows).any())  # loaded, not computed
    assert rep.reused == prefix.numel() + sum(pipe.tokens(p).numel() for p in ex.passages)
    # exact at ratio 1.0 against the model's own prefill of the same ids
    full = pipe.prefill(ex.prompt_tail, list(ex.passages), full_prefill=True)
    exact = pipe.prefill(ex.prompt_tail, list(ex.passages), ratio=1.0)
    assert ((exact.logits - full.logits).abs().max() / full.logits.abs().max()).item() <= 1e-4
    ans = pipe.answer(ex.prompt_tail, list(ex.passages), max_new_tokens=2)
    assert ans.passages_from_store == len(ex.passages) and ans.recomputed == []


def test_a_precomputed_passage_lost_from_the_store_is_reported_as_evicted(shipped_chat):
    from benchmarks.models.evalset import load_rag

    model, tok, _ = shipped_chat
    ex = load_rag()[1]
    store = TieredStore([MemoryTier(256 << 20)], chunk_tokens=64)
    pipe = RagPipeline(model, tok, store, RagConfig(namespace="evict"))
    pipe.precompute({f"p{i}": p for i, p in enumerate(ex.passages)})
    ref = passage_refs(store, pipe.passages["p1"].tokens, fingerprint=pipe.fingerprint, namespace="evict")[0]
    store.delete([ref.key])
    ids = [f"p{i}" for i in range(len(ex.passages))]
    ans = pipe.answer(ex.prompt_tail, passage_ids=ids, max_new_tokens=1)
    assert [(s.id, s.from_store, s.reason) for s in ans.passages if not s.from_store] == [("p1", False, "evicted")]
    by_text = pipe.answer(ex.prompt_tail, list(ex.passages), max_new_tokens=1)  # texts: not known to be stored
    assert [s.reason for s in by_text.recomputed] == ["missing"]
