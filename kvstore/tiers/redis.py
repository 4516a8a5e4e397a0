"""Redis tier: records in Redis or Redis Cluster, shared by every engine that points at it.

Keys: `<prefix><namespace>:<key digest hex>`; values: whole records (see `kvstore.record`), so a value
carries its own checksums, key and token ids. Batches are pipelined (one round trip per node); in a
cluster the keys spread over slots and redis-py routes each command of a pipeline to its node.

Degrade, don't fail (`RemoteTier`): every call has a socket timeout. When Redis is unreachable or too
slow the tier marks itself down for `retry_after` seconds: meanwhile `contains`/`get` answer misses at
once and `put` drops its chunks (counted in `stats.errors`), so the engine recomputes instead of waiting.
The first call after the pause tries again; redis-py reconnects by itself. An error Redis answers for
one command of a pipeline (a key of another type under our prefix: WRONGTYPE) is that key's alone: it
is a miss, counted as corrupt, and the key is deleted, while the rest of the batch is served. A value
that fails a check is a miss and is deleted too (a caller's buffer that does not fit is the caller's
error, and deletes nothing). Pins are local: Redis evicts by its own `maxmemory-policy`, so `pin` answers False.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import redis
from redis.connection import PythonRespSerializer
from redis.exceptions import RedisError, ResponseError

from codec import Codec
from kvstore.errors import RecordError, TierError
from kvstore.keys import ChunkKey
from kvstore.record import DEFAULT_MAX_KV_BYTES
from kvstore.tiers.base import TierUsage
from kvstore.tiers.byte_tier import RecordBytes, RecordParts, RemoteTier


_MAX_SCRATCH = 256 << 20  # a batch larger than this is joined into fresh memory, not kept


class _Connection(redis.Connection):
    """redis-py's connection, packing commands in Python: a value of MiBs goes to the socket as it is,
    where the hiredis packer copies it into a fresh buffer first (a page fault per page: measured here,
    113 ms to pack 32 MiB). Replies are still parsed by hiredis."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if hasattr(self, "_command_packer"):
            self._command_packer = PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)


