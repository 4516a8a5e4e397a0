"""The base of the byte tiers (disk, Redis, the sidecar client): records in, records out.

A byte tier holds records (`kvstore.record`). This base owns everything between chunks and records:
`put` encodes each chunk with the tier's codec, `get` verifies each record (header and payload checksums,
the key in the record against the key asked for) and decodes it into the caller's buffer, and both keep
the tier's counters. A tier supplies only how records move:
- `_sources(keys)`: a generator of `(i, source, size)` for each stored key (`source`: the record's bytes,
  or whatever the tier's `_read` / `_read_bytes` take, e.g. a file); faults of the medium are the tier's to
  count, and a key it cannot reach is simply not yielded (a miss);
- `_write(keys, records)`: store each record (a list of buffers written back to back) under its key;
- `_discard(key, source, reason)`: what becomes of a record that failed its checks (default: nothing);
- `_hold(source, size)`: the record as `RecordBytes` (default: `source` is its bytes).
`get_bytes` / `put_bytes` move records as bytes, checked but never decoded and re-encoded, so a record
can go from one byte tier to another as it is, and a record server sends what it stored as it came:
`RecordBytes` is a buffer in memory or a file to `sendfile`, held by the tier until closed.

`RemoteTier` adds "degrade, don't fail" for tiers across a network: after a failed call the tier counts
as down for `retry_after` seconds, during which it answers misses and drops puts at once.
"""

from __future__ import annotations

import logging
import os
import time
from abc import abstractmethod
from contextlib import closing
from typing import BinaryIO, Callable, Iterator, Literal, Sequence, Union

import torch

from codec import Codec
from kvstore.chunk import Chunk
from kvstore.errors import RecordError
from kvstore.keys import ChunkKey
from kvstore.record import DEFAULT_MAX_KV_BYTES, decode_record, encode_record, read_header, verify_record
from kvstore.tiers.base import Durability, Tier, Timer
from kvstore.tiers.files import open_record

log = logging.getLogger(__name__)

Buffer = Union[bytes, bytearray, memoryview]
RecordParts = Sequence[Buffer]  # one record as buffers written back to back (header, payload)
Check = Literal["full", "header"]


