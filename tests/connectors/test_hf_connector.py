"""HFConnector end to end with real models: generation with stored KV equals plain `model.generate`
token for token (fp32), from every tier and codec, for partial, full and no hits, and when the store
fails mid-load; chat and document sessions reuse earlier turns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codec import make_codec
from connectors.hf import ChatSession, DocumentQA, HFConnector, model_fingerprint
from connectors.models import load_model
from kvstore.errors import InvalidTokensError
from kvstore.store import TieredStore
from kvstore.tiers import DiskTier, MemoryTier

CT = 32  # chunk tokens: small, so short prompts span several chunks
NEW = 8


@pytest.fixture(scope="module")
def shipped():
    model, tok = load_model("tiny", torch.float32)
    return model, tok


@pytest.fixture(scope="module")
def text_ids(shipped):
    from benchmarks.models.evalset import load_rag

    _, tok = shipped
    ex = load_rag()[3]
    return np.asarray(tok(ex.prompt(), add_special_tokens=False)["input_ids"], dtype=np.uint32)


def reference(model, ids, new=NEW, eos=None) -> list[int]:
    t = torch.from_numpy(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
    with torch.inference_mode():
        out = model.generate(t, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, t.shape[1]:].tolist()


def memory_store(chunks: int = 256, kv_bytes: int = 4 * 2 * CT * 2 * 32 * 4) -> TieredStore:
    return TieredStore([MemoryTier(chunks * kv_bytes)], chunk_tokens=CT)


def disk_store(path, codec: str, level: int | None = None) -> TieredStore:
    return TieredStore([DiskTier(path, 1 << 30, make_codec(codec, level), fsync=False)], chunk_tokens=CT)


def test_memory_tier_hits_generate_the_same_tokens(shipped, text_ids):
    model, _ = shipped
    ids = text_ids[:300]
    ref = reference(model, ids)
    with HFConnector(model, memory_store()) as conn:
        first = conn.generate(ids, NEW)
        assert first.tokens == ref
        assert first.report.reused_tokens == 0 and first.report.computed_tokens == 300
        assert first.report.stored_chunks >= 300 // CT
        conn.wait_stored()
        second = conn.generate(ids, NEW)
        assert second.tokens == ref
        r = second.report
        assert r.reused_tokens == (299 // CT) * CT and r.computed_tokens == 300 - r.reused_tokens
        assert r.tokens_by_tier == {"cpu": r.reused_tokens}
        assert r.ttft_s >= r.load_s and r.fallback is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_and_disk_hits_on_cuda_generate_the_same_tokens(text_ids, tmp_path):
    """CUDA twin of the memory- and disk-tier tests above (which run everywhere): the model on the GPU, the
    stored KV moved to it chunk by chunk, the tokens those of plain generation on the same GPU."""
    model, _ = load_model("tiny", torch.float32)
    model = model.to("cuda")
    ids = text_ids[:300]
    t = torch.from_numpy(np.asarray(ids, dtype=np.int64)).reshape(1, -1).cuda()
    with torch.inference_mode():
        ref = model.generate(t, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, t.shape[1]:].tolist()
    for store in (memory_store(), disk_store(tmp_path, "zstd")):
        with HFConnector(model, store) as conn:
            assert conn.generate(ids, NEW).tokens == ref
            conn.wait_stored()
            second = conn.generate(ids, NEW)
        assert second.tokens == ref
        assert second.report.reused_tokens == (299 // CT) * CT


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_disk_tier_hits_generate_the_same_tokens(shipped, text_ids, tmp_path, codec):
    model, _ = shipped
    ids = text_ids[:200]
    ref = reference(model, ids)
    with HFConnector(model, disk_store(tmp_path, codec)) as conn:
        conn.generate(ids, NEW)
    # A fresh store on the same directory: everything comes from disk, decoded with the record's codec.
    with HFConnector(model, disk_store(tmp_path, codec)) as conn:
        gen = conn.generate(ids, NEW)
    assert gen.tokens == ref
    assert gen.report.tokens_by_tier == {"disk": 192} and gen.report.reused_tokens == 192


def test_partial_hit_reuses_the_common_prefix(shipped, text_ids):
    model, _ = shipped
    base = text_ids[:160]
    other = np.concatenate([text_ids[:100], text_ids[200:290]])  # shares 3 full chunks (96 tokens)
    with HFConnector(model, memory_store()) as conn:
        conn.generate(base, 2)
        conn.wait_stored()
        gen = conn.generate(other, NEW)
    assert gen.tokens == reference(model, other)
    assert gen.report.reused_tokens == 96


def test_prompt_shorter_than_a_chunk_and_chunk_aligned_prompts(shipped, text_ids):
    model, _ = shipped
    with HFConnector(model, memory_store()) as conn:
        for n in (1, 5, CT - 1, CT, CT + 1, 2 * CT):
            ids = text_ids[:n]
            ref = reference(model, ids)
            for _ in range(2):
                gen = conn.generate(ids, NEW)
                conn.wait_stored()
                assert gen.tokens == ref, n
            # The last token is always computed: an exactly aligned prompt reuses all but its last chunk.
            assert gen.report.reused_tokens == ((n - 1) // CT) * CT
            assert gen.report.computed_tokens >= 1


def test_generated_tokens_complete_chunks_that_the_next_turn_reuses(shipped, text_ids):
    model, tok = shipped
    context = tok.decode(text_ids[:150].tolist())
    with HFConnector(model, memory_store()) as conn:
        chat = ChatSession(conn, tok, context, max_new_tokens=20)
        turns = [chat.ask(q) for q in ("\n\nQ: Where was it?\nA:", "\n\nQ: And then?\nA:", "\n\nQ: Why?\nA:")]
        conn.wait_stored()
    for t in turns:
        assert t.answer_ids == reference(model, t.prompt_ids, 20)
    assert turns[0].report.reused_tokens == 0
    # Each later turn reuses all full chunks of the previous turn's prompt and answer.
    for prev, t in zip(turns, turns[1:]):
        before = len(prev.prompt_ids) + len(prev.answer_ids) - 1
        assert t.report.reused_tokens == (min(before, len(t.prompt_ids) - 1) // CT) * CT > 0
    assert len(chat.history_ids) == len(turns[-1].prompt_ids) + len(turns[-1].answer_ids)


def test_document_questions_reuse_the_document(shipped, text_ids):
    model, tok = shipped
    doc = tok.decode(text_ids[:200].tolist())
    with HFConnector(model, memory_store()) as conn:
        qa = DocumentQA(conn, tok, doc, max_new_tokens=NEW)
        a = qa.ask("\n\nQ: Who?\nA:")
        conn.wait_stored()
        b = qa.ask("\n\nQ: Where?\nA:")
    n_doc = len(qa.document_ids)
    assert a.report.reused_tokens == 0
    assert b.report.reused_tokens == (n_doc // CT) * CT  # the document's full chunks
    assert b.answer_ids == reference(model, b.prompt_ids)


# -- faults: the store fails, the answer does not --------------------------------------------------------


def test_corrupted_record_falls_back_to_recompute(shipped, text_ids, tmp_path):
    model, _ = shipped
    ids = text_ids[:200]
    ref = reference(model, ids)
    with HFConnector(model, disk_store(tmp_path, "raw")) as conn:
        conn.generate(ids, 2)
    records = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".json",) and p.stat().st_size > 4096)
    assert len(records) == 6
    store = disk_store(tmp_path, "raw")
    fp = model_fingerprint(model)
    victim_ref = store.chunk_refs(ids, fingerprint=fp)[2]
    victim = [p for p in records if victim_ref.key.hex() in p.name]
    assert len(victim) == 1
    data = bytearray(victim[0].read_bytes())
    data[-100] ^= 0xFF  # a flipped bit in the payload: the checksum catches it
    victim[0].write_bytes(bytes(data))
    with HFConnector(model, store, fingerprint=fp, store_new=False) as conn:
        gen = conn.generate(ids, NEW)
    assert gen.tokens == ref
    assert gen.report.reused_tokens == 2 * CT and "chunk 2" in gen.report.fallback


class FailingMemory(MemoryTier):
    """A tier whose reads raise after its index said yes: a device fault no test can cause for real."""

    def get(self, keys, out=None):
        raise RuntimeError("device lost")


def test_tier_that_raises_falls_back_to_recompute(shipped, text_ids):
    model, _ = shipped
    ids = text_ids[:150]
    store = TieredStore([FailingMemory(1 << 24)], chunk_tokens=CT)
    with HFConnector(model, store) as conn:
        conn.generate(ids, 2)
        conn.wait_stored()
        assert store.lookup(ids, fingerprint=conn.fingerprint) == 4 * CT
        gen = conn.generate(ids, NEW)
    assert gen.tokens == reference(model, ids)
    assert gen.report.reused_tokens == 0 and gen.report.fallback
    assert store.counters.tier_failures >= 1


def test_other_model_or_namespace_never_reuses(shipped, text_ids):
    model, _ = shipped
    ids = text_ids[:100]
    store = memory_store()
    with HFConnector(model, store, namespace="a") as conn:
        conn.generate(ids, 2)
        conn.wait_stored()
    with HFConnector(model, store, namespace="b") as conn:
        assert conn.generate(ids, 2).report.reused_tokens == 0
    with HFConnector(model, store, namespace="a", fingerprint="other-model") as conn:
        assert conn.generate(ids, 2).report.reused_tokens == 0


def test_bad_prompts_raise_typed_errors(shipped):
    model, _ = shipped
    with HFConnector(model, memory_store()) as conn:
        with pytest.raises(InvalidTokensError):
            conn.prefill([])
        with pytest.raises(InvalidTokensError):
            conn.prefill([1, 2, model.config.vocab_size])
        with pytest.raises(InvalidTokensError):
            conn.prefill([[1, 2], [3, 4]])
        with pytest.raises(ValueError):
            conn.generate([1, 2], 0)


# -- other Llama-family architectures ---------------------------------------------------------------


def _tiny(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, rope_scaling={"rope_type": "linear", "factor": 2.0})).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_family_models(arch):
    model = _tiny(arch)
    ids = np.random.default_rng(0).integers(0, 512, 150).astype(np.uint32)
    ref = reference(model, ids)
    with HFConnector(model, TieredStore([MemoryTier(1 << 24)], chunk_tokens=CT)) as conn:
        conn.generate(ids, NEW)
        conn.wait_stored()
        gen = conn.generate(ids, NEW)
    assert gen.report.reused_tokens == 4 * CT
    assert gen.tokens == ref


# -- a lossy tier codec: bounded, not equal ---------------------------------------------------------------

KL_BOUND = {1: 0.05, 2: 0.01, 3: 0.005}  # mean KL of the first token's distribution vs a full prefill


@pytest.mark.parametrize("level", [1, 2, 3])
def test_cachegen_disk_tier_stays_within_its_fidelity_bound(shipped, tmp_path, level):
    from benchmarks.models.evalset import load_rag

    model, tok = shipped
    kls, agree = [], 0
    for k in range(3, 8):
        ids = np.asarray(tok(load_rag()[k].prompt(), add_special_tokens=False)["input_ids"], dtype=np.uint32)[:300]
        path = tmp_path / str(k)
        with HFConnector(model, disk_store(path, "cachegen", level)) as conn:
            conn.generate(ids, 1)
        with HFConnector(model, disk_store(path, "cachegen", level)) as conn:
            pre = conn.prefill(ids)
        assert pre.report.tokens_by_tier == {"disk": 288}
        with torch.inference_mode():
            full = model(torch.from_numpy(ids.astype(np.int64)).reshape(1, -1)).logits[0, -1]
        lp, lq = torch.log_softmax(full, -1), torch.log_softmax(pre.logits, -1)
        kls.append(float((lp.exp() * (lp - lq)).sum()))
        agree += int(torch.argmax(full)) == int(torch.argmax(pre.logits))
        assert not torch.equal(full, pre.logits)  # really lossy: the KV did come through the codec
    assert np.mean(kls) <= KL_BOUND[level], kls
    assert agree >= 4
