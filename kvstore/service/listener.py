"""Where the sidecar meets its sockets: connections with the limits a storage service needs.

`Connection` is aiohttp's `RequestHandler` (one per connection) with:
- a cap on open connections (`server.max_connections`, and never more than half of the process's file
  descriptors, so that a flood of sockets cannot starve the store of files). At the cap a new connection
  closes the one idle longest (no request in flight, nothing left to send, quiet for `IDLE_GRACE_S`);
  when none is idle, the newcomer gets a 503 and is closed. Idle sockets therefore never lock out a
  client that has something to ask;
- `server.idle_timeout_s`: a connection without a request in flight is closed after this long, an idle
  keep-alive as well as one whose request line or headers never finish (a request whose body never
  finishes is bounded by `server.request_timeout_s`);
- errors of the HTTP parser (a malformed request line or header, a line too long, a bad chunk): a 400
  with a JSON message that quotes nothing the client sent (a header may hold a token), logged at debug
  level without a traceback; only a bug (a 500 outside the middlewares) is logged with one;
- no automatic decompression of bodies (`Content-Encoding` other than identity is refused: 415).
`Listener(runner, config).start(host, port)` listens with these connections over a set-up `AppRunner`;
`close()` stops listening (the runner's cleanup then closes the connections).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

from aiohttp import web

from kvstore.config import ServerConfig

log = logging.getLogger("kvstore.service")

IDLE_GRACE_S = 1.0  # a connection that sent something this recently is never closed to make room
READ_BUFSIZE = 4 << 20  # body bytes buffered per connection before reading pauses (records are MiBs)
_REFUSED_BODY = b'{"error": "too many connections: try again shortly"}'
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))


def connection_limit(configured: int) -> int:
    """`configured`, but never more than half the file descriptors this process may open."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return configured if soft == resource.RLIM_INFINITY else max(1, min(configured, soft // 2))


class Connection(web.RequestHandler):
    def __init__(self, manager: web.Server, listener: "Listener") -> None:
        config = listener.config
        super().__init__(manager, loop=listener.loop, keepalive_timeout=config.idle_timeout_s, access_log=None,
                         lingering_time=min(config.idle_timeout_s, 5.0), read_bufsize=READ_BUFSIZE,
                         auto_decompress=False)
        self.listener = listener
        self.busy = 0  # requests inside the middlewares (`Guard.observe` counts them)
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.listener.admit(self):
            transport.write(REFUSED)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.listener.connections.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        super().data_received(data)

    def idle(self, now: float) -> bool:
        t = self.transport
        return (not self.busy and t is not None and not t.is_closing() and t.get_write_buffer_size() == 0
                and now - self.last_active >= IDLE_GRACE_S)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse (or a bug outside the middlewares): a JSON error that quotes
        nothing of the request; a traceback is logged for a bug alone."""
        if status >= 500:
            log.error("unexpected error on a request", exc_info=exc)
            text = "internal error (see the server log)"
        else:
            log.debug("malformed request (%s, HTTP %d)", type(exc).__name__, status)
            text = f"malformed HTTP request ({type(exc).__name__ if exc is not None else status})"
        resp = web.json_response({"error": text}, status=status)
        resp.force_close()
        return resp


class Listener:
    def __init__(self, runner: web.AppRunner, config: ServerConfig) -> None:
        if runner.server is None:
            raise RuntimeError("set up the runner before listening")
        self.manager = runner.server
        self.config = config
        self.connections: set[Connection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._last_resource_warning = 0.0

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; returns the port bound."""
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(self._loop_error)
        self._server = await self.loop.create_server(lambda: Connection(self.manager, self), host, port,
                                                     reuse_address=True, backlog=1024)
        return self._server.sockets[0].getsockname()[1]

    @property
    def limit(self) -> int:
        """The cap now (read each time: the file limit may change under a running process)."""
        return connection_limit(self.config.max_connections)

    def admit(self, conn: Connection) -> bool:
        """Room for `conn`: under the cap, or by closing the connection idle longest; False if neither."""
        if len(self.connections) >= self.limit:
            now = time.monotonic()
            victim = min((c for c in self.connections if c.idle(now)), key=lambda c: c.last_active, default=None)
            if victim is None:
                return False
            self.connections.discard(victim)
            victim.force_close()
        self.connections.add(conn)
        return True

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """Out of descriptors on accept (the loop retries a second later): one line, at most every 10 s,
        instead of a traceback per attempt."""
        if isinstance(context.get("exception"), OSError) and "accept" in context.get("message", ""):
            now = time.monotonic()
            if now - self._last_resource_warning >= 10:
                self._last_resource_warning = now
                log.warning("cannot accept connections: %s (%d open)", context["exception"], len(self.connections))
            return
        loop.default_exception_handler(context)