class RecordBytes:
    """One stored record as it is: its bytes (`data`), or the file that holds exactly it (`path`, read
    with `open` or `read`, never through a symbolic link). The tier keeps the entry (no eviction or delete
    frees it) until `close()`; `data` stays valid as long as it is referenced."""

    __slots__ = ("size", "data", "path", "_release")

    def __init__(self, size: int, *, data: Buffer | None = None, path: str | None = None,
                 release: Callable[[], None] | None = None) -> None:
        self.size, self.data, self.path, self._release = size, data, path, release

    def open(self) -> BinaryIO:
        return open_record(self.path)

    def read(self) -> Buffer:
        if self.data is not None:
            return self.data
        with self.open() as f:
            data = f.read()
        if len(data) != self.size:
            raise RecordError(f"record file has {len(data)} bytes, the index says {self.size}")
        return data

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> "RecordBytes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ByteTier(Tier):
    def __init__(self, name: str, codec: Codec, *, max_kv_bytes: int = DEFAULT_MAX_KV_BYTES) -> None:
        super().__init__(name)
        self.codec = codec
        self.max_kv_bytes = max_kv_bytes

    def available(self) -> bool:
        """False while the tier counts as down (remote tiers): calls then answer at once."""
        return True

    # -- what a byte tier supplies -------------------------------------------------------------------

    @abstractmethod
    def _sources(self, keys: Sequence[ChunkKey]) -> Iterator[tuple[int, object, int]]:
        """(index into `keys`, the record (bytes, or what `_read` takes), its size) per stored key."""

    @abstractmethod
    def _write(self, keys: Sequence[ChunkKey], records: Sequence[RecordParts]) -> tuple[list[bool], int, int]:
        """Store each record under its key: (stored or already present, per key; records written by this
        call; bytes written)."""

    def _read(self, source, key: ChunkKey | None, out: torch.Tensor | None) -> Chunk | None:
        """The chunk in `source` (as `_sources` yields it), checked against `key` and delivered into `out`.
        `RecordError` for a bad record, `OSError` for a medium that fails, None for one that is gone."""
        return decode_record(source, out, key=key, max_kv_bytes=self.max_kv_bytes)

    def _hold(self, source, size: int) -> RecordBytes | None:
        """The record in `source`, unchecked, held until closed; None for one that is gone."""
        return RecordBytes(size, data=source)

    def _discard(self, key: ChunkKey, source: object, reason: str) -> None:
        """A record that failed its checks (already counted as corrupt): remove it, where the tier can."""

    def _encode(self, chunks: Sequence[Chunk]) -> list[RecordParts]:
        return [encode_record(c, self.codec) for c in chunks]

    # -- chunks --------------------------------------------------------------------------------------

    def get(self, keys: Sequence[ChunkKey], out: Sequence[torch.Tensor | None] | None = None) -> list[Chunk | None]:
        return self._fetch(keys, lambda i, source, size: self._read(source, keys[i], out[i] if out is not None else None))

    def _fetch(self, keys: Sequence[ChunkKey], fetch: Callable[[int, object, int], object | None]) -> list:
        """`fetch(i, source, size)` of each stored key (None elsewhere), counted: a bad record is a miss,
        counted as corrupt and discarded; a read the medium failed is a miss, counted as an error."""
        if not keys:
            return []
        if not self.available():
            self.stats.add(misses=len(keys))
            return [None] * len(keys)
        results: list = [None] * len(keys)
        nbytes = corrupt = errors = 0
        with Timer() as t, closing(self._sources(keys)) as sources:
            for i, source, size in sources:
                try:
                    results[i] = fetch(i, source, size)
                    nbytes += size if results[i] is not None else 0
                except RecordError as e:
                    corrupt += 1
                    log.warning("%s tier: bad record for %s: %s", self.name, keys[i], e)
                    self._discard(keys[i], source, str(e))
                except OSError as e:  # the medium failed under a read: a miss, counted
                    errors += 1
                    log.warning("%s tier: reading %s failed: %s", self.name, keys[i], e)
        hits = sum(r is not None for r in results)
        self.stats.add(hits=hits, misses=len(keys) - hits, corrupt=corrupt, errors=errors, bytes_read=nbytes,
                       get_calls=1, get_seconds=t.seconds)
        return results

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        return self._store([c.key for c in chunks], lambda: self._encode(chunks))

    def _store(self, keys: Sequence[ChunkKey], records: Callable[[], Sequence[RecordParts]]) -> list[bool]:
        """`_write` of the records `records()` makes (timed with them), counted."""
        if not keys:
            return []
        if not self.available():
            self.stats.add(put_rejected=len(keys))
            return [False] * len(keys)
        with Timer() as t:
            ok, written, nbytes = self._write(keys, records())
        self.stats.add(puts=written, put_rejected=ok.count(False), bytes_written=nbytes, put_calls=1, put_seconds=t.seconds)
        return ok

    # -- records as bytes ----------------------------------------------------------------------------

    def get_bytes(self, keys: Sequence[ChunkKey], *, check: Check = "full") -> list[RecordBytes | None]:
        """Each key's whole record as it is stored (None on a miss), never decoded. `check="full"`: every
        check but decoding (header, key, length, codec, payload checksum; the record is then in memory);
        `"header"`: the header, key and length only, which for a file reads only its first bytes (what a
        record server does before it sends a file whose payload its reader checks). Close each one."""
        def fetch(i: int, source: object, size: int) -> RecordBytes | None:
            rec = self._hold(source, size)
            return self._checked(rec, keys[i], check) if rec is not None else None

        return self._fetch(keys, fetch)

    def _checked(self, rec: RecordBytes, key: ChunkKey, check: Check) -> RecordBytes:
        try:
            if check == "full":
                data = rec.read()
                verify_record(data, key=key, max_kv_bytes=self.max_kv_bytes)
                if rec.data is None:
                    rec.close()
                    rec = RecordBytes(rec.size, data=data)
            elif rec.data is not None:
                verify_record(rec.data, key=key, max_kv_bytes=self.max_kv_bytes, payload=False)
            else:
                with rec.open() as f:
                    read_header(f, key=key, max_kv_bytes=self.max_kv_bytes, size=rec.size)
                    if hasattr(os, "posix_fadvise"):  # the payload is sent next: start reading it in
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        except BaseException:
            rec.close()
            raise
        return rec

    def put_bytes(self, keys: Sequence[ChunkKey], records: Sequence[Buffer | RecordParts]) -> list[bool]:
        """Store whole records as they are, each one buffer or the buffers it is made of back to back
        (checked already: by `get_bytes` of another byte tier, or by the service that took them in)."""
        return self._store(keys, lambda: [[r] if isinstance(r, (bytes, bytearray, memoryview)) else r for r in records])


class RemoteTier(ByteTier):
    """A byte tier across the network (Redis, a sidecar). Pins are the server's business: `pin` answers
    False, and the server evicts on its own, so `watch_evictions` callbacks are never called."""

    drop_when_behind = True
    durability: Durability = "process-crash"  # that of this process; what the server survives is its own

    def __init__(self, name: str, url: str, codec: Codec, *, retry_after: float, max_kv_bytes: int) -> None:
        super().__init__(name, codec, max_kv_bytes=max_kv_bytes)
        self.url = url
        self.retry_after = retry_after
        self._down_until = 0.0

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, e: Exception) -> None:
        self._down_until = time.monotonic() + self.retry_after  # one float store: atomic, no lock needed
        self.stats.add(errors=1)
        log.warning("%s tier %s: %s failed (%s); treating it as down for %.1f s", self.name, self.url, what, e, self.retry_after)

    def pin(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [False] * len(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        return None
