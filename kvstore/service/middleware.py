"""What every request of the sidecar goes through before and after its handler (aiohttp middlewares).

- `Guard.observe` (outermost): every failure becomes a JSON error `{"error": ...}` with its status
  (`ApiError`, 413 for too many keys, 400 for any other `KVStoreError`, 500 for a bug, logged: the only
  traceback a request can cause); every request is counted and timed per endpoint, and marks its
  connection busy while it runs (`listener.Connection`).
- `Guard.guard`: path sanity (no dot segments), authentication (the bearer token's `Grant` is stored on
  the request, `GRANT`), no compressed bodies (415), the body size precheck, then the handler under the
  request timeout (503; a stream already under way is cut instead, so the client sees a short stream).
- `authorize(request, namespace)`: 403 outside the token's namespaces.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from urllib.parse import unquote

from aiohttp import web

from kvstore.config import ServerConfig
from kvstore.errors import KVStoreError
from kvstore.service.auth import OPEN, Grant, TokenTable
from kvstore.service.metrics import Metrics
from kvstore.wire import TooManyKeys

log = logging.getLogger("kvstore.service")

PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
# Typed request-storage keys where this aiohttp has them (3.12+), plain strings before.
GRANT = web.RequestKey("grant", object) if hasattr(web, "RequestKey") else "grant"
STREAMING = web.RequestKey("streaming", object) if hasattr(web, "RequestKey") else "streaming"


class ApiError(Exception):
    """An answer other than success: status, message, extra headers. Rendered as `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def authorize(request: web.Request, namespace: str) -> None:
    if not request[GRANT].allows(namespace):
        raise ApiError(403, f"this token may not use namespace {namespace!r}")


class Guard:
    """The middlewares over one configuration, token table (None: no auth) and set of metrics."""

    def __init__(self, config: ServerConfig, tokens: TokenTable | None, metrics: Metrics) -> None:
        self.config = config
        self.tokens = tokens
        self.metrics = metrics

    @web.middleware
    async def observe(self, request: web.Request, handler) -> web.StreamResponse:
        """Outermost: every failure becomes a JSON error; every request is counted and timed."""
        start = time.perf_counter()
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        conn = request.protocol
        if hasattr(conn, "busy"):
            conn.busy += 1
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = json_error(e.status, e.message, e.headers)
        except TooManyKeys as e:
            resp = json_error(413, str(e))
        except KVStoreError as e:
            resp = json_error(400, str(e))
        except web.HTTPException as e:  # raised by aiohttp itself: no route, wrong method, body too large
            if e.status == 404:
                message = f"no such endpoint: {request.method} {request.path}"
            elif e.status == 405:
                message = f"method {request.method} is not allowed on {request.path}"
            else:
                message = e.text or e.reason
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "www-authenticate")}
            resp = json_error(e.status, message, headers) if e.status >= 400 else e
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            resp = json_error(500, "internal error (see the server log)")
        finally:
            if hasattr(conn, "busy"):
                conn.busy -= 1
        self.metrics.requests.labels(endpoint, request.method, str(resp.status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return resp

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Path sanity, authentication, size precheck, then the handler under the request timeout."""
        for segment in request.raw_path.split("?", 1)[0].split("/"):
            if unquote(segment) in (".", ".."):
                raise ApiError(400, "path contains a '.' or '..' segment")
        if request.path not in PUBLIC_PATHS:
            request[GRANT] = self.authenticate(request)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ApiError(415, "compressed request bodies are not taken (records carry their own codec): "
                                "send without Content-Encoding")
        limit = self.config.max_body_bytes
        if request.path != "/v1/records:batch_put" and request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"request body of {request.content_length} bytes is over the limit of {limit}")
        try:
            return await asyncio.wait_for(handler(request), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            if request.get(STREAMING) is not None:
                # Headers and some records are out: cut the connection so the client sees a short stream.
                if request.transport is not None:
                    request.transport.close()
                return request[STREAMING]
            raise ApiError(503, f"request did not complete within {self.config.request_timeout_s:g} s") from None

    def authenticate(self, request: web.Request) -> Grant:
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

