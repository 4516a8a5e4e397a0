"""The sidecar service (`kvstore serve`): an aiohttp HTTP API over one `TieredStore`.

Endpoints (JSON errors `{"error": "..."}`; see `kvstore/openapi.json` and docs/SERVICE.md):
- `POST /v1/lookup`: leading stored tokens (or chunk hashes) of one namespace and model.
- `PUT|GET|HEAD|DELETE /v1/records/{namespace}/{model}/{chunk_hash}`: one record (`kvstore.record`).
- `POST /v1/records:batch_get|batch_put|batch_contains|batch_delete`: batches; records travel as a
  stream of u64-length-prefixed frames (`kvstore.wire`), length 0 for a missing record.
- `DELETE /v1/namespaces/{namespace}`: remove a namespace's unpinned chunks.
- `GET /healthz`, `GET /openapi.json` (no token), `GET /metrics` (Prometheus text, any valid token).

Guarantees:
- Bad input is a 4xx with a message, never a 500, and never reaches the store: every record is decoded
  and checked in full (header and payload checksums, the key in the header against the path's key)
  before it is stored.
- A put is acknowledged (200/201) only after the store's writes to its slower tiers have finished
  (`store.flush()`), so with a disk tier an acknowledged record survives a SIGKILL of the server.
- A bearer token reads, writes and deletes only its own namespaces (401 without a valid token, 403
  outside its namespaces). Without a tokens file the server refuses to start unless told
  `--insecure-no-auth`, and then it listens on loopback only.
- Bounded work per request: body size (413), keys per batch (413), one record in memory at a time
  while a batch put streams in, and a per-request timeout (503).
Store calls block (disk I/O, codecs), so they run on a small thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from codec import Codec
from kvstore.chunk import Chunk
from kvstore.config import ServerConfig, StoreConfig, tomllib
from kvstore.errors import ConfigError, InvalidTokensError, KVStoreError
from kvstore.keys import ChunkKey, as_token_array, validate_fingerprint, validate_namespace
from kvstore.record import DEFAULT_MAX_KV_BYTES, decode_record, encode_record
from kvstore.store import TieredStore
from kvstore.wire import FRAME, TooManyKeys, keys_from_json, parse_chunk_hash, validate_path_fingerprint

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
ALL_NAMESPACES = "*"
# Typed request-storage keys where this aiohttp has them (3.12+), plain strings before.
_GRANT = web.RequestKey("grant", object) if hasattr(web, "RequestKey") else "grant"
_STREAMING = web.RequestKey("streaming", object) if hasattr(web, "RequestKey") else "streaming"
_BATCH_GET_GROUP = 16  # records fetched and encoded per thread-pool call while a batch get streams out


# -- errors ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than success: status, message, extra headers. Rendered as `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


# -- auth -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token may touch: a set of namespaces, or all of them (None)."""

    namespaces: frozenset[str] | None
    expires: datetime | None = None  # aware; None: never

    def allows(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


OPEN = Grant(None)  # --insecure-no-auth


def _parse_expiry(value, token: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"token {token[:4]}...: expires {value!r} is not an RFC 3339 time") from None
    if not isinstance(value, datetime):
        raise ConfigError(f"token {token[:4]}...: expires must be a date-time")
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


class TokenTable:
    """Bearer token -> `Grant`. Tokens are kept as SHA-256 digests, so a lookup leaks nothing by timing.

    File format (TOML, or JSON when the name ends in .json): a table `tokens` mapping each token to the
    list of namespaces it may use (`"*"` grants every namespace), or to a table `{namespaces = [...],
    expires = 2026-12-31T00:00:00Z}` for a token that stops working at that time (RFC 3339; UTC if no
    offset is given).
    """

    def __init__(self, tokens: dict[str, list[str]]) -> None:
        self._grants: dict[bytes, Grant] = {}
        for token, entry in tokens.items():
            if not isinstance(token, str) or not token or not token.isprintable() or " " in token:
                raise ConfigError("every token must be a non-empty printable string without spaces")
            expires = None
            if isinstance(entry, dict):
                unknown = set(entry) - {"namespaces", "expires"}
                if unknown or "namespaces" not in entry:
                    raise ConfigError(f"token {token[:4]}...: a table takes `namespaces` and optionally `expires`")
                expires = _parse_expiry(entry.get("expires"), token)
                namespaces = entry["namespaces"]
            else:
                namespaces = entry
            if not isinstance(namespaces, list) or not all(isinstance(n, str) for n in namespaces):
                raise ConfigError(f"the namespaces of token {token[:4]}... must be a list of strings")
            for n in namespaces:
                if n != ALL_NAMESPACES:
                    validate_namespace(n)
            grant = Grant(None if ALL_NAMESPACES in namespaces else frozenset(namespaces), expires)
            self._grants[self._digest(token)] = grant

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    @classmethod
    def load(cls, path: str | Path) -> "TokenTable":
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read tokens file {path}: {e}") from None
        try:
            if path.suffix == ".json":
                tree = json.loads(text)
            else:
                tree = tomllib.loads(text.decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"tokens file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
        if not isinstance(tree, dict) or set(tree) != {"tokens"} or not isinstance(tree["tokens"], dict):
            raise ConfigError(f'tokens file {path} must hold exactly one table "tokens" (token -> list of namespaces)')
        if not tree["tokens"]:
            raise ConfigError(f"tokens file {path} defines no tokens")
        return cls(tree["tokens"])

    def grant(self, token: str) -> Grant | None:
        return self._grants.get(self._digest(token))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- metrics --------------------------------------------------------------------------------------------

_TIER_COUNTERS = {
    "hits": "chunks found", "misses": "chunks not found", "puts": "chunks stored",
    "put_rejected": "chunks a put could not store", "evictions": "chunks evicted",
    "corrupt": "records that failed a check", "errors": "I/O or service errors turned into misses",
    "bytes_read": "bytes read", "bytes_written": "bytes written",
}


class _StoreCollector:
    """Exports `store.stats()` at scrape time: counters per tier and of the store, usage gauges per tier."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def collect(self):
        s = self.store.stats()
        tiers = s["tiers"]
        for name, doc in _TIER_COUNTERS.items():
            fam = CounterMetricFamily(f"kvstore_tier_{name}", f"Per tier: {doc}.", labels=["tier"])
            for tier, t in tiers.items():
                fam.add_metric([tier], t["stats"][name])
            yield fam
        for name in ("used_bytes", "capacity_bytes", "entries", "pinned"):
            fam = GaugeMetricFamily(f"kvstore_tier_{name}", f"Per tier: {name.replace('_', ' ')} now.", labels=["tier"])
            for tier, t in tiers.items():
                fam.add_metric([tier], getattr(t["usage"], name))
            yield fam
        for name, value in s["store"].items():
            yield CounterMetricFamily(f"kvstore_store_{name}", f"Store counter {name}.", value=value)
        yield GaugeMetricFamily("kvstore_store_pending_bytes", "Bytes queued for the slower tiers.", value=s["pending_bytes"])


class _Metrics:
    def __init__(self, store: TieredStore) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvstore_http_requests", "HTTP requests by endpoint, method and status.",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("kvstore_http_request_seconds", "HTTP request latency by endpoint.", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.registry.register(_StoreCollector(store))


# -- the service ----------------------------------------------------------------------------------------


class Service:
    """Handlers and middlewares over one store. `make_app` wires them into an aiohttp application."""

    def __init__(self, store: TieredStore, codec: Codec, config: ServerConfig, tokens: TokenTable | None,
                 *, own_store: bool = False, max_kv_bytes: int = DEFAULT_MAX_KV_BYTES) -> None:
        self.store = store
        self.codec = codec  # how GET and batch get encode records
        self.config = config
        self.tokens = tokens  # None: no auth (--insecure-no-auth)
        self.own_store = own_store
        self.max_kv_bytes = max_kv_bytes
        self.prom = _Metrics(store)
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="kvstore-serve")
        self.openapi = json.loads(resources.files("kvstore").joinpath("openapi.json").read_text())

    async def _run(self, fn: Callable, *args, **kwargs) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))

    # -- middlewares -----------------------------------------------------------------------------------

    @web.middleware
    async def observe(self, request: web.Request, handler) -> web.StreamResponse:
        """Outermost: every failure becomes a JSON error; every request is counted and timed."""
        start = time.perf_counter()
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = _json_error(e.status, e.message, e.headers)
        except TooManyKeys as e:
            resp = _json_error(413, str(e))
        except KVStoreError as e:
            resp = _json_error(400, str(e))
        except web.HTTPException as e:  # raised by aiohttp itself: no route, wrong method, body too large
            if e.status == 404:
                message = f"no such endpoint: {request.method} {request.path}"
            elif e.status == 405:
                message = f"method {request.method} is not allowed on {request.path}"
            else:
                message = e.text or e.reason
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "www-authenticate")}
            resp = _json_error(e.status, message, headers) if e.status >= 400 else e
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            resp = _json_error(500, "internal error (see the server log)")
        self.prom.requests.labels(endpoint, request.method, str(resp.status)).inc()
        self.prom.latency.labels(endpoint).observe(time.perf_counter() - start)
        return resp

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Path sanity, authentication, size precheck, then the handler under the request timeout."""
        for segment in request.raw_path.split("?", 1)[0].split("/"):
            if unquote(segment) in (".", ".."):
                raise ApiError(400, "path contains a '.' or '..' segment")
        if request.path not in PUBLIC_PATHS:
            request[_GRANT] = self._authenticate(request)
        limit = self.config.max_body_bytes
        if request.path != "/v1/records:batch_put" and request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"request body of {request.content_length} bytes is over the limit of {limit}")
        try:
            return await asyncio.wait_for(handler(request), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            if request.get(_STREAMING) is not None:
                # Headers and some records are out: cut the connection so the client sees a short stream.
                if request.transport is not None:
                    request.transport.close()
                return request[_STREAMING]
            raise ApiError(503, f"request did not complete within {self.config.request_timeout_s:g} s") from None

    def _authenticate(self, request: web.Request) -> Grant:
        if self.tokens is None:
            return OPEN
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="kvstore"'}
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)", challenge)
        grant = self.tokens.grant(token.strip())
        if grant is None:
            raise ApiError(401, "unknown bearer token", challenge)
        if grant.expired(datetime.now(timezone.utc)):
            raise ApiError(401, f"bearer token expired at {grant.expires.isoformat()}", challenge)
        return grant

    @staticmethod
    def _authorize(request: web.Request, namespace: str) -> None:
        if not request[_GRANT].allows(namespace):
            raise ApiError(403, f"this token may not use namespace {namespace!r}")

    # -- helpers ---------------------------------------------------------------------------------------

    async def _json(self, request: web.Request) -> Any:
        raw = await request.read()  # bounded by client_max_size (413)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body is not valid JSON: {e}") from None

    async def _keys(self, request: web.Request) -> list[ChunkKey]:
        keys = keys_from_json(await self._json(request), self.config.max_batch_keys)
        for ns in {k.namespace for k in keys}:
            self._authorize(request, ns)
        return keys

    def _path_key(self, request: web.Request) -> ChunkKey:
        m = request.match_info
        namespace = validate_namespace(m["namespace"])
        key = ChunkKey(namespace, validate_path_fingerprint(m["model"]), parse_chunk_hash(m["chunk_hash"]))
        self._authorize(request, namespace)
        return key

    def _decode(self, data: bytes, what: str) -> Chunk:
        try:
            return decode_record(data, max_kv_bytes=self.max_kv_bytes)
        except KVStoreError as e:
            raise ApiError(400, f"{what} is not a valid record: {e}") from None

    def _put(self, chunks: list[Chunk]) -> list[str]:
        """Store `chunks` unless present: 'created', 'present' or 'rejected' for each (no flush)."""
        present = self.store.contains([c.key for c in chunks])
        todo = [c for c, p in zip(chunks, present) if not p]
        accepted = iter(self.store.put(todo) if todo else [])
        return ["present" if p else ("created" if next(accepted) else "rejected") for p in present]

    def _flush(self) -> None:
        if not self.store.flush(self.config.request_timeout_s):
            raise ApiError(503, "the store's writes did not finish in time; the records are not yet durable")

    def _fetch(self, keys: list[ChunkKey]) -> list[list[bytes | memoryview]]:
        """Each key's frame as the pieces to write: length prefix, then header and payload (or nothing)."""
        frames = []
        for chunk in self.store.get(keys):
            if chunk is None:
                frames.append([FRAME.pack(0)])
            else:
                header, payload = encode_record(chunk, self.codec)
                frames.append([FRAME.pack(len(header) + len(payload)), header, payload])
        return frames

    # -- public endpoints ------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "chunk_tokens": self.store.chunk_tokens})

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self._run(generate_latest, self.prom.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- lookup ----------------------------------------------------------------------------------------

    async def lookup(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        unknown = set(body) - {"namespace", "model", "tokens", "chunk_hashes"}
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        if ("tokens" in body) == ("chunk_hashes" in body):
            raise ApiError(400, "give exactly one of tokens or chunk_hashes")
        namespace = validate_namespace(body.get("namespace"))
        fingerprint = validate_fingerprint(body.get("model"))
        self._authorize(request, namespace)
        if "tokens" in body:
            try:
                tokens = as_token_array(body["tokens"])
            except (ValueError, TypeError, OverflowError) as e:
                if isinstance(e, InvalidTokensError):
                    raise
                raise InvalidTokensError(f"tokens must be a flat list of integers: {e}") from None
            n = await self._run(self.store.lookup, tokens, fingerprint=fingerprint, namespace=namespace)
            return web.json_response({"tokens": n, "chunk_tokens": self.store.chunk_tokens})
        hashes = body["chunk_hashes"]
        if not isinstance(hashes, list):
            raise ApiError(400, "chunk_hashes must be a list of hex strings")
        if len(hashes) > self.config.max_batch_keys:
            raise ApiError(413, f"{len(hashes)} chunk hashes in one lookup, over the limit of {self.config.max_batch_keys}")
        keys = [ChunkKey(namespace, fingerprint, parse_chunk_hash(h)) for h in hashes]
        found = await self._run(self.store.contains, keys) if keys else []
        n = found.index(False) if False in found else len(found)
        return web.json_response({"chunks": n})

    # -- one record ------------------------------------------------------------------------------------

    async def put_record(self, request: web.Request) -> web.Response:
        key = self._path_key(request)
        data = await request.read()
        if not data:
            raise ApiError(400, "empty body: PUT takes one record")
        chunk = await self._run(self._decode, data, "the body")
        if chunk.key != key:
            raise ApiError(400, f"the record holds {chunk.key}, not the path's {key}")
        outcome = (await self._run(self._put, [chunk]))[0]
        if outcome == "rejected":
            raise ApiError(507, "the store has no room for this record")
        await self._run(self._flush)
        return web.json_response({"result": outcome}, status=201 if outcome == "created" else 200)

    async def get_record(self, request: web.Request) -> web.Response:
        key = self._path_key(request)
        frame = (await self._run(self._fetch, [key]))[0]
        if len(frame) == 1:
            raise ApiError(404, "no such record")
        return web.Response(body=b"".join(frame[1:]), content_type="application/octet-stream")

    async def head_record(self, request: web.Request) -> web.Response:
        key = self._path_key(request)
        found = (await self._run(self.store.contains, [key]))[0]
        return web.Response(status=200 if found else 404)

    async def delete_record(self, request: web.Request) -> web.Response:
        key = self._path_key(request)
        n = await self._run(self.store.delete, [key])
        if not n:
            raise ApiError(404, "no such record")
        return web.json_response({"deleted": n})

    async def clear_namespace(self, request: web.Request) -> web.Response:
        namespace = validate_namespace(request.match_info["namespace"])
        self._authorize(request, namespace)
        return web.json_response({"removed": await self._run(self.store.clear, namespace)})

    async def bad_record_path(self, request: web.Request) -> web.Response:
        raise ApiError(400, "a record path is /v1/records/<namespace>/<model>/<chunk hash hex> "
                            "(URL-quote the model fingerprint; it may not contain '/')")

    # -- batches ---------------------------------------------------------------------------------------

    async def batch_contains(self, request: web.Request) -> web.Response:
        keys = await self._keys(request)
        found = await self._run(self.store.contains, keys) if keys else []
        return web.json_response({"present": found})

    async def batch_delete(self, request: web.Request) -> web.Response:
        keys = await self._keys(request)
        return web.json_response({"deleted": await self._run(self.store.delete, keys) if keys else 0})

    async def batch_get(self, request: web.Request) -> web.StreamResponse:
        keys = await self._keys(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "X-Record-Count": str(len(keys))})
        for i in range(0, max(len(keys), 1), _BATCH_GET_GROUP):
            frames = await self._run(self._fetch, keys[i : i + _BATCH_GET_GROUP]) if keys else []
            if not resp.prepared:
                await resp.prepare(request)
                request[_STREAMING] = resp
            for frame in frames:
                for piece in frame:
                    await resp.write(piece)
        await resp.write_eof()
        return resp

    async def batch_put(self, request: web.Request) -> web.Response:
        """Read the stream one record at a time: decode, check, authorize, store; flush at the end."""
        limit, max_records = self.config.max_body_bytes, self.config.max_batch_keys
        content = request.content
        results: list[str] = []

        def fail(status: int, message: str) -> ApiError:
            done = f" (the {len(results)} records before it were accepted)" if results else " (nothing was stored)"
            return ApiError(status, message + done)

        while True:
            i = len(results)
            try:
                prefix = await content.readexactly(FRAME.size)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise fail(400, f"record {i}: truncated length prefix")
                break
            (n,) = FRAME.unpack(prefix)
            if i >= max_records:
                raise fail(413, f"more than {max_records} records in one batch")
            if n == 0:
                raise fail(400, f"record {i}: empty frame")
            if n > limit:
                raise fail(413, f"record {i}: {n} bytes, over the limit of {limit}")
            try:
                data = await content.readexactly(n)
            except asyncio.IncompleteReadError as e:
                raise fail(400, f"record {i}: truncated, {len(e.partial)} of {n} bytes") from None
            try:
                chunk = await self._run(self._decode, data, f"record {i}")
                self._authorize(request, chunk.key.namespace)
            except ApiError as e:
                raise fail(e.status, e.message) from None
            del data
            results.append((await self._run(self._put, [chunk]))[0])
        if results:
            await self._run(self._flush)
        return web.json_response({"results": results})

    # -- lifecycle -------------------------------------------------------------------------------------

    async def on_cleanup(self, app: web.Application) -> None:
        if self.own_store:
            await self._run(self.store.close)
        self.pool.shutdown(wait=False)


def make_app(store: TieredStore, codec: Codec, config: ServerConfig, tokens: TokenTable | None, *,
             own_store: bool = False) -> web.Application:
    """The aiohttp application over `store`. `tokens=None` serves without auth (the caller decides when
    that is allowed: `serve` only on loopback). With `own_store` the store is closed at cleanup."""
    svc = Service(store, codec, config, tokens, own_store=own_store)
    app = web.Application(middlewares=[svc.observe, svc.guard], client_max_size=config.max_body_bytes)
    r = app.router
    r.add_get("/healthz", svc.healthz, allow_head=False)
    r.add_get("/openapi.json", svc.openapi_json, allow_head=False)
    r.add_get("/metrics", svc.metrics, allow_head=False)
    r.add_post("/v1/lookup", svc.lookup)
    r.add_post("/v1/records:batch_get", svc.batch_get)
    r.add_post("/v1/records:batch_put", svc.batch_put)
    r.add_post("/v1/records:batch_contains", svc.batch_contains)
    r.add_post("/v1/records:batch_delete", svc.batch_delete)
    record = "/v1/records/{namespace}/{model}/{chunk_hash}"  # {model}: the fingerprint (v1 protocol name)
    r.add_put(record, svc.put_record)
    r.add_get(record, svc.get_record, allow_head=False)
    r.add_head(record, svc.head_record)
    r.add_delete(record, svc.delete_record)
    r.add_route("*", "/v1/records/{tail:.*}", svc.bad_record_path)
    r.add_delete("/v1/namespaces/{namespace}", svc.clear_namespace)
    app.on_cleanup.append(svc.on_cleanup)
    return app


def server_codec(config: StoreConfig) -> Codec:
    """GET answers with records in the disk tier's codec (raw when there is no disk tier)."""
    from codec import make_codec

    return config.disk.make_codec() if config.disk is not None else make_codec("raw")


def serve(config: StoreConfig, *, host: str | None = None, port: int | None = None, insecure_no_auth: bool = False) -> int:
    """Run the service until SIGINT/SIGTERM; the store is flushed and closed on the way out."""
    from kvstore.config import build_store

    sc = config.server
    host = host or sc.host
    port = sc.port if port is None else port
    if sc.tokens_file is not None and insecure_no_auth:
        raise ConfigError("--insecure-no-auth and server.tokens_file exclude each other")
    if sc.tokens_file is None and not insecure_no_auth:
        raise ConfigError("no server.tokens_file is configured: set one (see docs/SERVICE.md), "
                          "or pass --insecure-no-auth to serve without auth on loopback only")
    if insecure_no_auth and not _is_loopback(host):
        raise ConfigError(f"--insecure-no-auth serves on loopback only, not on {host!r}")
    tokens = TokenTable.load(sc.tokens_file) if sc.tokens_file is not None else None
    store = build_store(config)
    app = make_app(store, server_codec(config), sc, tokens, own_store=True)
    mode = "WITHOUT AUTH (loopback only)" if tokens is None else f"tokens from {sc.tokens_file}"

    async def announce(app: web.Application) -> None:
        print(f"kvstore serve: listening on http://{host}:{port}, {mode}, tiers "
              f"{', '.join(t.name for t in store.tiers)}", file=sys.stderr, flush=True)

    app.on_startup.append(announce)
    try:
        web.run_app(app, host=host, port=port, access_log=None, print=None, handle_signals=True, shutdown_timeout=5.0)
    except OSError as e:
        store.close()
        raise KVStoreError(f"cannot listen on {host}:{port}: {e}") from None
    return 0
