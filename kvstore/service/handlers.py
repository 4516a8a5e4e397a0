"""The endpoints of the sidecar over one `TieredStore` (see `kvstore.service` for the list and its
guarantees): a record server. Records come in as bytes, are checked (header, key, codec, both checksums,
the KV they decode to against `server.kv_limit`) without being decoded, and are stored as they came; they
go out as stored (`bodies.respond_records`: sendfile from disk, memoryviews from memory). Store calls
block (disk I/O, checksums), so they run on a small thread pool, never on the event loop; so does JSON
parsing. A put is acknowledged once the store's durable tier has the record, and the answer names what
that survives (`durability`); a put it refused is a 507."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib import resources
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvstore.config import ServerConfig
from kvstore.errors import ConfigError, InvalidTokensError, KVStoreError, RecordTooLargeError
from kvstore.keys import ChunkKey, as_token_array, validate_fingerprint, validate_namespace
from kvstore.record import verify_record
from kvstore.service.auth import Grant
from kvstore.service.bodies import read_json, respond_records
from kvstore.service.metrics import Metrics
from kvstore.service.middleware import GRANT, ApiError, authorize
from kvstore.store import TieredStore
from kvstore.tiers.byte_tier import ByteTier
from kvstore.wire import FRAME, keys_from_json, parse_chunk_hash, validate_path_fingerprint

log = logging.getLogger("kvstore.service")

RECORD_METHODS = ("GET", "HEAD", "PUT", "DELETE")


class Service:
    """The endpoints over one store (the middlewares are `Guard`'s). `make_app` wires them into an
    aiohttp application."""

    def __init__(self, store: TieredStore, config: ServerConfig, *, own_store: bool = False) -> None:
        if not any(isinstance(t, ByteTier) for t in store.tiers):
            raise ConfigError("the sidecar stores records: its store needs a byte tier (disk, or memory built "
                              "for records: build_store(config, records=True))")
        self.store = store
        self.config = config
        self.own_store = own_store
        self.prom = Metrics(store)
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="kvstore-serve")
        self.openapi = resources.files("kvstore").joinpath("openapi.json").read_bytes()

    async def _run(self, fn: Callable, *args, **kwargs) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))

    # -- helpers ---------------------------------------------------------------------------------------

    async def _json(self, request: web.Request, convert: Callable[[Any], Any] = lambda x: x) -> Any:
        return await read_json(request, min(self.config.max_json_bytes, self.config.max_body_bytes), self._run, convert)

    async def _keys(self, request: web.Request) -> list[ChunkKey]:
        keys = await self._json(request, lambda obj: keys_from_json(obj, self.config.max_batch_keys))
        for ns in {k.namespace for k in keys}:
            authorize(request, ns)
        return keys

    def _path_key(self, request: web.Request) -> ChunkKey:
        m = request.match_info
        namespace = validate_namespace(m["namespace"])
        key = ChunkKey(namespace, validate_path_fingerprint(m["model"]), parse_chunk_hash(m["chunk_hash"]))
        authorize(request, namespace)
        return key

    def _take(self, data: bytes, key: ChunkKey | None, grant: Grant, what: str) -> str:
        """Check one record (against `key`, where given) and store it as it came, unless present:
        'created', 'present' or 'rejected' (the durable tier refused it)."""
        try:
            header = verify_record(data, key=key, max_kv_bytes=self.config.kv_limit)
        except RecordTooLargeError as e:
            raise ApiError(413, f"{what}: {e} (server.max_kv_bytes)") from None
        except KVStoreError as e:
            raise ApiError(400, f"{what} is not a valid record: {e}") from None
        if not grant.allows(header.key.namespace):
            raise ApiError(403, f"this token may not use namespace {header.key.namespace!r}")
        if self.store.contains([header.key])[0]:
            return "present"
        return "created" if self.store.put_records([header.key], [data])[0] else "rejected"

    def _stored(self, body: dict, status: int) -> web.Response:
        durability = self.store.durability
        return web.json_response({**body, "durability": durability}, status=status,
                                 headers={"Kvstore-Durability": durability})

    # -- public endpoints ------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "chunk_tokens": self.store.chunk_tokens,
                                  "durability": self.store.durability})

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self._run(generate_latest, self.prom.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- lookup ----------------------------------------------------------------------------------------

    async def lookup(self, request: web.Request) -> web.Response:
        namespace, fingerprint, query = await self._json(request, self._lookup_query)
        authorize(request, namespace)
        if isinstance(query, list):  # chunk keys
            found = await self._run(self.store.contains, query) if query else []
            return web.json_response({"chunks": found.index(False) if False in found else len(found)})
        n = await self._run(self.store.lookup, query, fingerprint=fingerprint, namespace=namespace)
        return web.json_response({"tokens": n, "chunk_tokens": self.store.chunk_tokens})

    def _lookup_query(self, body: Any) -> tuple[str, str, Any]:
        """(namespace, fingerprint, token array or chunk keys) of a lookup body (on the thread pool)."""
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        unknown = set(body) - {"namespace", "model", "tokens", "chunk_hashes"}
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        if ("tokens" in body) == ("chunk_hashes" in body):
            raise ApiError(400, "give exactly one of tokens or chunk_hashes")
        namespace = validate_namespace(body.get("namespace"))
        fingerprint = validate_fingerprint(body.get("model"))
        limit = self.config.max_batch_keys
        if "tokens" in body:
            tokens = body["tokens"]
            if isinstance(tokens, list) and len(tokens) > limit * self.store.chunk_tokens:
                raise ApiError(413, f"{len(tokens)} tokens in one lookup, over the limit of {limit} chunks")
            try:
                return namespace, fingerprint, as_token_array(tokens)
            except (ValueError, TypeError, OverflowError) as e:
                if isinstance(e, InvalidTokensError):
                    raise
                raise InvalidTokensError(f"tokens must be a flat list of integers: {e}") from None
        hashes = body["chunk_hashes"]
        if not isinstance(hashes, list):
            raise ApiError(400, "chunk_hashes must be a list of hex strings")
        if len(hashes) > limit:
            raise ApiError(413, f"{len(hashes)} chunk hashes in one lookup, over the limit of {limit}")
        return namespace, fingerprint, [ChunkKey(namespace, fingerprint, parse_chunk_hash(h)) for h in hashes]

    # -- one record ------------------------------------------------------------------------------------

    async def put_record(self, request: web.Request) -> web.Response:
        key = self._path_key(request)
        data = await request.read()  # bounded by client_max_size (413)
        if not data:
            raise ApiError(400, "empty body: PUT takes one record")
        outcome = await self._run(self._take, data, key, request[GRANT], "the body")
        if outcome == "rejected":
            raise ApiError(507, "the store could not make this record durable (no room, or an I/O error); "
                                "nothing was stored")
        return self._stored({"result": outcome}, 201 if outcome == "created" else 200)

    async def get_record(self, request: web.Request) -> web.StreamResponse:
        key = self._path_key(request)
        record = (await self._run(self.store.get_records, [key]))[0]
        if record is None:
            raise ApiError(404, "no such record")
        return await respond_records(request, [record], frames=False)

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
        authorize(request, namespace)
        return web.json_response({"removed": await self._run(self.store.clear, namespace)})

    async def bad_record_path(self, request: web.Request) -> web.Response:
        if request.method not in RECORD_METHODS:
            raise ApiError(405, f"method {request.method} is not allowed on {request.path}",
                           {"Allow": ", ".join(RECORD_METHODS)})
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
        unique = list(dict.fromkeys(keys))  # a key asked for twice is fetched (and held) once
        found = dict(zip(unique, await self._run(self.store.get_records, unique))) if unique else {}
        return await respond_records(request, [found[k] for k in keys], frames=True)

    async def batch_put(self, request: web.Request) -> web.Response:
        """Read the stream one record at a time: check, authorize, store; each is durable (or refused)
        before the next is read. 507 if the store refused any (`results` says which)."""
        limit, max_records = self.config.max_body_bytes, self.config.max_batch_keys
        content = request.content
        results: list[str] = []

        def fail(status: int, message: str) -> ApiError:
            done = f" (the {len(results)} records before it were taken)" if results else " (nothing was stored)"
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
                results.append(await self._run(self._take, data, None, request[GRANT], f"record {i}"))
            except ApiError as e:
                raise fail(e.status, e.message) from None
            del data
        if "rejected" in results:
            return self._stored({"error": f"the store could not make {results.count('rejected')} of "
                                          f"{len(results)} records durable (no room, or an I/O error)",
                                 "results": results}, 507)
        return self._stored({"results": results}, 200)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def on_cleanup(self, app: web.Application) -> None:
        if self.own_store:
            await self._run(self.store.close)
        self.pool.shutdown(wait=False)


