"""The sidecar as an application: `make_app` wires the endpoints and middlewares over a store; `listen`
serves an application with the service's own connections (`listener`); `serve` runs it all for
`kvstore serve` (auth required unless `--insecure-no-auth`, then on loopback only)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import signal
import sys

from aiohttp import web

from kvstore.config import ServerConfig, StoreConfig
from kvstore.errors import ConfigError, KVStoreError
from kvstore.service.auth import TokenTable, is_loopback
from kvstore.service.handlers import Service
from kvstore.service.listener import Listener
from kvstore.service.middleware import Guard
from kvstore.store import TieredStore

SERVER_CONFIG = web.AppKey("server_config", ServerConfig) if hasattr(web, "AppKey") else "server_config"


def make_app(store: TieredStore, config: ServerConfig, tokens: TokenTable | None, *,
             own_store: bool = False) -> web.Application:
    """The aiohttp application over `store` (a store with byte tiers: `build_store(config, records=True)`).
    `tokens=None` serves without auth (the caller decides when that is allowed: `serve` only on loopback).
    With `own_store` the store is closed at cleanup."""
    svc = Service(store, config, own_store=own_store)
    guard = Guard(config, tokens, svc.prom)
    app = web.Application(middlewares=[guard.observe, guard.guard], client_max_size=config.max_body_bytes)
    app[SERVER_CONFIG] = config
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


async def listen(app: web.Application, host: str, port: int, *,
                 shutdown_timeout: float = 5.0) -> tuple[web.AppRunner, Listener, int]:
    """Serve `app` on host:port with the service's connections: (runner, listener, bound port). Stop with
    `listener.close()`, then `await runner.cleanup()` (requests in flight get `shutdown_timeout` s)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    listener = Listener(runner, app[SERVER_CONFIG])
    try:
        bound = await listener.start(host, port)
    except BaseException:
        await runner.cleanup()
        raise
    return runner, listener, bound


def _more_descriptors() -> None:
    """Raise the soft limit on open files to the hard one: sockets and record files share it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _keep_freed_buffers() -> None:
    """glibc maps every buffer past its threshold (at most 32 MiB) afresh and returns it at free, so each
    record-sized body costs a page fault per 4 KiB; measured on a VM, copying 32 MiB into a fresh buffer
    ran at 0.6 GB/s and into a reused one at 4.4 GB/s. Records are the server's working set: keep freed
    buffers for reuse (the heap then stays at its high-water mark)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


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
    _more_descriptors()
    _keep_freed_buffers()
    store = build_store(config, records=True)
    app = make_app(store, sc, tokens, own_store=True)
    mode = "WITHOUT AUTH (loopback only)" if tokens is None else f"tokens from {sc.tokens_file}"
    # A server's operator wants its warnings (refused puts, quarantined records) at the default level.
    logging.getLogger("kvstore").setLevel(min(logging.getLogger().getEffectiveLevel(), logging.WARNING))

    async def run() -> None:
        try:
            runner, listener, _ = await listen(app, host, port)
        except OSError as e:
            raise KVStoreError(f"cannot listen on {host}:{port}: {e}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"kvstore serve: listening on http://{host}:{port}, {mode}, tiers "
              f"{', '.join(t.name for t in store.tiers)}, puts survive: {store.durability} "
              f"(at most {listener.limit} connections)", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            listener.close()
            await runner.cleanup()

    try:
        asyncio.run(run())
    finally:
        store.close()
    return 0
