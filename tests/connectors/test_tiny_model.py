"""The shipped tiny Llama fixture: loads offline, runs a forward pass, decodes greedily, retrieves."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks.models import evalset  # noqa: E402
from connectors.hf import run_cached  # noqa: E402
from connectors.models import load_model, model_path  # noqa: E402

# Held-out 1-hop questions (teacher-forced greedy match of the whole target): the shipped model gets
# 68/120 = 0.57 against a chance of 0.33 (docs/MODEL.md); the bound leaves room for float differences.
MIN_ONE_HOP_ACCURACY = 0.5
N_GENERATE = 10


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return load_model("tiny", torch.float32)


def test_fixture_files_and_size():
    path = model_path("tiny")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names), "no pickle in the fixture"
    assert sum(p.stat().st_size for p in path.iterdir()) <= 16 * 2**20


def test_config_is_llama_with_gqa(shipped):
    model, tok = shipped
    cfg = model.config
    assert cfg.model_type == "llama"
    assert 0 < cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.rope_parameters["rope_theta"] > 0
    assert model.dtype == torch.float32
    assert len(tok) == cfg.vocab_size


def test_forward_shape_finite_and_not_uniform(shipped):
    model, tok = shipped
    ids = tok("Return the number of items in the list.", return_tensors="pt")["input_ids"]  # [1, S]
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # [1, S, V]
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # a trained model is far from uniform: the loss on ordinary text is well below log(V) = 8.3
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert loss < 6.0


def test_incremental_decoding_matches_full_forward(shipped):
    model, tok = shipped
    ids = tok("The city of Varnhold lies in Eskaria. Trains leave twice a day.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]  # [V]
        _, cache = run_cached(model, ids[:, :-1])
        step = run_cached(model, ids[:, -1:], cache)[0].logits[0, -1]
    assert torch.allclose(full, step, atol=1e-4, rtol=1e-4)


def test_greedy_generation_deterministic_and_not_degenerate(shipped):
    model, tok = shipped
    ids = tok("Return a new list with the items sorted", return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        a = model.generate(ids, **kw)[0, ids.shape[1]:]
        b = model.generate(ids, **kw)[0, ids.shape[1]:]
    assert torch.equal(a, b)
    assert len(a) >= 8
    assert len(set(a.tolist())) >= 4, tok.decode(a)


def test_greedy_generation_answers_heldout_questions(shipped):
    """Greedy ``generate`` (KV cache) agrees with the teacher-forced check, and answers some correctly."""
    model, tok = shipped
    exs = [e for e in evalset.load_rag() if e.hops == 1][:N_GENERATE]
    answered = 0
    for ex in exs:
        ids = tok(ex.prompt(), return_tensors="pt")["input_ids"]  # [1, P]
        target = tok(ex.target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=len(target), do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(gen[0, ids.shape[1]:])
        ok = text == ex.target
        assert ok == evalset.target_match(model, tok, ex)[0], (text, ex.target)
        answered += ok
    assert answered >= 3, answered


def test_heldout_one_hop_well_above_chance(shipped):
    model, tok = shipped
    exs = [e for e in evalset.load_rag() if e.hops == 1]
    correct = sum(evalset.target_match(model, tok, e)[0] for e in exs)
    chance = sum(e.chance for e in exs)  # about 40 of 120
    assert correct >= MIN_ONE_HOP_ACCURACY * len(exs) > chance + 15, (correct, chance)
