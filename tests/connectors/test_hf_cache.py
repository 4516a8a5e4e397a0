"""The transformers cache and attention the connectors run models with: `ReservedLayer` appends in place
and never rewrites what an earlier view holds; `use_gqa_attention` gives the logits of transformers' own
"sdpa" bit for bit, without repeating the KV heads."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from connectors.hf import append_kv, kv_to_cache, reserved_cache, run_cached, use_gqa_attention
from connectors.hf.attention import ATTENTION
from connectors.models import load_model


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny", torch.float32)  # 8 query heads over 2 KV heads
    return model


def _kv(model, tokens: int, seed: int = 0) -> torch.Tensor:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return torch.randn(cfg.num_hidden_layers, 2, tokens, cfg.num_key_value_heads, head_dim, generator=g)


def _dynamic(model, kv: torch.Tensor) -> DynamicCache:
    """transformers' own cache holding kv: the reference a reserved cache must match."""
    cache = DynamicCache(config=model.config)
    append_kv(cache, kv)
    return cache


@torch.inference_mode()
def test_a_reserved_cache_appends_in_place_and_gives_the_same_logits(tiny):
    kv = _kv(tiny, 40)
    ids = torch.arange(5, 13).reshape(1, -1)
    want = run_cached(tiny, ids, _dynamic(tiny, kv))[0].logits
    cache = kv_to_cache(kv, tiny, reserve=16)
    layer = cache.layers[0]
    before, view = layer.keys.data_ptr(), layer.keys
    kept = view.clone()
    got, cache = run_cached(tiny, ids, cache)
    assert torch.equal(got.logits, want)
    assert cache.get_seq_length() == 48 and layer.keys.data_ptr() == before  # written in place
    assert torch.equal(view, kept)  # an earlier view (the background store's) still reads the same KV
    # Past the room: the layer moves to buffers twice as large, contents kept.
    run_cached(tiny, torch.arange(9).reshape(1, -1), cache)
    assert cache.get_seq_length() == 57 and layer.keys.data_ptr() != before
    assert layer._kbuf.shape[2] == 2 * 56
    assert torch.equal(layer.keys[0, :, :40], kv[0, 0].transpose(0, 1))


@torch.inference_mode()
def test_a_cache_built_chunk_by_chunk_equals_one_built_at_once(tiny):
    kv = _kv(tiny, 64, seed=1)
    cache = reserved_cache(tiny, 64)
    for piece in kv.split(16, dim=2):
        append_kv(cache, piece)
    ids = torch.arange(3).reshape(1, -1)
    assert torch.equal(run_cached(tiny, ids, cache)[0].logits, run_cached(tiny, ids, _dynamic(tiny, kv))[0].logits)


@torch.inference_mode()
def test_after_a_crop_an_append_does_not_overwrite_an_earlier_view(tiny):
    cache = kv_to_cache(_kv(tiny, 32, seed=2), tiny, reserve=32)
    view = cache.layers[0].keys
    kept = view.clone()
    cache.crop(-8)
    assert cache.get_seq_length() == 24
    run_cached(tiny, torch.arange(4).reshape(1, -1), cache)
    assert cache.get_seq_length() == 28
    assert torch.equal(view, kept)


@torch.inference_mode()
def test_gqa_attention_gives_sdpa_logits_bit_for_bit_without_repeating_kv_heads(tiny, monkeypatch):
    assert tiny.config._attn_implementation == ATTENTION  # `load_model` switched it
    tiny.set_attn_implementation("sdpa")
    kv = _kv(tiny, 100, seed=3)
    ids = torch.arange(7, 20).reshape(1, -1)  # more than one token over a cache: a masked attention
    want = run_cached(tiny, ids, kv_to_cache(kv, tiny))[0].logits
    full = run_cached(tiny, torch.arange(50).reshape(1, -1))[0].logits
    use_gqa_attention(tiny)
    assert tiny.config._attn_implementation == ATTENTION
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got = run_cached(tiny, ids, kv_to_cache(kv, tiny))[0].logits
    assert torch.equal(got, want)
    assert calls and all(c == (8, 2, True) for c in calls)  # 8 query heads over the 2 KV heads as they are
    assert torch.equal(run_cached(tiny, torch.arange(50).reshape(1, -1))[0].logits, full)