class RedisTier(RemoteTier):

    def __init__(
        self,
        url: str,
        codec: Codec,
        *,
        cluster: bool = False,
        prefix: str = "kvs:",
        ttl_seconds: int | None = None,
        timeout: float = 1.0,
        retry_after: float = 2.0,
        max_kv_bytes: int = DEFAULT_MAX_KV_BYTES,
        name: str = "redis",
    ) -> None:
        super().__init__(name, url, codec, retry_after=retry_after, max_kv_bytes=max_kv_bytes)
        self.prefix = prefix
        self.ttl = ttl_seconds
        options: dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout)
        if url.startswith("redis://"):  # rediss:// and unix:// keep their own connection classes
            options["connection_class"] = _Connection
        try:
            if cluster:
                self.client = redis.RedisCluster.from_url(url, **options)
            else:
                self.client = redis.Redis.from_url(url, health_check_interval=30, **options)
        except (RedisError, ValueError) as e:
            raise TierError(f"cannot connect the Redis tier to {url}: {e}") from e
        self.cluster = cluster
        self._scratch = threading.local()  # per writing thread: the buffer records are joined into

    def _name(self, key: ChunkKey) -> str:
        return f"{self.prefix}{key.namespace}:{key.hex()}"

    def _pipelined(self, what: str, items: Iterable, command: Callable[[Any, Any], None]) -> list | None:
        """One pipelined command per item (one round trip per node): each item's answer, or the
        `ResponseError` Redis gave for that item alone; None when Redis failed (the tier then counts as down)."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for item in items:
                command(pipe, item)
            return pipe.execute(raise_on_error=False)
        except RedisError as e:
            self._failed(what, e)
            return None

    # -- records -------------------------------------------------------------------------------------

    def _sources(self, keys: Sequence[ChunkKey]) -> Iterator[tuple[int, bytes | ResponseError, int]]:
        values = self._pipelined("get", map(self._name, keys), lambda pipe, name: pipe.get(name))
        for i, value in enumerate(values or ()):
            if value is not None:
                yield i, value, len(value) if isinstance(value, bytes) else 0

    @staticmethod
    def _value(source: bytes | ResponseError) -> bytes:
        if isinstance(source, ResponseError):  # e.g. WRONGTYPE: not a record, whatever it is
            raise RecordError(f"Redis answered an error for this key: {source}")
        return source

    def _read(self, source, key, out):
        return super()._read(self._value(source), key, out)

    def _hold(self, source, size: int) -> RecordBytes | None:
        return RecordBytes(size, data=self._value(source))

    def _write(self, keys: Sequence[ChunkKey], records: Sequence[RecordParts]) -> tuple[list[bool], int, int]:
        values = self._joined(records)
        # NX: keys are content hashes, so an existing value is already this chunk.
        done = self._pipelined("put", zip(map(self._name, keys), values),
                               lambda pipe, item: pipe.set(item[0], item[1], ex=self.ttl, nx=True))
        if done is None:
            return [False] * len(keys), 0, 0
        ok = [not isinstance(r, Exception) for r in done]  # None: present already (NX)
        stored = [r is True for r in done]
        return ok, sum(stored), sum(len(v) for v, s in zip(values, stored) if s)

    def _joined(self, records: Sequence[RecordParts]) -> list[memoryview]:
        """Each record as the one buffer SET sends, joined into this thread's scratch buffer, reused from
        put to put: a fresh buffer of MiBs costs a page fault per page, more than the copy itself."""
        sizes = [sum(memoryview(p).nbytes for p in parts) for parts in records]
        total = sum(sizes)
        buf = getattr(self._scratch, "buf", None)
        if total > _MAX_SCRATCH:
            buf = bytearray(total)
        elif buf is None or len(buf) < total:
            buf = self._scratch.buf = bytearray(total)
        view, values, pos = memoryview(buf), [], 0
        for parts, size in zip(records, sizes):
            start = pos
            for p in parts:
                b = memoryview(p).cast("B")
                view[pos : pos + len(b)] = b
                pos += len(b)
            values.append(view[start:pos])
        return values

    def _discard(self, key: ChunkKey, source: bytes, reason: str) -> None:
        self.delete([key])

    # -- protocol ------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey], tokens=None) -> list[bool]:
        if not keys or not self.available():
            return [False] * len(keys)
        found = self._pipelined("contains", map(self._name, keys), lambda pipe, name: pipe.exists(name))
        return [n is not None and not isinstance(n, Exception) and bool(n) for n in found] if found is not None else [False] * len(keys)

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        if not keys or not self.available():
            return 0
        return self._delete_names("delete", map(self._name, keys))

    def _delete_names(self, what: str, names: Iterable[str]) -> int:
        done = self._pipelined(what, names, lambda pipe, name: pipe.delete(name)) or ()
        return sum(n for n in done if isinstance(n, int))

    def usage(self) -> TierUsage:
        """Redis's own memory figures (the tier shares the server with whatever else is in it)."""
        if not self.available():
            return TierUsage(0, 0, 0, 0)
        try:
            if self.cluster:  # summed over the primaries
                primaries = redis.RedisCluster.PRIMARIES
                nodes = list(self.client.info("memory", target_nodes=primaries).values())
                entries = self.client.dbsize(target_nodes=primaries)
            else:
                nodes = [self.client.info("memory")]
                entries = self.client.dbsize()
            used = sum(n.get("used_memory", 0) for n in nodes)
            cap = sum(n.get("maxmemory", 0) for n in nodes)
            return TierUsage(int(used), int(cap), int(entries), 0)
        except RedisError as e:
            self._failed("usage", e)
            return TierUsage(0, 0, 0, 0)

    def clear(self, namespace: str | None = None) -> int:
        pattern = f"{self.prefix}{namespace}:*" if namespace else f"{self.prefix}*"
        removed = 0
        try:
            batch = []
            for name in self.client.scan_iter(match=pattern, count=1000):
                batch.append(name)
                if len(batch) >= 1000:
                    removed += self._delete_names("clear", batch)
                    batch = []
            if batch:
                removed += self._delete_names("clear", batch)
        except RedisError as e:
            self._failed("clear", e)
        return removed

    def close(self) -> None:
        try:
            self.client.close()
        except RedisError:
            pass
