"""Sidecar tier: the client of a `kvstore serve` sidecar over HTTP (see `kvstore.service`, docs/SERVICE.md).

Every call is one request per batch of up to `max_batch_keys` keys on a pooled keep-alive connection:
`contains` -> `batch_contains`, `get` -> `batch_get` (a stream of length-prefixed records, checked and
decoded one at a time as they arrive), `put` -> `batch_put` (the same framing), `delete` ->
`batch_delete`. Records travel in the record format with `codec` and are checked on arrival like in any
byte tier (`ByteTier`): header and payload checksums, and the key in the record against the key asked
for; a bad one is a miss, counted as corrupt.

Degrade, don't fail: every request has a timeout. When the sidecar is unreachable, too slow, answers 5xx
or rejects the token, the tier marks itself down for `retry_after` seconds: meanwhile `contains`/`get`
answer misses at once and `put` drops its chunks (counted), so the engine recomputes instead of
waiting. Read-only requests (which are idempotent) are retried once on a connection error, never after
a timeout, so a slow sidecar costs at most one timeout per call. Puts run on the store's writer thread,
so they get a longer read timeout (the sidecar answers once the records are durable). Pins are local to
the sidecar's own store, so `pin` answers False.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Sequence
from urllib.parse import quote

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from codec import Codec
from kvstore.errors import TierError
from kvstore.keys import ChunkKey
from kvstore.record import DEFAULT_MAX_KV_BYTES
from kvstore.tiers.base import TierUsage
from kvstore.tiers.byte_tier import RecordParts, RemoteTier
from kvstore.wire import FRAME, key_to_json

log = logging.getLogger(__name__)


class _Unavailable(Exception):
    """The sidecar could not serve a request (network, timeout, 5xx, auth, a short stream)."""


class SidecarTier(RemoteTier):

    def __init__(
        self,
        base_url: str,
        token: str,
        codec: Codec,
        *,
        timeout: float = 1.0,
        retry_after: float = 2.0,
        put_timeout: float | None = None,
        max_batch_keys: int = 256,
        max_kv_bytes: int = DEFAULT_MAX_KV_BYTES,
        pool_size: int = 4,
        name: str = "sidecar",
    ) -> None:
        try:
            url = urllib3.util.parse_url(base_url)
        except urllib3.exceptions.LocationParseError as e:
            raise TierError(f"sidecar URL {base_url!r} does not parse: {e}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise TierError(f"sidecar URL must be http(s)://host[:port], got {base_url!r}")
        super().__init__(name, base_url, codec, retry_after=retry_after, max_kv_bytes=max_kv_bytes)
        self.max_batch_keys = max_batch_keys
        self._prefix = (url.path or "").rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._put_timeout = urllib3.Timeout(connect=timeout, read=put_timeout or 10 * timeout)
        self._pool = urllib3.connection_from_url(f"{url.scheme}://{url.netloc}", maxsize=pool_size, block=False,
                                                 retries=False, timeout=self._timeout)

    # -- requests ------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, body: bytes | None = None, json_body: Any = None,
                 read_only: bool, stream: bool = False, timeout: urllib3.Timeout | None = None) -> urllib3.BaseHTTPResponse:
        """One request -> its 2xx response. `TierError` for 400/413 (this request is refused: logged, the
        tier stays up); `_Unavailable` for anything else (network, timeout, 401/403, 404, 5xx)."""
        headers = dict(self._headers)
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        attempts = 2 if read_only else 1
        for attempt in range(attempts):
            try:
                resp = self._pool.urlopen(method, self._prefix + path, body=body, headers=headers, retries=False,
                                          redirect=False, preload_content=not stream, timeout=timeout or self._timeout)
                break
            except Urllib3Timeout as e:
                raise _Unavailable(f"timed out: {e}") from None
            except (Urllib3Error, OSError) as e:
                if attempt + 1 == attempts:
                    raise _Unavailable(str(e)) from None
        if resp.status < 300:
            return resp
        message = self._error_message(resp, stream)
        if resp.status in (400, 413):
            # This request, not the sidecar: a bug or a limit mismatch (max_batch_keys, max_body_bytes).
            raise TierError(f"sidecar refused {method} {path}: HTTP {resp.status}: {message}")
        raise _Unavailable(f"HTTP {resp.status}: {message}")

    @staticmethod
    def _error_message(resp: urllib3.BaseHTTPResponse, stream: bool) -> str:
        try:
            data = resp.read(1 << 16) if stream else resp.data
            return str(json.loads(data).get("error"))
        except Exception:
            return resp.reason or ""
        finally:
            if stream:
                resp.close()
            resp.release_conn()

    @staticmethod
    def _json(resp: urllib3.BaseHTTPResponse) -> dict:
        try:
            obj = json.loads(resp.data)
        except ValueError as e:
            raise _Unavailable(f"answer is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise _Unavailable("answer is not a JSON object")
        return obj

    @staticmethod
    def _read_exact(resp: urllib3.BaseHTTPResponse, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            data = resp.read(n - got)
            if not data:
                raise _Unavailable(f"record stream ended early ({got} of {n} bytes)")
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _groups(self, items: Sequence) -> range:
        return range(0, len(items), self.max_batch_keys)

    # -- protocol ------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey], tokens=None) -> list[bool]:
        if not keys or not self.available():
            return [False] * len(keys)
        found: list[bool] = []
        with self._call("contains"):
            for start in self._groups(keys):
                group = keys[start : start + self.max_batch_keys]
                resp = self._request("POST", "/v1/records:batch_contains", json_body=[key_to_json(k) for k in group], read_only=True)
                present = self._json(resp).get("present")
                if not isinstance(present, list) or len(present) != len(group):
                    raise _Unavailable("batch_contains answered the wrong number of keys")
                found += [bool(p) for p in present]
        return found + [False] * (len(keys) - len(found))

    def _sources(self, keys: Sequence[ChunkKey]) -> Iterator[tuple[int, bytes, int]]:
        """Each group's records as the stream delivers them: one record in memory at a time."""
        with self._call("get"):
            for start in self._groups(keys):
                group = keys[start : start + self.max_batch_keys]
                resp = self._request("POST", "/v1/records:batch_get", json_body=[key_to_json(k) for k in group],
                                     read_only=True, stream=True)
                clean = False
                try:
                    for j in range(len(group)):
                        (n,) = FRAME.unpack(self._read_exact(resp, FRAME.size))
                        if n == 0:
                            continue
                        if n > 2 * self.max_kv_bytes + (1 << 20):
                            raise _Unavailable(f"record frame of {n} bytes is implausible")
                        yield start + j, self._read_exact(resp, n), n
                    if resp.read(1):
                        raise _Unavailable("record stream is longer than the keys asked for")
                    clean = True
                finally:
                    if not clean:
                        resp.close()  # unread bytes on the connection: never reuse it
                    resp.release_conn()

    def _write(self, keys: Sequence[ChunkKey], records: Sequence[RecordParts]) -> tuple[list[bool], int, int]:
        ok: list[bool] = []
        nbytes = 0
        with self._call("put"):
            for start in self._groups(keys):
                group = records[start : start + self.max_batch_keys]
                parts = []
                for record in group:
                    parts += [FRAME.pack(sum(len(p) for p in record)), *record]
                body = b"".join(parts)
                resp = self._request("POST", "/v1/records:batch_put", body=body, read_only=False, timeout=self._put_timeout)
                results = self._json(resp).get("results")
                if not isinstance(results, list) or len(results) != len(group):
                    raise _Unavailable("batch_put answered the wrong number of records")
                ok += [r in ("created", "present") for r in results]
                nbytes += len(body)
        return ok + [False] * (len(keys) - len(ok)), sum(ok), nbytes

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        if not keys or not self.available():
            return 0
        deleted = 0
        with self._call("delete"):
            for start in self._groups(keys):
                group = keys[start : start + self.max_batch_keys]
                resp = self._request("POST", "/v1/records:batch_delete", json_body=[key_to_json(k) for k in group], read_only=False)
                deleted += int(self._json(resp).get("deleted", 0))
        return deleted

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Around the requests of one call: the sidecar unavailable marks the tier down; a request it
        refuses (400, 413) is counted and logged, and the tier stays up."""
        try:
            yield
        except _Unavailable as e:
            self._failed(what, e)
        except TierError as e:
            self.stats.add(errors=1)
            log.warning("sidecar tier %s: %s", self.url, e)

    def usage(self) -> TierUsage:
        """Not reported: the sidecar's usage is on its own /metrics."""
        return TierUsage(0, 0, 0, 0)

    def clear(self, namespace: str | None = None) -> int:
        """Clear one namespace on the sidecar. A shared sidecar is never wiped wholesale by a client:
        `clear(None)` does nothing and answers 0."""
        if namespace is None:
            log.warning("sidecar tier %s: clear without a namespace is not sent to a shared sidecar", self.url)
            return 0
        if not self.available():
            return 0
        with self._call("clear"):
            resp = self._request("DELETE", f"/v1/namespaces/{quote(namespace, safe='')}", read_only=False)
            return int(self._json(resp).get("removed", 0))
        return 0

    def close(self) -> None:
        self._pool.close()
