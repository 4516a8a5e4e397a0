"""The endpoints of the sidecar over one `TieredStore` (see `kvstore.service` for the list and its
guarantees). Store calls block (disk I/O, codecs), so they run on a small thread pool, never on the
event loop; every record that comes in is decoded and checked in full before it reaches the store."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib import resources
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from codec import Codec
from kvstore.chunk import Chunk
from kvstore.config import ServerConfig
from kvstore.errors import InvalidTokensError, KVStoreError
from kvstore.keys import ChunkKey, as_token_array, validate_fingerprint, validate_namespace
from kvstore.record import DEFAULT_MAX_KV_BYTES, decode_record, encode_record
from kvstore.service.metrics import Metrics
from kvstore.service.middleware import STREAMING, ApiError, authorize
from kvstore.store import TieredStore
from kvstore.wire import FRAME, keys_from_json, parse_chunk_hash, validate_path_fingerprint

_BATCH_GET_GROUP = 16  # records fetched and encoded per thread-pool call while a batch get streams out


class Service:
    """The endpoints over one store (the middlewares are `Guard`'s). `make_app` wires them into an
    aiohttp application."""

    def __init__(self, store: TieredStore, codec: Codec, config: ServerConfig, *, own_store: bool = False,
                 max_kv_bytes: int = DEFAULT_MAX_KV_BYTES) -> None:
        self.store = store
        self.codec = codec  # how GET and batch get encode records
        self.config = config
        self.own_store = own_store
        self.max_kv_bytes = max_kv_bytes
        self.prom = Metrics(store)
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="kvstore-serve")
        self.openapi = json.loads(resources.files("kvstore").joinpath("openapi.json").read_text())

    async def _run(self, fn: Callable, *args, **kwargs) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))

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
            authorize(request, ns)
        return keys

    def _path_key(self, request: web.Request) -> ChunkKey:
        m = request.match_info
        namespace = validate_namespace(m["namespace"])
        key = ChunkKey(namespace, validate_path_fingerprint(m["model"]), parse_chunk_hash(m["chunk_hash"]))
        authorize(request, namespace)
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
        authorize(request, namespace)
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
        authorize(request, namespace)
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
                request[STREAMING] = resp
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
                authorize(request, chunk.key.namespace)
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


