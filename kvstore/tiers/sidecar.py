"""Sidecar tier: the client of a `kvstore serve` sidecar over HTTP (see `kvstore.service`, docs/SERVICE.md).

Every call is one request per batch of up to `max_batch_keys` keys on a pooled keep-alive connection:
`contains` -> `batch_contains`, `get` -> `batch_get` (a stream of length-prefixed records, checked and
decoded one at a time as they arrive, a raw payload read from the socket straight into the output
tensor), `put` -> `batch_put` (the same framing; the record's buffers are sent as they are, never joined),
`delete` -> `batch_delete`. Records travel in the record format with `codec`; the sidecar stores and
serves them as they came. They are checked on arrival like in any byte tier (`ByteTier`): header and
payload checksums, and the key in the record against the key asked for; a bad one is a miss, counted
as corrupt. A put the sidecar could not make durable (507) is a refused put (False), not an outage.

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
from kvstore.chunk import Chunk
from kvstore.errors import TierError
from kvstore.keys import ChunkKey
from kvstore.record import DEFAULT_MAX_KV_BYTES, read_record
from kvstore.tiers.base import TierUsage
from kvstore.tiers.byte_tier import RecordBytes, RecordParts, RemoteTier
from kvstore.wire import FRAME, key_to_json

log = logging.getLogger(__name__)


class _Unavailable(ConnectionError):
    """The sidecar could not serve a request (network, timeout, 5xx, auth, a short stream). An OSError:
    met while a record is read, it is that key's miss, and the tier is then marked down."""


class _Frame:
    """The next `left` bytes of a response, as the stream `read_record` reads a record from; the bytes
    go from the socket straight into the caller's buffer (`readinto`)."""

    def __init__(self, resp: urllib3.BaseHTTPResponse, n: int) -> None:
        # urllib3 copies what it reads once more; the http.client response underneath reads into place.
        fp = getattr(resp, "_fp", None)
        self._raw = fp if fp is not None and hasattr(fp, "readinto") else resp
        self.left = n

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")[: self.left]
        n = self._raw.readinto(view) if view else 0
        if not n and self.left:
            raise _Unavailable(f"record stream ended early ({self.left} bytes missing)")
        self.left -= n
        return n

    def read(self, n: int) -> bytes:
        buf = bytearray(min(n, self.left))
        got = 0
        while got < len(buf):
            got += self.readinto(memoryview(buf)[got:])
        return bytes(buf)

    def more(self) -> bool:
        """Whether the response goes on past what this frame was given (a stream longer than announced)."""
        return bool(self._raw.read(1))

    def skip(self) -> None:
        """Read past what the caller left unread (a record that failed a check before its payload)."""
        scratch = memoryview(bytearray(min(self.left, 1 << 20)))
        while self.left:
            self.readinto(scratch)


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

    def _request(self, method: str, path: str, *, body: list | None = None, json_body: Any = None,
                 read_only: bool, stream: bool = False, timeout: urllib3.Timeout | None = None,
                 answers: tuple[int, ...] = ()) -> urllib3.BaseHTTPResponse:
        """One request -> its 2xx response (or one whose status is in `answers`). `body`: buffers sent
        back to back, unjoined. `TierError` for 400/413 (this request is refused: logged, the tier stays
        up); `_Unavailable` for anything else (network, timeout, 401/403, 404, 5xx)."""
        headers = dict(self._headers)
        if json_body is not None:
            body = [json.dumps(json_body).encode()]
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        if body is not None:
            headers["Content-Length"] = str(sum(memoryview(b).nbytes for b in body))
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
        if resp.status < 300 or resp.status in answers:
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
        return _Frame(resp, n).read(n)

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

    def _sources(self, keys: Sequence[ChunkKey]) -> Iterator[tuple[int, _Frame, int]]:
        """Each group's records as the stream delivers them, each read in place by `_read` / `_hold`."""
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
                        frame = _Frame(resp, n)
                        yield start + j, frame, n
                        frame.skip()
                    if _Frame(resp, 0).more():
                        raise _Unavailable("record stream is longer than the keys asked for")
                    clean = True
                finally:
                    if not clean:
                        resp.close()  # unread bytes on the connection: never reuse it
                    resp.release_conn()

    def _read(self, source: _Frame, key: ChunkKey | None, out) -> Chunk | None:
        return read_record(source, out, key=key, max_kv_bytes=self.max_kv_bytes, size=source.left)

    def _hold(self, source: _Frame, size: int) -> RecordBytes | None:
        return RecordBytes(size, data=source.read(size))

    def _write(self, keys: Sequence[ChunkKey], records: Sequence[RecordParts]) -> tuple[list[bool], int, int]:
        ok: list[bool] = []
        nbytes = 0
        with self._call("put"):
            for start in self._groups(keys):
                group = records[start : start + self.max_batch_keys]
                body = []
                for record in group:
                    body += [FRAME.pack(sum(memoryview(p).nbytes for p in record)), *record]
                resp = self._request("POST", "/v1/records:batch_put", body=body, read_only=False,
                                     timeout=self._put_timeout, answers=(507,))
                results = self._json(resp).get("results")  # 507: some were refused, `results` says which
                if not isinstance(results, list) or len(results) != len(group):
                    raise _Unavailable("batch_put answered the wrong number of records")
                ok += [r in ("created", "present") for r in results]
                nbytes += sum(memoryview(b).nbytes for b in body)
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
