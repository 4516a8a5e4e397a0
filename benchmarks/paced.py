"""`PacedTier`: a byte tier behind a link of a set bandwidth, for the adaptive-loading benchmark and tests.

It wraps a real byte tier (a disk tier, say) and paces every `get_bytes` as a token bucket of `rate`
bytes per second that transfers share (one link: a transfer starts when the previous one is through),
by sleeping until the record's bytes would have crossed it. The bytes are real (read from the inner
tier); only their arrival is delayed. `rate` may change at any time (a link that gets slower).
What it supplies is what adaptive loading uses of a tier: `name`, `stats`, `contains`, `get_bytes`,
`put_bytes`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from kvstore.keys import ChunkKey
from kvstore.tiers.byte_tier import ByteTier, Check, RecordBytes


class PacedTier:
    def __init__(self, inner: ByteTier, rate: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.stats = inner.stats
        self.rate = rate  # bytes per second
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the link is through with the transfers so far

    def contains(self, keys: Sequence[ChunkKey], tokens=None) -> list[bool]:
        return self.inner.contains(keys, tokens)

    def put_bytes(self, keys, records) -> list[bool]:
        return self.inner.put_bytes(keys, records)

    def get_bytes(self, keys: Sequence[ChunkKey], *, check: Check = "full") -> list[RecordBytes | None]:
        out: list[RecordBytes | None] = []
        for rec in self.inner.get_bytes(keys, check=check):
            if rec is None:
                out.append(None)
                continue
            with rec:
                data = bytes(rec.read())
            with self._lock:
                start = max(time.perf_counter(), self._free_at)
                self._free_at = start + len(data) / self.rate
                done = self._free_at
            time.sleep(max(0.0, done - time.perf_counter()))
            out.append(RecordBytes(len(data), data=data))
        return out
