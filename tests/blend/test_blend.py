"""blend() against real transformers models: the shipped model and small random Llama (llama3 RoPE),
Mistral (linear RoPE, sliding window) and Qwen2 (q/k/v biases) models, all with grouped-query attention."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from blend import BlendConfig, BlendInputError, BlendModelError, Segment, blend
from connectors.hf import cache_to_kv, kv_to_cache, run_cached
from kernels import rerotate_keys, rope_from_config


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.dim() == 5 and a.shape[2] > b.shape[2]:  # a sliding-window cache keeps only the last rows
        a = a[:, :, a.shape[2] - b.shape[2] :]
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _full(model, segs):
    ids = torch.cat([s.tokens for s in segs])
    with torch.inference_mode():
        out, cache = run_cached(model, ids[None])
    return ids, out.logits[0, -1], cache_to_kv(cache, model.config.num_hidden_layers)


@torch.inference_mode()
def _naive(model, segs):
    """Plain concatenation with transformers itself: cached KV re-rotated into a DynamicCache, fresh
    segments run on top of it. Returns (last logits [V], KV [L, 2, T, H, D])."""
    rope = rope_from_config(model.config)
    cache = DynamicCache(config=model.config)
    pos = 0
    logits = None
    for s in segs:
        n = s.tokens.numel()
        if s.kv is not None:
            old = torch.arange(s.start_pos, s.start_pos + n)
            new = torch.arange(pos, pos + n)
            for layer in range(s.kv.shape[0]):
                k = rerotate_keys(s.kv[layer, 0][None], old, new, rope)[0]  # [T, H, D]
                cache.update(k.transpose(0, 1)[None], s.kv[layer, 1].transpose(0, 1)[None], layer)
        else:
            out, cache = run_cached(model, s.tokens[None], cache, position_ids=torch.arange(pos, pos + n)[None])
            logits = out.logits[0, -1]
        pos += n
    return logits, cache_to_kv(cache, model.config.num_hidden_layers)


def _shipped_segments(shipped, make_segments, n_passages=3, order=None):
    from benchmarks.models.evalset import load_rag

    model, tok = shipped
    ex = load_rag()[1]
    enc = lambda s: torch.tensor(tok(s, add_special_tokens=False)["input_ids"])
    passages = [enc(p) for p in ex.passages[:n_passages]]
    if order is not None:
        passages = [passages[i] for i in order]
    return make_segments(model, passages, enc(ex.prompt_tail), enc("\n\n"))


@pytest.mark.parametrize("kind", ["shipped", "llama", "mistral", "qwen2"])
def test_ratio_one_reproduces_full_prefill(kind, shipped, small_models, make_segments, make_prompt):
    if kind == "shipped":
        model = shipped[0]
        segs = _shipped_segments(shipped, make_segments)
    else:
        model = small_models[kind]
        passages, q = make_prompt(model.config.vocab_size, [40, 23, 31], 9, seed=5)
        segs = make_segments(model, passages, q)
    _, logits, kv = _full(model, segs)
    res = blend(model, segs, BlendConfig(ratio=1.0))
    assert _rel(res.logits, logits) <= 1e-4
    assert _rel(res.kv, kv) <= 1e-4
    assert res.report.computed == [res.kv.shape[2]] * model.config.num_hidden_layers


@pytest.mark.parametrize("kind", ["shipped", "llama", "mistral", "qwen2"])
def test_ratio_zero_equals_naive_concatenation(kind, shipped, small_models, make_segments, make_prompt):
    if kind == "shipped":
        model = shipped[0]
        segs = _shipped_segments(shipped, make_segments)
    else:
        model = small_models[kind]
        passages, q = make_prompt(model.config.vocab_size, [40, 23, 31], 9, seed=6)
        sep = torch.tensor([3, 4])
        segs = make_segments(model, passages, q, sep)
    logits, kv = _naive(model, segs)
    res = blend(model, segs, BlendConfig(ratio=0.0))
    assert _rel(res.logits, logits) <= 1e-4
    assert _rel(res.kv, kv) <= 1e-4
    fresh = sum(s.tokens.numel() for s in segs if s.kv is None)
    assert res.report.fresh == fresh and res.report.computed == [fresh] * model.config.num_hidden_layers
    # Naive reuse is not full prefill: the cached rows miss the attention between passages.
    assert _rel(res.logits, _full(model, segs)[1]) > 1e-3


def test_selected_rows_are_the_highest_deviation_ones(shipped, make_segments):
    model = shipped[0]
    segs = _shipped_segments(shipped, make_segments)
    res = blend(model, segs, BlendConfig(ratio=0.2, check_layer=1, deviation="kv", selection="deviation"))
    rep = res.report
    reused = torch.cat([torch.full((s.tokens.numel(),), s.kv is not None) for s in segs])
    reused[-1] = False
    dev = rep.deviation
    assert torch.isnan(dev[~reused]).all() and not torch.isnan(dev[reused]).any()
    # Independent reference: layers 0..check-1 are computed for every row, so the fresh KV at the check
    # layer is the full prefill's; the cached KV is each passage's own, re-rotated to its place.
    _, _, full_kv = _full(model, segs)
    rope = rope_from_config(model.config)
    pos, cached = 0, []
    for s in segs:
        n = s.tokens.numel()
        if s.kv is not None:
            k = rerotate_keys(s.kv[1, 0][None], torch.arange(n), torch.arange(pos, pos + n), rope)[0]
            cached.append((pos, k, s.kv[1, 1]))
        pos += n
    ref = torch.full_like(dev, float("nan"))
    for p, k, v in cached:
        n = k.shape[0]
        dk = (full_kv[1, 0, p : p + n] - k).square().sum((1, 2))
        dv = (full_kv[1, 1, p : p + n] - v).square().sum((1, 2))
        ref[p : p + n] = (dk + dv).sqrt()
    ref[~reused] = float("nan")
    assert torch.allclose(dev[reused], ref[reused], rtol=1e-3, atol=1e-4)
    chosen = rep.selected[1]
    n_reused = int(reused.sum())
    assert chosen.numel() == round(0.2 * n_reused)
    not_chosen = torch.ones_like(reused)
    not_chosen[chosen] = False
    not_chosen &= reused
    assert reused[chosen].all()
    assert dev[chosen].min() >= dev[not_chosen].max()
    # Below the check layer every row is computed; after it only the selection and the fresh rows.
    assert rep.computed[0] == res.kv.shape[2]
    assert rep.computed[1:] == [chosen.numel() + rep.fresh] * 3


def test_question_rows_are_always_computed(shipped, make_segments):
    model = shipped[0]
    segs = _shipped_segments(shipped, make_segments)
    q_len = segs[-1].tokens.numel()
    total = sum(s.tokens.numel() for s in segs)
    res = blend(model, segs, BlendConfig(ratio=0.05))
    q_rows = torch.arange(total - q_len, total)
    assert torch.isin(q_rows, res.report.fresh_rows).all()
    for layer in range(4):
        assert res.report.computed[layer] == res.report.selected[layer].numel() + res.report.fresh
    # The question's KV and the logits are what the model itself computes over the blended KV before it.
    cache = kv_to_cache(res.kv[:, :, : total - q_len].clone(), model)
    with torch.inference_mode():
        out, cache = run_cached(model, segs[-1].tokens[None], cache, position_ids=q_rows[None])
    kv_q = cache_to_kv(cache, 4)[:, :, total - q_len :]
    assert _rel(res.kv[:, :, total - q_len :], kv_q) <= 1e-4
    assert _rel(res.logits, out.logits[0, -1]) <= 1e-4


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_chunk_order_permutations(order, shipped, make_segments):
    model = shipped[0]
    segs = _shipped_segments(shipped, make_segments, order=list(order))
    _, logits, full_kv = _full(model, segs)
    exact = blend(model, segs, BlendConfig(ratio=1.0))
    assert _rel(exact.logits, logits) <= 1e-4
    naive = blend(model, segs, BlendConfig(ratio=0.0))
    # Layer 0's KV depends only on each token and its position: re-rotated cached keys must equal it.
    assert _rel(naive.kv[0], full_kv[0]) <= 1e-4
    mid = blend(model, segs, BlendConfig(ratio=0.3))
    # Layers 0..check are computed for every row: exact at any order.
    assert _rel(mid.kv[:2], full_kv[:2]) <= 1e-4
    assert torch.isfinite(mid.logits).all()


def test_overlap_and_inline_assembly_agree(shipped, make_segments):
    model = shipped[0]
    segs = _shipped_segments(shipped, make_segments)
    a = blend(model, segs, BlendConfig(ratio=0.15, overlap=True))
    b = blend(model, segs, BlendConfig(ratio=0.15, overlap=False))
    assert torch.equal(a.kv, b.kv) and torch.equal(a.logits, b.logits)


def test_gradual_filtering_narrows_nested_selections(shipped, make_segments):
    model = shipped[0]
    segs = _shipped_segments(shipped, make_segments)
    res = blend(model, segs, BlendConfig(ratio=0.1, widen=3.0, filter_layers=2))
    sel = res.report.selected
    n_reused = res.report.reused
    assert [s.numel() for s in sel[1:]] == [round(0.3 * n_reused), round(0.2 * n_reused), round(0.1 * n_reused)]
    for a, b in zip(sel[1:], sel[2:]):
        assert torch.isin(b, a).all()
    # Rows dropped at a layer still got fresh KV there (their input was exact).
    assert res.report.kv_fresh[2] == sel[1].numel() + res.report.fresh


def test_random_selection_is_a_different_choice(shipped, make_segments):
    model = shipped[0]
    segs = _shipped_segments(shipped, make_segments)
    dev = blend(model, segs, BlendConfig(ratio=0.15, selection="deviation"))
    rnd = blend(model, segs, BlendConfig(ratio=0.15, selection="random", seed=1))
    assert rnd.report.selected[1].numel() == dev.report.selected[1].numel()
    assert not torch.equal(rnd.report.selected[1], dev.report.selected[1])


def test_bad_input_raises_typed_errors(shipped, make_segments, small_models):
    model = shipped[0]
    segs = _shipped_segments(shipped, make_segments)
    for bad in (dict(ratio=1.5), dict(ratio=-0.1), dict(check_layer=-1), dict(widen=0.5),
                dict(deviation="q"), dict(selection="best")):
        with pytest.raises(BlendInputError):
            BlendConfig(**bad)
    with pytest.raises(BlendInputError, match="check_layer"):
        blend(model, segs, BlendConfig(ratio=0.5, check_layer=4))
    with pytest.raises(BlendInputError, match="does not fit"):
        blend(model, [Segment.cached(segs[0].tokens, segs[0].kv[:, :, :, :1]), segs[-1]], BlendConfig(ratio=0.0))
    with pytest.raises(BlendInputError, match="vocabulary"):
        blend(model, [Segment.fresh([5, 99999])])
    with pytest.raises(BlendInputError):
        blend(model, [])
    with pytest.raises(BlendInputError):
        Segment.fresh([])
    with pytest.raises(BlendInputError):
        Segment.cached([1, 2, 3], torch.zeros(4, 2, 2, 2, 32))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(BlendModelError):
        blend(gpt2, [Segment.fresh([1, 2])])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ratio_one_reproduces_full_prefill_cuda(small_models, make_segments, make_prompt):
    """CUDA twin of test_ratio_one_reproduces_full_prefill (the CPU twin runs everywhere)."""
    model = small_models["llama"].to("cuda")
    try:
        passages, q = make_prompt(model.config.vocab_size, [40, 23, 31], 9, seed=5)
        segs = make_segments(model, [p.cuda() for p in passages], q)
        ids = torch.cat([s.tokens for s in segs]).cuda()
        with torch.inference_mode():
            ref = model(ids[None]).logits[0, -1]
        for ratio in (1.0, 0.15):
            res = blend(model, segs, BlendConfig(ratio=ratio))
            assert res.kv.device.type == "cuda"
            if ratio == 1.0:
                assert _rel(res.logits, ref) <= 1e-4
    finally:
        model.to("cpu")
