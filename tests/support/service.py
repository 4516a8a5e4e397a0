"""Real sidecar servers for the tests, on free loopback ports.

- `ServiceThread`: an aiohttp app from `kvstore.service.make_app` served on its own event loop in a
  thread (a real socket, so synchronous clients such as `HttpTier` can call it from the test thread);
  stop and start it again on the same port to play a sidecar that goes away and comes back.
- `ServeProcess`: `python -m kvstore serve` as a subprocess, for restarts and SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import urllib3
from aiohttp import web

from tests.support.redis_servers import free_port

ROOT = Path(__file__).resolve().parents[2]


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
            runner = web.AppRunner(self.app_factory(), access_log=None, shutdown_timeout=0.2)
            try:
                loop.run_until_complete(runner.setup())
                loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            except BaseException as e:  # reported to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
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


class ServeProcess:
    """`kvstore serve` in a subprocess with the given `--set` overrides; started and waited for."""

    def __init__(self, sets: dict[str, str], port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.sets = sets
        self.port = port or free_port()
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_s: float = 60) -> "ServeProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        env["PYTHONPATH"] = str(ROOT)
        args = [sys.executable, "-m", "kvstore"]
        for k, v in self.sets.items():
            args += ["--set", f"{k}={v}"]
        args += ["serve", "--port", str(self.port), *self.extra_args]
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + wait_s
        http = urllib3.PoolManager(retries=False, timeout=1.0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvstore serve exited with {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            try:
                if http.request("GET", f"{self.url}/healthz").status == 200:
                    return self
            except urllib3.exceptions.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"kvstore serve on port {self.port} did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
