"""`blend(model, segments, config)`: the KV of a whole prompt from standalone cached segments, recomputing
a small share of the tokens (CacheBlend-style selective recompute, with exact masks).

Per layer l, with A the rows whose input hidden state is known (all rows at layer 0, except with ratio 0):
1. q, k, v of the rows in A (the model's own modules, `blend.model.LayerDriver`);
2. at and after the check layer, choose A' within A: the fresh rows (no cached KV, the question, the last
   row) always, and the reused rows the selection ranks first up to that layer's ratio (`blend.select`:
   by default each passage's first tokens, "leading"; or the highest KV deviation, fresh vs cached,
   "deviation", which the check layer measures for every reused row in any case); the check layer measures every reused row, the following layers narrow the choice
   (gradual filtering) down to `config.ratio`; optionally each passage's first `sink_tokens` first, and the
   deviation weighted by the question's attention at the check layer (`question_weight`);
3. write k, v of every row of A into the merged KV (they are exact: their inputs are), so that the
   KV of layer l is fresh for A and cached (re-rotated) for the rest;
4. attention of the rows A' over the merged KV of layer l with the exact causal mask, then the MLP:
   the input of layer l + 1 for A'.
Layers below the check layer run every row (they are what the check needs); ratio 1.0 runs every row at
every layer (= a full prefill); ratio 0.0 runs only the fresh rows (= plain concatenation of the cached
KV). The last row is always computed, so the returned logits are the model's own for that KV.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from blend.assemble import KVAssembler
from blend.errors import BlendInputError
from blend.model import LayerDriver
from blend.select import kv_deviation, leading_score, select
from blend.types import BlendConfig, BlendReport, BlendResult, Segment, SegmentFetch, as_ids
from kernels import RopeSpec, rope_from_config
from kernels.dispatch import KernelInputError


def _tokens(segments: Sequence[Segment] | SegmentFetch) -> list[torch.Tensor]:
    if isinstance(segments, SegmentFetch):
        toks = [as_ids(t) for t in segments.tokens]
        if any(t.numel() == 0 for t in toks):
            raise BlendInputError("a segment needs at least one token")
        return toks
    if isinstance(segments, (str, bytes)) or not hasattr(segments, "__iter__"):
        raise BlendInputError(f"segments must be a sequence of Segment or a SegmentFetch, got {type(segments).__name__}")
    segs = list(segments)
    for s in segs:
        if not isinstance(s, Segment):
            raise BlendInputError(f"segments must be Segment objects, got {type(s).__name__}")
    return [s.tokens for s in segs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def blend(model, segments: Sequence[Segment] | SegmentFetch, config: BlendConfig = BlendConfig(), *,
          driver: LayerDriver | None = None, rope: RopeSpec | None = None) -> BlendResult:
    """The prompt's KV `[L, 2, T, H, D]`, the last position's logits `[V]` and a report.

    `segments` in prompt order (the prompt's positions start at 0). `driver` / `rope` may be passed to
    reuse them across calls (they depend only on the model)."""
    if not isinstance(config, BlendConfig):
        raise BlendInputError(f"config must be a BlendConfig, got {type(config).__name__}")
    t_start = time.perf_counter()
    driver = driver or LayerDriver(model)
    toks = _tokens(segments)
    if not toks:
        raise BlendInputError("blend needs at least one segment")
    ids = torch.cat(toks)  # [T] int64
    total = ids.numel()
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise BlendInputError(f"token id {int(ids.max())} is outside the model's vocabulary ({vocab})")
    num_layers = driver.num_layers
    ratio = float(config.ratio)
    mode = "naive" if ratio == 0.0 else "full" if ratio == 1.0 else "select"
    check = config.check_layer
    if mode == "select" and check >= num_layers:
        raise BlendInputError(f"check_layer {check} must be below the model's {num_layers} layers")
    ratios = config.layer_ratios(num_layers)
    skip = range(num_layers) if mode == "full" else range(check) if mode == "select" else range(0)
    if rope is None and mode != "full":
        try:
            rope = rope_from_config(model.config)
        except KernelInputError as e:
            raise BlendInputError(f"cached keys of this model cannot be moved to new positions: {e}") from e
    shape = (num_layers, 2, total, driver.num_kv_heads, driver.head_dim)
    asm = KVAssembler(segments if isinstance(segments, SegmentFetch) else list(segments), shape, driver.dtype,
                      driver.device, rope if rope is not None else RopeSpec.default(driver.head_dim),
                      skip=skip, background=config.overlap)
    try:
        with torch.inference_mode():
            return _run(driver, asm, ids, config, mode, ratios, t_start)
    finally:
        asm.close()


def _question_attention(driver: LayerDriver, layer: int, q: torch.Tensor, k: torch.Tensor, fresh: torch.Tensor,
                        power: float) -> torch.Tensor | None:
    """[T] fp32 on the CPU: the attention of the question (the fresh rows after the last reused one) to each row
    at `layer`, raised to `power`; None when power is 0. q: [T, Hq, D], k: [T, H, D] of every row (the
    check layer computes every row)."""
    if not power:
        return None
    reused = (~fresh).nonzero()
    tail = int(reused[-1]) + 1 if reused.numel() else 0
    rows = torch.arange(tail, fresh.numel())  # [Nq], never empty: the last row is fresh
    att = driver.attention_to(layer, q[rows.to(q.device)], rows, k).cpu()  # [T]
    return att.clamp_min(1e-12) ** power


def _run(driver: LayerDriver, asm: KVAssembler, ids: torch.Tensor, config: BlendConfig, mode: str,
         ratios: list[float], t_start: float) -> BlendResult:
    dev = driver.device
    total = ids.numel()
    num_layers = driver.num_layers
    check = config.check_layer
    gen = torch.Generator().manual_seed(config.seed)
    all_rows = torch.arange(total)  # [T] int64 (CPU: indices are small and read on the host)
    hidden = driver.embed(ids)  # [T, E]
    cos_all, sin_all = driver.rope(all_rows, hidden)  # [T, 1, D] each

    fresh_mask: torch.Tensor | None = None  # [T] bool, known once the cached rows are

    def known_fresh() -> torch.Tensor:
        nonlocal fresh_mask
        if fresh_mask is None:
            fresh_mask = ~asm.hits() if mode != "full" else torch.ones(total, dtype=torch.bool)
            fresh_mask = fresh_mask.clone()
            fresh_mask[-1] = True  # the last row's logits must be the model's own
        return fresh_mask

    rows = all_rows  # A: rows whose input to the current layer is known, sorted
    if mode == "naive":
        rows = known_fresh().nonzero().squeeze(1)
        hidden = hidden[rows.to(dev)]
    deviation: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # [T] question attention ** question_weight, from the check layer
    sinks = torch.zeros(total, dtype=torch.bool)  # [T] reused rows always recomputed (a passage's first tokens)
    kv_fresh, computed, rows_per_layer, layer_s = [], [], [], []
    for layer in range(num_layers):
        t = time.perf_counter()
        rows_dev = rows.to(dev)
        q, k, v = driver.qkv(layer, hidden, cos_all[rows_dev], sin_all[rows_dev])  # [N, Hq|H, D]
        kv = asm.layer(layer)  # [2, T, H, D]: cached rows in place (skipped layers: zeros)
        keep: torch.Tensor | None = None  # local indices into rows, sorted
        if mode == "select" and layer >= check:
            fresh = known_fresh()[rows]  # [N] bool
            cand = (~fresh).nonzero().squeeze(1)  # [C] local indices of reused rows still computed
            n_reused = int((~known_fresh()).sum())
            count = round(ratios[layer] * n_reused)
            if layer == check or count < cand.numel():
                c_dev, c_rows = cand.to(dev), rows_dev[cand.to(dev)]
                dev_c = kv_deviation(k[c_dev], v[c_dev], kv[0, c_rows], kv[1, c_rows], config.deviation).cpu()  # [C]
                if layer == check:
                    deviation = torch.full((total,), float("nan"))
                    deviation[rows[cand]] = dev_c
                    weight = _question_attention(driver, layer, q, k, known_fresh(), config.question_weight)
                    sinks = (asm.offsets() < config.sink_tokens) & ~known_fresh()  # [T] bool
                if config.selection == "leading":
                    score = leading_score(asm.offsets()[rows[cand]], rows[cand])
                else:
                    score = dev_c if weight is None else dev_c * weight[rows[cand]]
                pick = select(config.selection, score, count, gen, sinks[rows[cand]])
                keep = torch.cat([cand[pick], fresh.nonzero().squeeze(1)]).sort().values
        if rows.numel() == total:
            kv[0].copy_(k)
            kv[1].copy_(v)
        else:
            kv[0].index_copy_(0, rows_dev, k)
            kv[1].index_copy_(0, rows_dev, v)
        kv_fresh.append(rows.numel())
        if keep is not None and keep.numel() < rows.numel():
            keep_dev = keep.to(dev)
            rows, rows_dev, hidden, q = rows[keep], rows_dev[keep_dev], hidden[keep_dev], q[keep_dev]
        hidden = driver.attend_mlp(layer, hidden, q, rows, kv)  # [N', E]
        computed.append(rows.numel())
        rows_per_layer.append(rows)
        _sync(dev)
        layer_s.append(time.perf_counter() - t)
    logits = driver.logits(hidden[-1:])[0]  # [V]: rows is sorted and holds the last row

    fresh = known_fresh()
    reused_mask = ~fresh
    report = BlendReport(
        num_tokens=total,
        reused=int(reused_mask.sum()),
        fresh=int(fresh.sum()),
        kv_fresh=kv_fresh,
        computed=computed,
        selected=[r[reused_mask[r]] for r in rows_per_layer],
        fresh_rows=fresh.nonzero().squeeze(1),
        deviation=deviation,
        recomputed=list(asm.recomputed),
        layer_seconds=layer_s,
        load_wait_seconds=asm.wait_seconds,
        total_seconds=time.perf_counter() - t_start,
    )
    return BlendResult(asm.buffer, logits, report)
