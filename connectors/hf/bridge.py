"""Hugging Face transformers bridge primitives: a model's KV in the store's chunk layout, its fingerprint.

- `kv_layout(model)`: the `KVLayout` of a Llama-family causal LM.
- `model_fingerprint(model)`: architecture, dtype and a digest of every weight, so KV of another model,
  dtype or version can never match.
- `prefill_kv(model, input_ids)`: run a prefill and return its KV as `[L, 2, T, H, D]` (post-RoPE keys).
- `kv_from_layers(layers, row=, start=, end=)`: a transformers cache's per-layer keys and values
  `[B, H, T, D]` -> the store's `[L, 2, T, H, D]` (the one conversion; `cache_to_kv` is it over a whole
  batch-1 cache); `kv_to_cache(kv, model)`: the way back (a copy).
- `reserved_cache(model, capacity)` / `append_kv(cache, kv)`: a transformers cache whose layers
  (`ReservedLayer`) append in place, and the store's KV appended to it (what a load builds chunk by chunk).
- `Prefill`: a prefilled prompt (its cache, last logits, time and report), what the HF connector and the
  RAG API both return.
- `run_cached(model, input_ids, cache, **kw)`: a forward that extends a transformers cache, under whichever
  name the installed transformers gives the cache argument (`past_key_values` before 5.2x, `cache` after).
- `compute_chunks(model, token_ids, fingerprint=.., kind=..)`: prefill a context and cut its KV into the
  store's keyed chunks (prefix chunks of a prompt, or standalone chunks of a passage for blend).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np
import torch
import xxhash
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvstore.chunk import Chunk, KVLayout
from kvstore.keys import DEFAULT_NAMESPACE, ChunkKind, chunk_refs

DECODE_RESERVE = 256  # room for decoded tokens in a prompt's cache before an append moves it (then it doubles)


def kv_layout(model) -> KVLayout:
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return KVLayout(cfg.num_hidden_layers, kv_heads, head_dim, model.dtype)


def model_fingerprint(model) -> str:
    """`<model_type>-<dtype>-<16 hex digits>` over the config and every parameter's bytes."""
    h = xxhash.xxh3_128()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            t = t.detach().to("cpu").contiguous()
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    dtype = str(model.dtype).removeprefix("torch.")
    return f"{cfg.get('model_type', 'model')}-{dtype}-{h.hexdigest()[:16]}"


@functools.lru_cache(maxsize=None)
def _cache_arg(model_class: type) -> str:
    """The forward's name for the KV cache: transformers renamed `past_key_values` to `cache` (5.2x) and
    warns on the old name; vLLM pins a release from before the rename, so both are served."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def run_cached(model, input_ids: torch.Tensor, cache=None, **kwargs):
    """`model(input_ids, <cache>=cache, use_cache=True, **kwargs)` -> (output, the extended cache).
    input_ids: [B, T]; `cache` is a transformers Cache or None (a fresh one is made)."""
    name = _cache_arg(type(model))
    out = model(input_ids, use_cache=True, **{name: cache}, **kwargs)
    return out, getattr(out, name)


def cache_layers(cache, num_layers: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) tensors [B, H, T, D] of a transformers cache's first `num_layers` layers."""
    return [(layer.keys, layer.values) for layer in cache.layers[:num_layers]]


def kv_from_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], *, row: int = 0, start: int = 0,
                   end: int | None = None) -> torch.Tensor:
    """Per-layer (keys, values) [B, H, T, D] -> KV [L, 2, end - start, H, D] of batch row `row` (a copy)."""
    # [H, T', D] -> [T', H, D] per layer and K/V, stacked layer-major
    return torch.stack([torch.stack([k[row, :, start:end].transpose(0, 1), v[row, :, start:end].transpose(0, 1)])
                        for k, v in layers]).contiguous()


def cache_to_kv(cache, num_layers: int | None = None) -> torch.Tensor:
    """A transformers cache (batch 1) -> `[L, 2, T, H, D]`."""
    return kv_from_layers(cache_layers(cache, num_layers))


