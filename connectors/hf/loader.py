"""Prefix context loading for a transformers causal LM: `HFConnector`.

For a prompt, `HFConnector.prefill`:
1. keys the prompt's full chunks (the last token always stays to compute, so there are logits to start
   decoding from) and asks the store how many leading chunks it holds (`lookup`);
2. loads those chunks (batch `get`; a chunk from a byte tier is decoded with the codec its record names)
   and builds a transformers cache from them; a chunk that fails to load (corrupt record, a tier that
   raises) ends the reused prefix there: the rest is recomputed, never an error;
3. prefills the remaining tokens against that cache;
4. hands the prompt's new full chunks to a `BoundedWriter` (off the time-to-first-token path).
With `[adaptive]` configured (`store.adaptive`) and level copies stored for the prompt's leading chunks,
steps 1-2 become an adaptive load (`kvstore.adaptive`): the planner picks per chunk the level to fetch,
or to recompute it (leading chunks, prefilled while the others are in transit), from the measured
bandwidth, decode and prefill speeds, and re-plans as chunks arrive; `LoadReport.adaptive` holds its
decisions. Chunks the first tier (decoded KV in memory) holds take the ordinary path. New chunks are
then also stored at every configured level, and every prefill of at least a chunk is measured.
`generate` decodes greedily from there and also stores the chunks the generated tokens complete, so a
chat's next turn reuses its previous turns. Every call returns a `LoadReport`: tokens reused and from
which tier, tokens computed, and the time of each step.

Invariants: KV is only reused under the model's fingerprint (config, dtype and every weight), with the
token ids checked on every hit; with a lossless tier codec, generation equals `model.generate` token
for token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Collection

import numpy as np
import torch

from connectors.hf.attention import use_gqa_attention
from connectors.hf.bridge import (
    DECODE_RESERVE,
    Prefill,
    append_kv,
    cache_layers,
    decode_greedy,
    kv_from_layers,
    kv_layout,
    model_fingerprint,
    reserved_cache,
    run_cached,
)
from kvstore.adaptive import AdaptiveReport, adaptive_candidates
from kvstore.chunk import Chunk
from kvstore.errors import InvalidTokensError
from kvstore.keys import DEFAULT_NAMESPACE, ChunkRef, as_token_array
from kvstore.store import TieredStore
from kvstore.writer import BoundedWriter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadReport:
    """What one prefill did. Times in seconds; `ttft_s` = lookup + load + prefill of the rest."""

    prompt_tokens: int
    reused_tokens: int = 0
    computed_tokens: int = 0
    tokens_by_tier: dict[str, int] = field(default_factory=dict)  # tier name -> reused tokens from it
    lookup_s: float = 0.0
    load_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    stored_chunks: int = 0  # new chunks handed to the store's writer by this request
    fallback: str | None = None  # why stored KV that the lookup found was not all used
    adaptive: AdaptiveReport | None = None  # an adaptive load's decisions (None: the ordinary path)


@dataclass(slots=True)
class Generation:
    tokens: list[int]  # the new token ids
    report: LoadReport
    decode_s: float


class HFConnector:
    """Reuses stored KV of prompt prefixes for one transformers causal LM (Llama family), batch 1.

    `fingerprint` defaults to `model_fingerprint(model)`; `store_new=False` makes it read-only.
    """

    def __init__(self, model, store: TieredStore, *, namespace: str | None = None, fingerprint: str | None = None,
                 store_new: bool = True) -> None:
        self.model = model
        use_gqa_attention(model)  # the same results; a grouped-query model's KV heads are not copied per query head
        self.store = store
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.fingerprint = fingerprint or model_fingerprint(model)
        self.store_new = store_new
        self.chunk_tokens = store.chunk_tokens
        # Cutting new chunks out of the cache and storing them runs off the time-to-first-token path, with
        # the store's own bound on bytes in flight.
        self._writer = BoundedWriter("kvstore-hf-store", max_pending_bytes=store.max_pending_bytes)
        self.store_failures = 0

    # -- prefill -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids) -> Prefill:
        """Prefill `input_ids` ([T] token ids, T >= 1), reusing the longest stored chunk-aligned prefix."""
        ids = self._token_array(input_ids)
        report = LoadReport(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        # Leave at least one token to compute: the logits of the last position start the decoding.
        refs = self.store.chunk_refs(ids[: len(ids) - 1], fingerprint=self.fingerprint, namespace=self.namespace)
        prompt = torch.from_numpy(ids.astype(np.int64))  # [T]
        available = adaptive_candidates(self.store, refs)
        n_hit = 0 if available else (self.store.lookup_refs(refs) if refs else 0)
        t1 = time.perf_counter()
        report.lookup_s = t1 - t0

        # The loaded KV goes chunk by chunk into a cache with room for the whole prompt and the first decoded
        # tokens: no copy of the loaded KV after it arrives, and the rest of the prompt appends in place.
        cache = reserved_cache(self.model, len(ids) + DECODE_RESERVE)
        if available:
            n_hit, reused = self._load_adaptive(prompt, refs, available, report, cache)
        elif n_hit:
            n_hit, report.tokens_by_tier, report.fallback = self._load(refs[:n_hit], cache)
        t2 = time.perf_counter()
        report.load_s = t2 - t1

        done = n_hit * self.chunk_tokens  # positions whose KV is in `cache`, loaded or recomputed
        rest = prompt[done:].reshape(1, -1).to(self.model.device)
        out, cache = run_cached(self.model, rest, cache, logits_to_keep=1)  # only the last position's logits
        logits = out.logits[0, -1]
        t3 = time.perf_counter()
        report.prefill_s = t3 - t2
        report.ttft_s = t3 - t0
        report.reused_tokens = reused if available else done
        report.computed_tokens = len(ids) - report.reused_tokens
        if self.store.adaptive is not None and rest.shape[1] >= self.chunk_tokens:
            self.store.adaptive.observe_prefill(rest.shape[1], report.prefill_s)

        report.stored_chunks = self._store_async(ids, cache, first_chunk=n_hit)
        return Prefill(prompt, cache, logits, report.ttft_s, report)

    def _load_adaptive(self, prompt: torch.Tensor, refs: list[ChunkRef], available: list[frozenset[str]],
                       report: LoadReport, cache) -> tuple[int, int]:
        """An adaptive load of the chunks `available` covers, appended to `cache`: (n, reused tokens), n
        counting the recomputed leading chunks and the fetched ones; the rest is recomputed by the caller
        with the prompt."""
        adaptive, c = self.store.adaptive, self.chunk_tokens
        layout = kv_layout(self.model)
        kv_bytes = layout.nbytes(c)
        plan = adaptive.plan(available, chunk_tokens=c, kv_bytes=kv_bytes, element_bytes=layout.dtype.itemsize)
        stream = adaptive.stream(refs, available, plan, chunk_tokens=c, kv_bytes=kv_bytes)
        fetched = 0
        try:
            if plan.head:  # prefilled from the tokens while the fetcher's first transfers are in flight
                t = time.perf_counter()
                run_cached(self.model, prompt[: plan.head * c].reshape(1, -1).to(self.model.device), cache,
                           logits_to_keep=1)
                adaptive.observe_prefill(plan.head * c, time.perf_counter() - t)
            for i, chunk in stream:
                if chunk is None or chunk.kv.dtype != self.model.dtype:
                    report.fallback = f"chunk {i} could not be loaded at its level; recomputed from token {i * c}"
                    break
                append_kv(cache, chunk.kv.to(self.model.device, non_blocking=True))
                fetched += 1
        finally:
            report.adaptive = stream.report()
        if fetched:
            report.tokens_by_tier = {adaptive.tier.name: fetched * c}
        return plan.head + fetched, fetched * c

    def _load(self, refs: list[ChunkRef], cache) -> tuple[int, dict[str, int], str | None]:
        """Leading chunks of `refs` appended to `cache`: (n, tokens by tier, fallback); stops at the first
        failure."""
        sources: list[str | None] = [None] * len(refs)
        try:
            chunks = self.store.get(refs, sources=sources)
        except Exception as e:  # the store degrades per tier; anything left is still only a miss here
            log.warning("loading %d chunks failed, recomputing them: %s", len(refs), e)
            return 0, {}, f"load failed ({type(e).__name__}: {e})"
        n = 0
        fallback = None
        for c in chunks:
            if c is None or c.kv.dtype != self.model.dtype:
                fallback = (f"chunk {n} could not be loaded (missing, corrupt or from a failing tier); "
                            f"recomputed from token {n * self.chunk_tokens}")
                break
            n += 1
        by_tier: dict[str, int] = {}
        for s in sources[:n]:  # set for every chunk the store returned
            by_tier[s] = by_tier.get(s, 0) + self.chunk_tokens
        device = self.model.device
        for c in chunks[:n]:
            append_kv(cache, c.kv.to(device, non_blocking=True))
        return n, by_tier, fallback

    # -- generate ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int = 32, eos_token_id: int | Collection[int] | None = None) -> Generation:
        """Greedy generation after `prefill`; the chunks completed by the new tokens are stored too."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self._token_array(input_ids)
        pre = self.prefill(ids)
        t = time.perf_counter()
        new = decode_greedy(self.model, pre.cache, pre.logits, max_new_tokens, eos_token_id)
        decode_s = time.perf_counter() - t
        if len(new) > 1:
            # The cache now holds the prompt and every new token but the last.
            seq = np.concatenate([ids, np.asarray(new[:-1], dtype=np.uint32)])
            pre.report.stored_chunks += self._store_async(seq, pre.cache, first_chunk=len(ids) // self.chunk_tokens)
        return Generation(new, pre.report, decode_s)

    # -- storing -------------------------------------------------------------------------------------

    def _store_async(self, ids: np.ndarray, cache, first_chunk: int) -> int:
        """Queue the full chunks of `ids` from index `first_chunk` on; their KV is read from `cache`."""
        if not self.store_new:
            return 0
        n_full = len(ids) // self.chunk_tokens
        if n_full <= first_chunk:
            return 0
        # The cache's layer tensors are replaced (not written) as decoding appends, so these references
        # stay valid while the writer reads them.
        layers = cache_layers(cache)  # each [1, H, T, D]
        if any(k.shape[2] < n_full * self.chunk_tokens for k, _ in layers):
            # A sliding-window cache keeps only its window: there is no full-context KV to store.
            log.warning("the model's cache holds fewer positions than the prompt (sliding window?); not storing")
            return 0
        ids = ids[: n_full * self.chunk_tokens].copy()
        per_token = sum(2 * k.shape[1] * k.shape[3] * k.element_size() for k, _ in layers)
        nbytes = (n_full - first_chunk) * self.chunk_tokens * per_token
        self._writer.submit(lambda: self._store(ids, layers, first_chunk), nbytes)
        return n_full - first_chunk

    def _store(self, ids: np.ndarray, layers: list[tuple[torch.Tensor, torch.Tensor]], first_chunk: int) -> None:
        try:
            refs = self.store.chunk_refs(ids, fingerprint=self.fingerprint, namespace=self.namespace)[first_chunk:]
            chunks = [Chunk.from_ref(r, kv_from_layers(layers, start=r.start, end=r.end).to("cpu")) for r in refs]
            self.store.put(chunks)
            if self.store.adaptive is not None:
                self.store.adaptive.store_levels(chunks)
        except Exception as e:  # storing is best effort: the answer is already out
            self.store_failures += 1
            log.warning("storing %d new chunks failed: %s", len(ids) // self.chunk_tokens - first_chunk, e)

    def wait_stored(self, timeout: float | None = None) -> bool:
        """Wait until this connector's queued chunks are in the store's first tier (and, through
        `store.flush`, in the slower tiers). False if `timeout` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._writer.flush(timeout):
            return False
        return self.store.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.wait_stored()
        self._writer.close()

    def __enter__(self) -> "HFConnector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _token_array(self, input_ids) -> np.ndarray:
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]  # transformers' [1, T]
        ids = as_token_array(input_ids)
        if len(ids) == 0:
            raise InvalidTokensError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if int(ids.max()) >= vocab:
            raise InvalidTokensError(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}")
        return ids
