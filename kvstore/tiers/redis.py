"""Redis tier: records in Redis or Redis Cluster, shared by every engine that points at it.

Keys: `<prefix><namespace>:<key digest hex>`; values: whole records (see `kvstore.record`), so a value
carries its own checksums, key and token ids. Batches are pipelined (one round trip per node); in a
cluster the keys spread over slots and redis-py routes each command of a pipeline to its node.

Degrade, don't fail: every call has a socket timeout. When Redis is unreachable or too slow the tier
marks itself down for `retry_after` seconds: meanwhile `contains`/`get` answer misses at once and `put`
drops its chunks (counted in `stats.errors`), so the engine recomputes instead of waiting. The first call
after the pause tries again; redis-py reconnects by itself. A value that fails a check is a miss and is
deleted. Pins are local: Redis evicts by its own `maxmemory-policy`, so `pin` answers False.
"""

from __future__ import annotations

import logging
from typing import Sequence

import redis
from redis.exceptions import RedisError

from codec import Codec
from kvstore.chunk import Chunk
from kvstore.errors import RecordError, TierError
from kvstore.keys import ChunkKey
from kvstore.record import DEFAULT_MAX_KV_BYTES, decode_record, encode_record
from kvstore.tiers.base import RemoteTier, TierStats, TierUsage, Timer

log = logging.getLogger(__name__)


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
        self.name = name
        self.codec = codec
        self.prefix = prefix
        self.ttl = ttl_seconds
        self.retry_after = retry_after
        self.max_kv_bytes = max_kv_bytes
        self.stats = TierStats()
        self.on_evict = None
        self.url = url
        options = dict(socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            if cluster:
                self.client = redis.RedisCluster.from_url(url, **options)
            else:
                self.client = redis.Redis.from_url(url, health_check_interval=30, **options)
        except (RedisError, ValueError) as e:
            raise TierError(f"cannot connect the Redis tier to {url}: {e}") from e
        self.cluster = cluster

    def _name(self, key: ChunkKey) -> str:
        return f"{self.prefix}{key.namespace}:{key.hex()}"

    def _pipeline(self):
        return self.client.pipeline(transaction=False)

    # -- protocol ------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey], tokens=None) -> list[bool]:
        if not keys or not self.available():
            return [False] * len(keys)
        try:
            pipe = self._pipeline()
            for k in keys:
                pipe.exists(self._name(k))
            return [bool(n) for n in pipe.execute()]
        except RedisError as e:
            self._failed("contains", e)
            return [False] * len(keys)

    def get(self, keys: Sequence[ChunkKey], out=None) -> list[Chunk | None]:
        if not keys:
            return []
        if not self.available():
            self.stats.add(misses=len(keys))
            return [None] * len(keys)
        with Timer() as t:
            try:
                pipe = self._pipeline()
                for k in keys:
                    pipe.get(self._name(k))
                values = pipe.execute()
            except RedisError as e:
                self._failed("get", e)
                values = [None] * len(keys)
            results: list[Chunk | None] = []
            bad = []
            nbytes = 0
            for i, (key, value) in enumerate(zip(keys, values)):
                chunk = None
                if value is not None:
                    try:
                        chunk = decode_record(value, out[i] if out is not None else None, self.max_kv_bytes)
                        if chunk.key != key:
                            raise RecordError(f"value holds {chunk.key}, not {key}")
                        nbytes += len(value)
                    except RecordError as err:
                        log.warning("redis tier: bad value under %s: %s; deleting it", self._name(key), err)
                        bad.append(key)
                        chunk = None
                results.append(chunk)
        if bad:
            self.stats.add(corrupt=len(bad))
            self.delete(bad)
        hits = sum(c is not None for c in results)
        self.stats.add(hits=hits, misses=len(keys) - hits, bytes_read=nbytes, get_calls=1, get_seconds=t.seconds)
        return results

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        if not chunks:
            return []
        if not self.available():
            self.stats.add(put_rejected=len(chunks))
            return [False] * len(chunks)
        with Timer() as t:
            pipe = self._pipeline()
            nbytes = 0
            for c in chunks:
                header, payload = encode_record(c, self.codec)
                value = header + payload  # one buffer per value: what redis-py sends anyway
                nbytes += len(value)
                # NX: keys are content hashes, so an existing value is already this chunk.
                pipe.set(self._name(c.key), value, ex=self.ttl, nx=True)
            try:
                pipe.execute()
                ok = [True] * len(chunks)
            except RedisError as e:
                self._failed("put", e)
                ok = [False] * len(chunks)
        stored = sum(ok)
        self.stats.add(puts=stored, put_rejected=len(chunks) - stored, bytes_written=nbytes if stored else 0,
                       put_calls=1, put_seconds=t.seconds)
        return ok

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        if not keys or not self.available():
            return 0
        try:
            pipe = self._pipeline()
            for k in keys:
                pipe.delete(self._name(k))
            return sum(pipe.execute())
        except RedisError as e:
            self._failed("delete", e)
            return 0

    def pin(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [False] * len(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        return None

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
                    removed += self._delete_names(batch)
                    batch = []
            if batch:
                removed += self._delete_names(batch)
        except RedisError as e:
            self._failed("clear", e)
        return removed

    def _delete_names(self, names: list) -> int:
        pipe = self._pipeline()
        for n in names:
            pipe.delete(n)
        return sum(pipe.execute())

    def close(self) -> None:
        try:
            self.client.close()
        except RedisError:
            pass