@torch.inference_mode()
def prefill_kv(model, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids: [T] -> KV [L, 2, T, H, D] of a full prefill."""
    # Only the KV is wanted: skip the [T, vocab] logits of every position but the last.
    _, cache = run_cached(model, input_ids.reshape(1, -1).to(model.device), logits_to_keep=1)
    return cache_to_kv(cache, model.config.num_hidden_layers)


@dataclass(slots=True)
class Prefill:
    """A prefilled prompt: what `HFConnector.prefill` and `RagPipeline.prefill` return."""

    ids: torch.Tensor  # [T] int64, the prompt
    cache: DynamicCache  # the prompt's KV (batch 1); decoding from `logits` extends it
    logits: torch.Tensor  # [V] at the prompt's last position
    seconds: float  # time to these logits
    report: object  # `LoadReport` (HFConnector); `BlendReport`, or None for a full prefill (RAG)

    @property
    def kv(self) -> torch.Tensor:
        """The cache's KV as `[L, 2, T, H, D]` (a copy)."""
        return cache_to_kv(self.cache)


class ReservedLayer(DynamicLayer):
    """A transformers `DynamicLayer` whose keys and values are views of buffers with room to grow: an append
    writes in place. `DynamicLayer` concatenates instead, copying the whole layer at every append: the first
    tokens after a 4K-token load (~190 MB of SmolLM2's fp32 KV copied again) and every decoded token.

    Appends never write below the current length, so a view taken earlier (the connector's background
    store reads the prompt's KV through `cache_layers`) keeps its contents; a crop or a batch reshuffle
    makes the next append move to new buffers for the same reason. Room doubles when it runs out.
    Each layer has its own buffers, allocated at its first append: one block for all layers (one copy per
    chunk instead of one per layer) measured 10-25% slower TTFT, its ~200 MB fresh pages faulted in at every
    load where per-layer buffers of a few MB are reused by the allocator."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(1, capacity)
        self._length = 0
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._kbuf = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[3])
        self._vbuf = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[3])
        self._length = 0
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self._kbuf[:, :, : self._length]
        self.values = self._vbuf[:, :, : self._length]

    def _move(self, capacity: int) -> None:
        kbuf = self._kbuf.new_empty(*self._kbuf.shape[:2], capacity, self._kbuf.shape[3])
        vbuf = self._vbuf.new_empty(*self._vbuf.shape[:2], capacity, self._vbuf.shape[3])
        kbuf[:, :, : self._length] = self.keys
        vbuf[:, :, : self._length] = self.values
        self._kbuf, self._vbuf = kbuf, vbuf

    def _adopt(self) -> None:
        """Take `keys` / `values` as set by a `DynamicLayer` method as full buffers (the next append moves)."""
        self._kbuf, self._vbuf, self._length = self.keys, self.values, self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + key_states.shape[-2]
        if end > self._kbuf.shape[-2]:
            self._move(max(end, 2 * self._kbuf.shape[-2]))
        self._kbuf[:, :, self._length : end] = key_states
        self._vbuf[:, :, self._length : end] = value_states
        self._length = end
        self._views()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized:
            self._adopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.is_initialized:
            self._adopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.is_initialized:
            self._adopt()


def reserved_cache(model, capacity: int) -> DynamicCache:
    """An empty transformers `DynamicCache` whose full-attention layers are `ReservedLayer`s with room for
    `capacity` tokens (a sliding-window layer keeps its own kind)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def append_kv(cache: DynamicCache, kv: torch.Tensor) -> None:
    """Append KV `[L, 2, T, H, D]` (batch 1) to every layer of `cache` (one copy, into the cache's layout)."""
    for i in range(kv.shape[0]):
        # [T, H, D] -> [B=1, H, T, D]
        cache.update(kv[i, 0].transpose(0, 1).unsqueeze(0), kv[i, 1].transpose(0, 1).unsqueeze(0), i)


def kv_to_cache(kv: torch.Tensor, model, reserve: int = DECODE_RESERVE) -> DynamicCache:
    """KV `[L, 2, T, H, D]` -> a transformers `DynamicCache` (batch 1) holding a copy of it, with room for
    `reserve` more tokens before an append moves the cache (`reserved_cache`)."""
    cache = reserved_cache(model, kv.shape[2] + reserve)
    append_kv(cache, kv)
    return cache


def compute_chunks(
    model,
    token_ids,
    *,
    fingerprint: str,
    namespace: str = DEFAULT_NAMESPACE,
    chunk_tokens: int = 256,
    kind: ChunkKind = ChunkKind.PREFIX,
    include_partial: bool = False,
) -> list[Chunk]:
    """Prefill `token_ids` (a whole prompt, or one passage for `ChunkKind.STANDALONE`) from position 0
    and return its KV cut into keyed chunks: full chunks only unless `include_partial`."""
    refs = chunk_refs(token_ids, namespace=namespace, fingerprint=fingerprint, chunk_tokens=chunk_tokens,
                      kind=kind, include_partial=include_partial)
    if not refs:
        return []
    ids = torch.from_numpy(np.concatenate([r.tokens for r in refs]).astype(np.int64))  # [T], T = refs[-1].end
    kv = prefill_kv(model, ids)  # [L, 2, T, H, D]
    return [Chunk.from_ref(r, kv[:, :, r.start:r.end].contiguous()) for r in refs]


@torch.inference_mode()
def decode_greedy(model, cache, last_logits: torch.Tensor, max_new_tokens: int,
                  eos_token_id: int | Collection[int] | None = None) -> list[int]:
    """Greedy decoding from a prefilled `cache` whose last position produced `last_logits` [V].

    Returns the new token ids, stopping after any of `eos_token_id` (one id or several) when given.
    Extends `cache` in place (it ends holding every position but the last new token's)."""
    stop = _stop_set(eos_token_id)
    out: list[int] = []
    logits = last_logits
    for step in range(max_new_tokens):
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        if nxt in stop or step == max_new_tokens - 1:
            break
        res, cache = run_cached(model, torch.tensor([[nxt]], device=model.device), cache)
        logits = res.logits[0, -1]
    return out


def _stop_set(eos_token_id: int | Collection[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset((eos_token_id,))
    return frozenset(int(t) for t in eos_token_id)
