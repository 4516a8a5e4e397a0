"""The prompt's KV buffer `[L, 2, T, H, D]` filled with the segments' cached KV, layer by layer.

`KVAssembler` owns the buffer of one blend. For every cached segment it writes, per layer, the values as
they are and the keys re-rotated from their stored positions (`start_pos + j`) to their rows in the
prompt (`kernels.scatter_rows` with a rotation, one call per layer for all segments). Blend then
overwrites the rows it recomputes.

Overlap: with `background=True` a loader thread first runs the `SegmentFetch` (e.g. `TieredStore.get`
from a slow tier) while blend embeds the prompt and computes the layers that need no cached KV, then
assembles layer 0, 1, ... and publishes each (`layer(i)` waits for layer i only), so assembling layer
i+1 overlaps computing layer i. The store hands whole chunks (all layers), so the fetch itself is one
step; what overlaps per layer is the move to the device, the dtype cast and the re-rotation.
Layers listed in `skip` are never assembled (blend recomputes all their rows). An exception in the
thread is re-raised by the next wait.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import torch

from blend.errors import BlendInputError
from blend.types import Recomputed, Segment, SegmentFetch
from kernels import RopeSpec, scatter_rows


class KVAssembler:
    def __init__(self, source: Sequence[Segment] | SegmentFetch, shape: tuple[int, int, int, int, int],
                 dtype: torch.dtype, device: torch.device, rope: RopeSpec, *, skip: Sequence[int] = (),
                 background: bool = True) -> None:
        self.shape = shape  # (L, 2, T, H, D)
        self.buffer = torch.zeros(shape, dtype=dtype, device=device)  # [L, 2, T, H, D]
        self.rope = rope
        self.skip = set(skip)
        self._source = source
        self._fetched = threading.Event()
        self._ready = [threading.Event() for _ in range(shape[0])]
        self._error: BaseException | None = None
        self._hits = torch.zeros(shape[2], dtype=torch.bool)  # [T]
        self._offsets = torch.full((shape[2],), -1, dtype=torch.int64)  # [T] stored position of cached rows
        self.recomputed: list[Recomputed] = []  # fresh segments that stand in for stored KV (known after the fetch)
        self.fetch_seconds = 0.0
        self.wait_seconds = 0.0
        if all(i in self.skip for i in range(shape[0])):
            self._fetched.set()  # nothing to assemble: the cached KV is never read, so never fetched
            for e in self._ready:
                e.set()
            self._thread = None
        elif background:
            self._thread = threading.Thread(target=self._run, name="blend-assemble", daemon=True)
            self._thread.start()
        else:
            self._thread = None
            self._run()

    # -- consumer side ---------------------------------------------------------------------------------

    def _wait(self, event: threading.Event) -> None:
        t = time.perf_counter()
        event.wait()
        self.wait_seconds += time.perf_counter() - t
        if self._error is not None:
            raise self._error

    def hits(self) -> torch.Tensor:
        """[T] bool: rows with cached KV (waits for the fetch)."""
        self._wait(self._fetched)
        return self._hits

    def offsets(self) -> torch.Tensor:
        """[T] int64: the position each cached row's KV was computed at (its place in its passage), -1 for
        fresh rows (waits for the fetch)."""
        self._wait(self._fetched)
        return self._offsets

    def layer(self, i: int) -> torch.Tensor:
        """[2, T, H, D] view of layer i of the buffer, its cached rows written (waits for them)."""
        self._wait(self._ready[i])
        return self.buffer[i]

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()

    # -- loader side -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._assemble()
        except BaseException as e:  # handed to the consumer: a loader error must not hang blend
            self._error = e if isinstance(e, Exception) else RuntimeError(f"blend loader stopped: {e!r}")
        finally:
            self._fetched.set()
            for e in self._ready:
                e.set()

    def _segments(self) -> list[Segment]:
        src = self._source
        if not isinstance(src, SegmentFetch):
            return list(src)
        t = time.perf_counter()
        segs = list(src.fetch())
        self.fetch_seconds = time.perf_counter() - t
        if len(segs) != len(src.tokens) or any(not torch.equal(s.tokens, t) for s, t in zip(segs, src.tokens)):
            raise BlendInputError("fetched segments do not match the announced tokens")
        return segs

    def _assemble(self) -> None:
        num_layers, _, total, heads, dim = self.shape
        segs = self._segments()
        srcs, old_pos, new_pos = [], [], []
        row = 0
        for s in segs:
            n = s.tokens.numel()
            if s.kv is not None:
                if tuple(s.kv.shape) != (num_layers, 2, n, heads, dim):
                    raise BlendInputError(f"segment KV {tuple(s.kv.shape)} does not fit the model's "
                                          f"{(num_layers, 2, n, heads, dim)}")
                srcs.append(s.kv)
                old_pos.append(torch.arange(s.start_pos, s.start_pos + n))
                new_pos.append(torch.arange(row, row + n))
                self._hits[row : row + n] = True
                self._offsets[row : row + n] = old_pos[-1]
            elif s.reason is not None:
                self.recomputed.append(Recomputed(row, n, s.reason))
            row += n
        self._fetched.set()
        if not srcs:
            for e in self._ready:
                e.set()
            return
        dev = self.buffer.device
        rows = torch.cat(new_pos).to(dev)  # [N] destination rows (= new positions)
        old = torch.cat(old_pos).to(dev)  # [N]
        for i in range(num_layers):
            if i not in self.skip:
                # [2, N, H, D] in the buffer's dtype and device (one copy per layer)
                src = torch.cat([kv[i] for kv in srcs], dim=1).to(device=dev, dtype=self.buffer.dtype)
                scatter_rows(src[0:1], rows, self.buffer[i, 0:1], rope=self.rope, old_pos=old, new_pos=rows)
                scatter_rows(src[1:2], rows, self.buffer[i, 1:2])
            self._ready[i].set()
