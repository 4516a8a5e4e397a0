"""Real sidecar servers for the tests, on free loopback ports.

- `ServiceThread`: an aiohttp app from `kvstore.service.make_app` served with the service's own
  connections (`kvstore.service.listen`) on its own event loop in a thread (a real socket, so synchronous
  clients such as `SidecarTier` can call it from the test thread); stop and start it again on the same
  port to play a sidecar that goes away and comes back.
(`ServeProcess`, `kvstore serve` in a subprocess, lives in `benchmarks.servers` beside the Redis servers.)
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

from aiohttp import web

from benchmarks.servers import free_port
from kvstore.service import listen


class ServiceThread:
    def __init__(self, app_factory: Callable[[], web.Application], port: int | None = None) -> None:
        self.app_factory = app_factory
        self.port = port or free_port()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServiceThread":
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                runner, listener, _ = loop.run_until_complete(listen(self.app_factory(), "127.0.0.1", self.port,
                                                                         shutdown_timeout=0.2))
            except BaseException as e:  # reported to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            listener.close()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self.loop = loop
        self.thread = threading.Thread(target=run, name=f"service-{self.port}", daemon=True)
        self.thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop = self.thread = None
