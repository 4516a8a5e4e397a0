"""Remote tiers beside their raw clients, and a bounded load test of the sidecar, all on loopback.

    python -m benchmarks.remote_bench [--quick] [--json PATH] [--load-seconds N]

- Redis tier put/get of 32 MiB chunks beside raw redis-py SET/GET of the same record bytes, alternating
  in one run (ratio = raw time / our time). Needs `redis-server` on PATH; a private server is started.
- The sidecar (`kvstore serve` in a subprocess, disk tier with fsync, raw codec) through `SidecarTier`:
  put and get GB/s of 32 MiB chunks and the p99 latency, beside raw redis-py of the same bytes.
- Load test: 16 client threads put and get 2 MiB chunks against the sidecar for a bounded time; every get
  is checked against the digest of what was put. Reports throughput, p50/p99, errors, lost and corrupt.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis
import torch
import xxhash

from benchmarks.common import paired, print_table, write_json
from codec import make_codec
from kvstore.chunk import Chunk
from kvstore.keys import chunk_refs
from kvstore.record import encode_record
from kvstore.tiers import SidecarTier, RedisTier
from benchmarks.servers import RedisServer
from benchmarks.servers import ServeProcess

SHAPE_32M = (32, 2, 256, 8, 128)  # fp16, 32 MiB
SHAPE_2M = (8, 2, 256, 2, 128)  # fp16, 2 MiB


def chunks(shape, n: int, seed: int, namespace: str = "bench") -> list[Chunk]:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=g).to(torch.float16)
    refs = chunk_refs(np.arange(n * shape[2]) + seed * n * shape[2], namespace=namespace, fingerprint="bench", chunk_tokens=shape[2])
    return [Chunk.from_ref(r, kv) for r in refs]


def bench_redis(workdir: Path, repeats: int) -> dict:
    server = RedisServer(workdir / "redis").start()
    try:
        tier = RedisTier(server.url, make_codec("raw"), timeout=30)
        raw = redis.Redis.from_url(server.url, socket_timeout=30)
        cs = chunks(SHAPE_32M, repeats + 2, seed=1)
        header, payload = encode_record(cs[0], make_codec("raw"))
        value = bytes(header) + bytes(payload)
        it = iter(cs)
        n = iter(range(10**9))
        put_s, raw_put_s = paired(lambda: tier.put([next(it)]), lambda: raw.set(f"raw:{next(n)}", value), repeats)
        keys = [c.key for c in cs[:repeats]]
        kit = iter(keys * 3)
        get_s, raw_get_s = paired(lambda: tier.get([next(kit)]), lambda: raw.get("raw:0"), repeats)
        nbytes = len(value)
        tier.close()
        raw.flushall()
        return {"bytes": nbytes, "put_s": put_s, "raw_put_s": raw_put_s, "get_s": get_s, "raw_get_s": raw_get_s}
    finally:
        server.kill()


def start_sidecar(workdir: Path) -> tuple[ServeProcess, str]:
    token = "bench-token"
    tokens = workdir / "tokens.toml"
    tokens.write_text(f'[tokens]\n"{token}" = ["bench", "load"]\n')
    proc = ServeProcess({"disk.path": str(workdir / "sidecar-disk"), "disk.codec": "raw", "memory.capacity": "2GiB",
                         "server.tokens_file": str(tokens), "server.max_body_bytes": "256MiB"}).start()
    return proc, token


def bench_sidecar(url: str, token: str, repeats: int) -> dict:
    tier = SidecarTier(url, token, make_codec("raw"), timeout=60)
    cs = chunks(SHAPE_32M, repeats, seed=2)
    put_times, get_times = [], []
    for c in cs:
        t = time.perf_counter()
        assert tier.put([c]) == [True]
        put_times.append(time.perf_counter() - t)
    for c in cs:
        t = time.perf_counter()
        got = tier.get([c.key])[0]
        get_times.append(time.perf_counter() - t)
        assert got is not None and torch.equal(got.kv, c.kv)
    tier.close()
    nbytes = cs[0].nbytes
    return {"bytes": nbytes, "put_s": statistics.median(put_times[1:]), "get_s": statistics.median(get_times[1:]),
            "p99_ms": float(np.percentile(put_times + get_times, 99) * 1e3),
            "put_p99_ms": float(np.percentile(put_times, 99) * 1e3), "get_p99_ms": float(np.percentile(get_times, 99) * 1e3)}


def load_test(url: str, token: str, clients: int, seconds: float) -> dict:
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"puts": 0, "gets": 0, "errors": 0, "lost": 0, "corrupt": 0, "bytes": 0}
    deadline = time.monotonic() + seconds

    def client(cid: int) -> None:
        tier = SidecarTier(url, token, make_codec("raw"), timeout=30)
        rng = random.Random(cid)
        mine: list[tuple[Chunk, int]] = []
        i = 0
        while time.monotonic() < deadline:
            c = chunks(SHAPE_2M, 1, seed=1000 + cid * 100_000 + i, namespace="load")[0]
            digest = xxhash.xxh3_64_intdigest(c.kv.numpy().tobytes())
            i += 1
            t = time.perf_counter()
            ok = tier.put([c]) == [True]
            dt_put = time.perf_counter() - t
            if ok:
                mine.append((c, digest))
            probe, want = mine[rng.randrange(len(mine))] if mine else (c, digest)
            t = time.perf_counter()
            got = tier.get([probe.key])[0] if mine else None
            dt_get = time.perf_counter() - t
            with lock:
                counts["puts"] += 1
                counts["errors"] += 0 if ok else 1
                latencies.extend([dt_put, dt_get] if mine else [dt_put])
                counts["bytes"] += c.nbytes * (2 if got is not None else 1)
                if mine:
                    counts["gets"] += 1
                    if got is None:
                        counts["lost"] += 1
                    elif xxhash.xxh3_64_intdigest(got.kv.numpy().tobytes()) != want:
                        counts["corrupt"] += 1
        tier.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    wall = time.monotonic() - t0
    return {"clients": clients, "seconds": wall, **counts, "ops_per_s": (counts["puts"] + counts["gets"]) / wall,
            "gbps": counts["bytes"] / wall / 1e9, "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and a 5 s load test")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--load-seconds", type=float, help="duration of the load test (default 30, quick 5)")
    args = p.parse_args(argv)
    repeats = 4 if args.quick else 10
    seconds = args.load_seconds or (5.0 if args.quick else 30.0)
    with tempfile.TemporaryDirectory(prefix="kvstore-remote-bench-") as d:
        work = Path(d)
        r = bench_redis(work, repeats)
        proc, token = start_sidecar(work)
        try:
            s = bench_sidecar(proc.url, token, repeats)
            load = load_test(proc.url, token, 16, seconds)
        finally:
            proc.kill()
    gb = lambda n, sec: n / sec / 1e9
    rows = [
        ["redis tier put", f"{gb(r['bytes'], r['put_s']):.2f}", "redis-py SET", f"{gb(r['bytes'], r['raw_put_s']):.2f}", r["raw_put_s"] / r["put_s"]],
        ["redis tier get", f"{gb(r['bytes'], r['get_s']):.2f}", "redis-py GET", f"{gb(r['bytes'], r['raw_get_s']):.2f}", r["raw_get_s"] / r["get_s"]],
        ["sidecar put (fsynced)", f"{gb(s['bytes'], s['put_s']):.2f}", "redis-py SET", f"{gb(r['bytes'], r['raw_put_s']):.2f}", r["raw_put_s"] / s["put_s"]],
        ["sidecar get", f"{gb(s['bytes'], s['get_s']):.2f}", "redis-py GET", f"{gb(r['bytes'], r['raw_get_s']):.2f}", r["raw_get_s"] / s["get_s"]],
    ]
    print(f"remote_bench ({'quick' if args.quick else 'full'}; 32 MiB chunks, median of {repeats}; loopback)")
    print_table(["operation", "ours GB/s", "baseline", "baseline GB/s", "ratio"], rows)
    print(f"sidecar p99 latency (32 MiB put and get): {s['p99_ms']:.1f} ms (put {s['put_p99_ms']:.1f}, get {s['get_p99_ms']:.1f})")
    print(f"load test: {load['clients']} clients x {load['seconds']:.1f} s of 2 MiB put+get: {load['ops_per_s']:.1f} ops/s, "
          f"{load['gbps']:.2f} GB/s, p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, "
          f"{load['puts']} puts, {load['gets']} gets, errors {load['errors']}, lost {load['lost']}, corrupt {load['corrupt']}")
    result = {
        "redis_put_ratio": r["raw_put_s"] / r["put_s"], "redis_get_ratio": r["raw_get_s"] / r["get_s"],
        "sidecar_put_gbps": gb(s["bytes"], s["put_s"]), "sidecar_get_gbps": gb(s["bytes"], s["get_s"]),
        "sidecar_p99_ms": s["p99_ms"], "redis": r, "sidecar": s, "load": load,
    }
    write_json(args.json, result)
    return 0 if load["errors"] == load["lost"] == load["corrupt"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
