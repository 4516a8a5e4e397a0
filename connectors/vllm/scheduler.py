"""Scheduler-side logic of the connector: which prompt tokens are stored, and what each step loads and saves.

Pure bookkeeping over vLLM's request and scheduler-output objects (duck-typed, so the unit tests build
their own): no store, no tensors. `SchedulerSide` is driven by the facade's hooks:

- `matched(request, num_computed)`: stored tokens beyond vLLM's local hit `num_computed` (block-aligned,
  not necessarily chunk-aligned). The prompt's full chunks are keyed (namespace, fingerprint, chained
  content hash; LoRA and `cache_salt` salt the hash) and looked up once per admission (memoized: vLLM
  may ask several times, and the answer must not change); the hit is capped at `num_tokens - 1` so
  that vLLM computes at least one token. Multimodal, prompt-embedding and pooling requests never match.
- `admitted(request, num_external)`: vLLM allocated blocks; a positive `num_external` becomes a load
  in the next plan.
- `plan(scheduler_output)`: per request scheduled this step, the chunks to load (from vLLM's local hit
  to the end of the external hit; whole blocks, see `plan.ChunkMove`) and the prompt chunks whose last
  token is computed in this step (chunked prefill: a chunk is saved in the step that completes it; a
  chunk just loaded is not saved again; after preemption or a failed load, vLLM lowers
  `num_computed_tokens` and the chunks computed again are saved again).
- `finished(request_id)`: forget the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from kvstore.keys import ChunkRef, chunk_refs
from connectors.vllm.plan import ChunkMove, RequestLoad, RequestSave, StepPlan

Lookup = Callable[[list[ChunkRef]], int]  # refs -> how many leading ones are stored


@dataclass(slots=True)
class LookupStats:
    lookups: int = 0
    lookup_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # tokens vLLM was told are stored
    lookup_seconds: float = 0.0

    def take(self) -> dict[str, float]:
        out = {"lookups": self.lookups, "lookup_tokens": self.lookup_tokens, "hit_tokens": self.hit_tokens,
               "lookup_seconds": self.lookup_seconds}
        self.lookups = self.lookup_tokens = self.hit_tokens = 0
        self.lookup_seconds = 0.0
        return out


@dataclass(slots=True)
class _Lookup:
    refs: list[ChunkRef] | None  # None: the request is not eligible
    hit_chunks: int


@dataclass(slots=True)
class _Request:
    refs: list[ChunkRef] | None
    block_ids: list[int] = field(default_factory=list)
    skip_chunks: int = 0  # chunks loaded by this admission: not saved again
    expected: int = 0  # num_computed_tokens the next step should report (less: vLLM went back)
    pending_load: int = 0  # external tokens to load in the next plan


def _salt(request) -> bytes:
    parts = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(f"lora:{getattr(lora, 'lora_name', '')}:{getattr(lora, 'lora_int_id', '')}")
    cache_salt = getattr(request, "cache_salt", None)
    if cache_salt:
        parts.append(f"salt:{cache_salt}")
    return "\0".join(parts).encode()


def eligible(request) -> bool:
    return (getattr(request, "prompt_token_ids", None) is not None and not getattr(request, "mm_features", None)
            and getattr(request, "prompt_embeds", None) is None and getattr(request, "pooling_params", None) is None)


class SchedulerSide:
    def __init__(self, *, chunk_tokens: int, block_size: int, namespace: str, fingerprint: str,
                 lookup: Lookup | None, save: bool = True) -> None:
        if chunk_tokens % block_size:
            raise ValueError(f"chunk_tokens {chunk_tokens} is not a multiple of block_size {block_size}")
        self.chunk_tokens = chunk_tokens
        self.block_size = block_size
        self.blocks_per_chunk = chunk_tokens // block_size
        self.namespace = namespace
        self.fingerprint = fingerprint
        self.lookup = lookup  # None: loads are off
        self.save = save
        self.stats = LookupStats()
        self._lookups: dict[str, _Lookup] = {}
        self._admitted: dict[str, _Request] = {}  # admitted since the last plan
        self._requests: dict[str, _Request] = {}

    # -- lookup --------------------------------------------------------------------------------------

    def refs(self, request) -> list[ChunkRef] | None:
        """The keyed full chunks of the request's prompt, or None when its KV is not a function of its tokens."""
        if not eligible(request):
            return None
        return chunk_refs(request.prompt_token_ids, namespace=self.namespace, fingerprint=self.fingerprint,
                          chunk_tokens=self.chunk_tokens, salt=_salt(request))

    def matched(self, request, num_computed: int) -> int:
        if self.lookup is None:
            return 0
        memo = self._lookups.get(request.request_id)
        if memo is None:
            t = time.perf_counter()
            refs = self.refs(request)
            hit = self.lookup(refs) if refs else 0
            memo = self._lookups[request.request_id] = _Lookup(refs, hit)
            self.stats.lookups += 1
            self.stats.lookup_tokens += len(request.prompt_token_ids or ())
            self.stats.lookup_seconds += time.perf_counter() - t
        end = min(memo.hit_chunks * self.chunk_tokens, request.num_tokens - 1)
        return max(0, end - num_computed)

    def admitted(self, request, num_external: int) -> None:
        memo = self._lookups.pop(request.request_id, None)
        refs = memo.refs if memo is not None else self.refs(request)
        self._admitted[request.request_id] = _Request(refs, pending_load=num_external if memo is not None else 0)
        if num_external > 0:
            self.stats.hit_tokens += num_external

    def finished(self, request_id: str) -> None:
        self._lookups.pop(request_id, None)
        self._admitted.pop(request_id, None)
        self._requests.pop(request_id, None)

    # -- per-step plan -------------------------------------------------------------------------------

    def plan(self, so) -> StepPlan:
        """The loads and saves of the step that `so` (a vLLM SchedulerOutput) describes."""
        plan = StepPlan(scheduled_tokens=so.total_num_scheduled_tokens)
        for new in so.scheduled_new_reqs:
            state = self._admitted.pop(new.req_id, None) or _Request(None)
            state.block_ids = list(new.block_ids[0]) if new.block_ids else []
            self._requests[new.req_id] = state
            self._step(plan, new.req_id, state, new.num_computed_tokens, so.num_scheduled_tokens.get(new.req_id, 0))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # back from preemption: a new admission, a new block table
                admitted = self._admitted.pop(req_id, None)
                if admitted is not None:
                    admitted.refs = admitted.refs if admitted.refs is not None else state.refs
                    state = self._requests[req_id] = admitted
                state.block_ids = list(new_blocks[0]) if new_blocks else []
                state.skip_chunks = 0
            elif new_blocks:
                state.block_ids.extend(new_blocks[0])
            self._step(plan, req_id, state, cached.num_computed_tokens[i], so.num_scheduled_tokens.get(req_id, 0))
        return plan

    def _step(self, plan: StepPlan, req_id: str, state: _Request, computed: int, scheduled: int) -> None:
        refs = state.refs
        if computed < state.expected:  # vLLM went back (a failed load): what it recomputes may be saved again
            state.skip_chunks = min(state.skip_chunks, computed // self.chunk_tokens)
        state.expected = computed + scheduled
        if not refs:
            state.pending_load = 0
            return
        C = self.chunk_tokens
        if state.pending_load:
            end = computed  # vLLM counts the external tokens as computed already
            start = end - state.pending_load
            state.pending_load = 0
            first, last = start // C, min(-(-end // C), len(refs))
            chunks = [ChunkMove(refs[c], self._load_blocks(state.block_ids, c, start)) for c in range(first, last)]
            if chunks:
                plan.loads.append(RequestLoad(req_id, chunks))
            state.skip_chunks = max(state.skip_chunks, last)
        if not self.save:
            return
        lo = max(computed // C, state.skip_chunks)
        hi = min((computed + scheduled) // C, len(refs))
        if lo < hi:
            plan.saves.append(RequestSave(req_id, [ChunkMove(refs[c], self._chunk_blocks(state.block_ids, c))
                                                    for c in range(lo, hi)]))

    def _chunk_blocks(self, block_ids: list[int], c: int) -> list[int]:
        return block_ids[c * self.blocks_per_chunk:(c + 1) * self.blocks_per_chunk]

    def _load_blocks(self, block_ids: list[int], c: int, start: int) -> list[int]:
        """Chunk c's blocks, -1 for those before `start` (vLLM's local hit: its blocks may be shared)."""
        first = c * self.blocks_per_chunk
        out = []
        for j in range(first, first + self.blocks_per_chunk):
            out.append(block_ids[j] if j * self.block_size >= start and j < len(block_ids) else -1)
        return out
