"""The sidecar as an application: `make_app` wires the endpoints and middlewares over a store; `serve`
runs it for `kvstore serve` (auth required unless `--insecure-no-auth`, then on loopback only)."""

from __future__ import annotations

import sys

from aiohttp import web

from codec import Codec
from kvstore.config import ServerConfig, StoreConfig
from kvstore.errors import ConfigError, KVStoreError
from kvstore.service.auth import TokenTable, is_loopback
from kvstore.service.handlers import Service
from kvstore.service.middleware import Guard
from kvstore.store import TieredStore


def make_app(store: TieredStore, codec: Codec, config: ServerConfig, tokens: TokenTable | None, *,
             own_store: bool = False) -> web.Application:
    """The aiohttp application over `store`. `tokens=None` serves without auth (the caller decides when
    that is allowed: `serve` only on loopback). With `own_store` the store is closed at cleanup."""
    svc = Service(store, codec, config, own_store=own_store)
    guard = Guard(config, tokens, svc.prom)
    app = web.Application(middlewares=[guard.observe, guard.guard], client_max_size=config.max_body_bytes)
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
    if insecure_no_auth and not is_loopback(host):
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
