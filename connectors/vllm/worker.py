"""Worker-side data plane of the connector: planned chunks into vLLM's blocks, computed chunks out of them.

- `load(plan)` (in `start_load_kv`, before the forward of a step that has loads): batch `get`s of up to
  `LOAD_BATCH` chunks into reused buffers, then copies into the blocks (`PagedKV.scatter`). A
  request's load stops at its first chunk that no tier returns (evicted, corrupt, tier down or slow:
  tiers answer misses after a bounded wait, never raise): the blocks of that chunk and of every later
  one are reported by `take_invalid_blocks`, and vLLM recomputes from the first of them.
- `save(plan)` (in `wait_for_save`, after the forward): copies each planned chunk out of the blocks
  into a buffer (`PagedKV.gather`, the only save work on the forward path) and hands the chunks to a
  background writer that calls `TieredStore.put` (memory tier, then the slower tiers asynchronously).
  A request whose load failed in this step saves nothing in it: its later KV was computed over blocks
  that did not hold the right KV. With tensor parallelism the ranks first agree on whether any of them
  failed (`any_failed`, one all-reduce, in steps with both loads and saves only). When the writer is
  behind by `max_pending_bytes`, further saves are dropped and counted: a future miss, never a stall.
- Adaptive loading (`[adaptive]` configured, level copies stored: `kvstore.adaptive`): a request's
  leading chunks that have level copies are loaded by the planner's stream, each at the level it picks
  from the measured bandwidth and decode speeds (re-planning as chunks arrive), scattered into the blocks
  as they are decoded; chunks after them take the ordinary path. The planner may recompute a tail of
  them instead (vLLM computes after the loads, so never a head), once it knows the engine's prefill
  speed: `forward_started` / `forward_finished` time each forward that computes at least a chunk's
  tokens (CUDA events on a GPU, read a step later; the clock on a CPU). A tail it recomputes is
  reported through `take_invalid_blocks` like a failed load and counted as `adaptive_recomputed_chunks`,
  not as a failure.
  Saves also store each chunk at every configured level. Decisions: `adaptive_chunks{level}`,
  `adaptive_replans` (metrics).
- Decode steps plan nothing, so both calls return at once.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from connectors.vllm.layout import PagedKV
from connectors.vllm.metrics import Counters
from connectors.vllm.plan import StepPlan, rekey
from kvstore.adaptive import FAILED, adaptive_candidates
from kvstore.chunk import Chunk
from kvstore.planner import RECOMPUTE
from kvstore.store import TieredStore

log = logging.getLogger(__name__)

LOAD_BATCH = 8  # chunks per store get: bounds the load buffer (8 x one chunk of all layers)
FREE_BUFFER_BYTES = 256 << 20  # save buffers kept for reuse between steps


@dataclass(slots=True)
class _Forward:
    tokens: int
    start: float | torch.cuda.Event  # the clock on a CPU, an event on a GPU
    end: float | torch.cuda.Event | None = None


class WorkerSide:
    def __init__(self, store: TieredStore, pages: PagedKV, *, fingerprint: str, chunk_shape: tuple[int, ...],
                 dtype: torch.dtype, block_ratio: int = 1, counters: Counters | None = None,
                 max_pending_bytes: int = 1 << 30, any_failed: Callable[[bool], bool] | None = None) -> None:
        self.store = store
        self.pages = pages
        self.fingerprint = fingerprint
        self.chunk_shape = chunk_shape  # [L, 2, C, H, D]
        self.dtype = dtype
        self.device = pages.device
        self.block_ratio = block_ratio  # kernel blocks per vLLM (scheduler) block
        self.counters = counters or Counters()
        self.max_pending_bytes = max_pending_bytes
        self.any_failed = any_failed
        self.chunk_bytes = dtype.itemsize * int(torch.Size(chunk_shape).numel())
        self._load_buf: torch.Tensor | None = None  # [LOAD_BATCH, L, 2, C, H, D] on the CPU
        self._free: list[torch.Tensor] = []  # save buffers on the blocks' device
        self._cond = threading.Condition()
        self._pending = 0  # bytes handed to the writer and not yet put
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-save")
        self._invalid: set[int] = set()
        self._failed_now: set[str] = set()  # requests whose load failed in the current step
        self._forward: _Forward | None = None  # the forward being timed (the engine's prefill speed)
        self._closed = False

    # -- the engine's prefill speed (what adaptive loading weighs a recompute by) ---------------------

    def forward_started(self, tokens: int) -> None:
        """The step's forward starts and computes `tokens` (every request together): timed when that is at
        least a chunk and adaptive loading may recompute."""
        self._observe_forward()
        adaptive = self.store.adaptive
        if adaptive is None or not adaptive.config.recompute or tokens < self.chunk_shape[2]:
            return
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._forward = _Forward(tokens, start)
        else:
            self._forward = _Forward(tokens, time.perf_counter())

    def forward_finished(self) -> None:
        f = self._forward
        if f is None or f.end is not None:
            return
        if isinstance(f.start, float):
            f.end = time.perf_counter()
        else:  # read once the GPU is through it (a later step), never waited for here
            f.end = torch.cuda.Event(enable_timing=True)
            f.end.record()
        self._observe_forward()

    def _observe_forward(self) -> None:
        f = self._forward
        if f is None or f.end is None:
            return
        if isinstance(f.start, float):
            seconds = f.end - f.start
        elif f.end.query():
            seconds = f.start.elapsed_time(f.end) / 1e3
        else:
            return
        self._forward = None
        self.store.adaptive.observe_prefill(f.tokens, seconds)

    # -- load ----------------------------------------------------------------------------------------

    def load(self, plan: StepPlan) -> None:
        self._failed_now = set()
        if not plan.loads:
            return
        t0 = time.perf_counter()
        for job in plan.loads:
            # Leading chunks with level copies: adaptively (which counts its own recomputes and failures).
            failed_at, done = self._load_adaptive(job.chunks) if self.store.adaptive is not None else (None, 0)
            if failed_at is None and done < len(job.chunks):
                rest = self._load_request(job.chunks[done:])
                if rest is not None:
                    failed_at = done + rest
                    self.counters.add("load_failures", len(job.chunks) - failed_at)
            if failed_at is not None:
                self._failed_now.add(job.req_id)
                self._invalid.update(b for m in job.chunks[failed_at:] for b in m.block_ids if b >= 0)
        self.counters.add("load_seconds", time.perf_counter() - t0)
        self._tier_counters()

    def _load_request(self, moves) -> int | None:
        """Load `moves` in order; the index of the first that could not be loaded, or None."""
        for b0 in range(0, len(moves), LOAD_BATCH):
            batch = moves[b0:b0 + LOAD_BATCH]
            bufs = self._load_buffers(len(batch))
            sources: list[str | None] = [None] * len(batch)
            try:
                got = self.store.get([rekey(m.ref, self.fingerprint) for m in batch], out=bufs, sources=sources)
            except Exception as e:  # the store degrades on its own; anything left is a miss here
                log.warning("kvstore: load failed: %s", e)
                got = [None] * len(batch)
            for j, (move, chunk) in enumerate(zip(batch, got)):
                if chunk is None:
                    return b0 + j
                # Synchronous to the device: the buffer is reused by the next get.
                if not self._write(move, bufs[j], sources[j] or ""):
                    return b0 + j
        return None

    def _write(self, move, kv: torch.Tensor, source: str) -> bool:
        """Scatter one loaded chunk's KV into the move's blocks and count its tokens; False if that failed."""
        try:
            src = kv if kv.device == self.device else kv.to(self.device)
            self.pages.scatter(src, self._kernel_blocks(move.block_ids))
        except Exception as e:
            log.warning("kvstore: copying a loaded chunk into vLLM's blocks failed: %s", e)
            return False
        written = sum(1 for b in move.block_ids if b >= 0) * (len(move.ref.tokens) // len(move.block_ids))
        self.counters.add("loaded_tokens", written, source)
        return True

    def _load_adaptive(self, moves) -> tuple[int | None, int]:
        """Load the leading `moves` that have level copies, as the planner says: (the index of the first
        chunk to recompute, or None; how many leading moves this handled)."""
        adaptive = self.store.adaptive
        refs = [rekey(m.ref, self.fingerprint) for m in moves]
        available = adaptive_candidates(self.store, refs)
        if not available:
            return None, 0
        n = len(available)
        # vLLM computes after the loads: only a tail can be recomputed (through its invalid blocks).
        plan = adaptive.plan(available, chunk_tokens=self.chunk_shape[2], kv_bytes=self.chunk_bytes,
                             element_bytes=self.dtype.itemsize, head=False)
        stream = adaptive.stream(refs, available, plan, chunk_tokens=self.chunk_shape[2], kv_bytes=self.chunk_bytes)
        stop = None
        try:
            for i, chunk in stream:
                if (chunk is None or tuple(chunk.kv.shape) != self.chunk_shape or chunk.kv.dtype != self.dtype
                        or not self._write(moves[i], chunk.kv, adaptive.tier.name)):
                    stop = i
                    break
        finally:
            report = stream.report()
        for level, count in report.chunks_by_level.items():
            if level not in (RECOMPUTE, FAILED):
                self.counters.add("adaptive_chunks", count, level)
        self.counters.add("adaptive_replans", report.replans)
        if stop is not None:  # a copy that could not be had or used: a failure, recomputed from there
            self.counters.add("load_failures", len(moves) - stop)
            return stop, n
        if stream.fetch_end < n:  # the planner chose to recompute a tail
            self.counters.add("adaptive_recomputed_chunks", len(moves) - stream.fetch_end)
            return stream.fetch_end, n
        return None, n

    def _load_buffers(self, n: int) -> list[torch.Tensor]:
        if self._load_buf is None:
            pin = torch.cuda.is_available() and self.device.type == "cuda"
            self._load_buf = torch.empty((LOAD_BATCH, *self.chunk_shape), dtype=self.dtype, pin_memory=pin)
        return [self._load_buf[j] for j in range(n)]

    def _kernel_blocks(self, block_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(block_ids, dtype=torch.long)
        if self.block_ratio == 1:
            return ids
        r = self.block_ratio
        expanded = ids.view(-1, 1) * r + torch.arange(r)
        return torch.where(ids.view(-1, 1) >= 0, expanded, -1).view(-1)

    def take_invalid_blocks(self) -> set[int]:
        out, self._invalid = self._invalid, set()
        return out

    # -- save ----------------------------------------------------------------------------------------

    def save(self, plan: StepPlan) -> None:
        failed, self._failed_now = self._failed_now, set()
        if not plan.saves:
            return
        if self.any_failed is not None and plan.loads and self.any_failed(bool(failed)):
            failed = failed | {job.req_id for job in plan.loads}  # a rank failed: which request, unknown
        t0 = time.perf_counter()
        chunks: list[Chunk] = []
        dropped = 0
        for job in plan.saves:
            if job.req_id in failed:
                continue
            for move in job.chunks:
                buf = self._take_buffer()
                if buf is None:
                    dropped += 1
                    continue
                self.pages.gather(self._kernel_blocks(move.block_ids), buf)
                chunks.append(Chunk.from_ref(rekey(move.ref, self.fingerprint), buf))
        self.counters.add("save_seconds", time.perf_counter() - t0)
        self.counters.add("saves_dropped", dropped)
        if chunks:
            # On a GPU the copies are queued on vLLM's stream: the writer waits for them, not the forward.
            done = None
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
            self._writer.submit(self._put, chunks, len(chunks) * self.chunk_bytes, done)
        self._tier_counters()

    def _take_buffer(self) -> torch.Tensor | None:
        """A save buffer, or None when the writer is behind by `max_pending_bytes` (this step's included)."""
        with self._cond:
            if self._pending + self.chunk_bytes > self.max_pending_bytes:
                return None
            self._pending += self.chunk_bytes
            if self._free:
                return self._free.pop()
        return torch.empty(self.chunk_shape, dtype=self.dtype, device=self.device)

    def _put(self, chunks: list[Chunk], nbytes: int, done) -> None:
        t0 = time.perf_counter()
        try:
            if done is not None:
                done.synchronize()
            self.store.put(chunks)
            if self.store.adaptive is not None:  # before the buffers go back to the free list
                self.store.adaptive.store_levels(chunks)
            self.counters.add("saved_tokens", sum(len(c.tokens) for c in chunks))
        except Exception as e:  # a failed save is a future miss, never an engine error
            log.warning("kvstore: saving %d chunks failed: %s", len(chunks), e)
            self.counters.add("saves_dropped", len(chunks))
        finally:
            with self._cond:
                self._pending -= nbytes
                self._free.extend(c.kv for c in chunks)
                del self._free[max(1, min(self.max_pending_bytes, FREE_BUFFER_BYTES) // self.chunk_bytes):]
                self._cond.notify_all()
        self.counters.add("store_seconds", time.perf_counter() - t0)

    def _tier_counters(self) -> None:
        self.counters.add_tiers({t.name: t.stats.snapshot() for t in self.store.tiers})

    # -- control -------------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every save handed to the writer is in the store, and the store's slower tiers have it."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending == 0, timeout):
                return False
        return self.store.flush(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.shutdown(wait=True)
        self._tier_counters()
        self.store.close()
