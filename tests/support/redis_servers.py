"""Real Redis servers for the tests: a single node and a 3-node cluster on free loopback ports.

Each server runs from a temp directory with persistence off and is stopped (SIGKILL if need be) when the
test is done. `redis-server` must be on PATH (`.ci/run` installs it).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free too (and so <= 55535)."""
    import random

    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, cluster: bool = False) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir = workdir
        self.port = port or free_port()
        self.cluster = cluster
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--enable-debug-command", "yes", "--protected-mode", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf", "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return self
            except redis.RedisError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


class RedisCluster:
    """Three primaries, no replicas, slots spread over all three."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [RedisServer(workdir / f"n{i}", cluster=True) for i in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> "RedisCluster":
        for n in self.nodes:
            n.start()
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            infos = [redis.Redis(port=n.port).cluster("info") for n in self.nodes]
            if all(i.get("cluster_state") == "ok" for i in infos):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("redis cluster did not reach state ok")

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()
