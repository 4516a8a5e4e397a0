"""Remote tiers beside their ceilings, and a bounded load test of the sidecar, all on loopback.

    python -m benchmarks.remote_bench [--quick] [--json PATH] [--load-seconds N]

Every figure is a median, each run alternately with its ceiling so both see the same machine state;
ratio = ceiling time / our time. Records of 32 MiB (`[32, 2, 256, 8, 128]` fp16) and 2 MiB, raw codec.
- Redis tier put / get (into a preallocated buffer, as an engine reads) beside raw redis-py SET / GET of
  the same record bytes. A private Redis-compatible server is started (`benchmarks.servers`).
- The sidecar (`kvstore serve` in a subprocess, the default store: records in memory, then on disk with
  the default durability, named in the table) through `SidecarTier`: put, and get into a preallocated
  buffer, beside the loopback ceiling (`SocketCeiling`: one socket moving the same bytes to another
  process), raw redis-py, and (puts) writing the same bytes to a new file beside the sidecar's (what a
  put that lands on disk costs at least: new pages of the page cache). A second sidecar without a memory tier serves gets from its disk tier
  (sendfile from the page cache).
- Load test: 16 client threads put and get 2 MiB chunks against the sidecar for a bounded time; every get
  is checked against the digest of what was put. Reports throughput, p50/p99, errors, lost and corrupt.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis
import torch
import xxhash

from benchmarks.common import paired, print_table, write_json
from benchmarks.servers import RedisServer, SocketCeiling, start_sidecar
from codec import make_codec
from kvstore.chunk import Chunk
from kvstore.keys import chunk_refs
from kvstore.record import encode_record
from kvstore.tiers import RedisTier, SidecarTier

SHAPES = {"32MiB": (32, 2, 256, 8, 128), "2MiB": (8, 2, 256, 2, 128)}  # fp16
SHAPE_2M = SHAPES["2MiB"]


def chunks(shape, n: int, seed: int, namespace: str = "bench") -> list[Chunk]:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=g).to(torch.float16)
    refs = chunk_refs(np.arange(n * shape[2]) + seed * n * shape[2], namespace=namespace, fingerprint="bench", chunk_tokens=shape[2])
    return [Chunk.from_ref(r, kv) for r in refs]


def record_bytes(c: Chunk) -> bytes:
    header, payload = encode_record(c, make_codec("raw"))
    return bytes(header) + bytes(payload)


def bench_redis(url: str, shape, repeats: int, seed: int) -> dict:
    tier = RedisTier(url, make_codec("raw"), timeout=60)
    raw = redis.Redis.from_url(url, socket_timeout=60)
    cs = chunks(shape, repeats + 2, seed=seed)
    value = record_bytes(cs[0])
    it, n = iter(cs), iter(range(10**9))
    put_s, raw_put_s = paired(lambda: tier.put([next(it)]), lambda: raw.set(f"raw:{seed}:{next(n)}", value), repeats)
    out = [torch.empty(shape, dtype=torch.float16)]
    kit = iter([c.key for c in cs[: repeats + 1]] * 2)
    get_s, raw_get_s = paired(lambda: tier.get([next(kit)], out), lambda: raw.get(f"raw:{seed}:0"), repeats)
    assert torch.equal(out[0], cs[0].kv)
    tier.close()
    raw.flushall()
    return {"bytes": len(value), "put_s": put_s, "raw_put_s": raw_put_s, "get_s": get_s, "raw_get_s": raw_get_s}


def bench_sidecar(url: str, token: str, ceiling: SocketCeiling, redis_url: str, files: Path, shape, repeats: int,
                  seed: int) -> dict:
    """Put and get beside the socket, raw redis-py and (for puts) writing the bytes to a new file."""
    tier = SidecarTier(url, token, make_codec("raw"), timeout=60)
    raw = redis.Redis.from_url(redis_url, socket_timeout=60)
    cs = chunks(shape, repeats + 2, seed=seed)
    value = record_bytes(cs[0])
    n = len(value)
    raw.set("raw", value)
    it, names = iter(cs), iter(range(10**9))
    files.mkdir(parents=True, exist_ok=True)
    put_times: list[float] = []

    def put() -> None:
        t = time.perf_counter()
        assert tier.put([next(it)]) == [True]
        put_times.append(time.perf_counter() - t)

    def write_file() -> None:  # what the disk tier's write costs at least: new pages of the page cache
        (files / f"{seed}-{next(names)}").write_bytes(value)

    put_s, ceiling_put_s, raw_put_s, file_put_s = paired(put, lambda: ceiling.put(n), repeats,
                                                         lambda: raw.set("raw2", value), write_file)
    out = [torch.empty(shape, dtype=torch.float16)]
    kit = iter([c.key for c in cs[: repeats + 1]] * 2)
    get_times: list[float] = []

    def get() -> None:
        t = time.perf_counter()
        assert tier.get([next(kit)], out)[0] is not None
        get_times.append(time.perf_counter() - t)

    get_s, ceiling_get_s, raw_get_s = paired(get, lambda: ceiling.get(n), repeats, lambda: raw.get("raw"))
    assert torch.equal(out[0], cs[0].kv)
    tier.close()
    raw.flushall()
    return {"bytes": n, "put_s": put_s, "get_s": get_s, "ceiling_put_s": ceiling_put_s, "ceiling_get_s": ceiling_get_s,
            "raw_put_s": raw_put_s, "raw_get_s": raw_get_s, "file_put_s": file_put_s,
            "put_p99_ms": float(np.percentile(put_times, 99) * 1e3), "get_p99_ms": float(np.percentile(get_times, 99) * 1e3)}


def bench_sidecar_disk_get(url: str, token: str, ceiling: SocketCeiling, shape, repeats: int, seed: int) -> dict:
    tier = SidecarTier(url, token, make_codec("raw"), timeout=60)
    cs = chunks(shape, repeats + 1, seed=seed)
    assert tier.put(cs) == [True] * len(cs)
    out = [torch.empty(shape, dtype=torch.float16)]
    kit = iter([c.key for c in cs] * 2)
    n = len(record_bytes(cs[0]))
    get_s, ceiling_get_s = paired(lambda: tier.get([next(kit)], out), lambda: ceiling.get(n), repeats)
    tier.close()
    return {"bytes": n, "get_s": get_s, "ceiling_get_s": ceiling_get_s}


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
    repeats = 5 if args.quick else 11
    seconds = args.load_seconds or (5.0 if args.quick else 30.0)
    redis_results, side, disk_get = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="kvstore-remote-bench-") as d:
        work = Path(d)
        server = RedisServer(work / "redis").start()
        ceiling = SocketCeiling(64 << 20)
        procs = []
        try:
            for i, (name, shape) in enumerate(SHAPES.items()):
                redis_results[name] = bench_redis(server.url, shape, repeats, seed=10 + i)
            proc, token, durability = start_sidecar(work, "sidecar", memory=True)
            procs.append(proc)
            for i, (name, shape) in enumerate(SHAPES.items()):
                side[name] = bench_sidecar(proc.url, token, ceiling, server.url, work / "files", shape, repeats, seed=20 + i)
            load = load_test(proc.url, token, 16, seconds)
            disk_proc, token, _ = start_sidecar(work, "sidecar-disk", memory=False)
            procs.append(disk_proc)
            for i, (name, shape) in enumerate(SHAPES.items()):
                disk_get[name] = bench_sidecar_disk_get(disk_proc.url, token, ceiling, shape, repeats, seed=30 + i)
        finally:
            for proc in procs:
                proc.kill()
            ceiling.close()
            server.kill()
    gb = lambda n, sec: f"{n / sec / 1e9:.2f}"  # noqa: E731
    rows = []
    for name in SHAPES:
        r, s, g = redis_results[name], side[name], disk_get[name]
        rows += [
            [name, "redis tier put", gb(r["bytes"], r["put_s"]), "redis-py SET", gb(r["bytes"], r["raw_put_s"]), r["raw_put_s"] / r["put_s"]],
            [name, "redis tier get (into a buffer)", gb(r["bytes"], r["get_s"]), "redis-py GET", gb(r["bytes"], r["raw_get_s"]), r["raw_get_s"] / r["get_s"]],
            [name, f"sidecar put ({durability})", gb(s["bytes"], s["put_s"]), "socket", gb(s["bytes"], s["ceiling_put_s"]), s["ceiling_put_s"] / s["put_s"]],
            [name, "", "", "write a new file", gb(s["bytes"], s["file_put_s"]), s["file_put_s"] / s["put_s"]],
            [name, "sidecar get, memory (into a buffer)", gb(s["bytes"], s["get_s"]), "socket", gb(s["bytes"], s["ceiling_get_s"]), s["ceiling_get_s"] / s["get_s"]],
            [name, "sidecar get, disk (sendfile)", gb(g["bytes"], g["get_s"]), "socket", gb(g["bytes"], g["ceiling_get_s"]), g["ceiling_get_s"] / g["get_s"]],
            [name, "raw redis-py SET / GET (same bytes)", "", "SET / GET", f"{gb(s['bytes'], s['raw_put_s'])} / {gb(s['bytes'], s['raw_get_s'])}", ""],
        ]
    print(f"remote_bench ({'quick' if args.quick else 'full'}; raw-codec records, median of {repeats}, each beside its "
          f"ceiling; loopback; sidecar puts acknowledged as surviving a {durability})")
    print_table(["size", "operation", "ours GB/s", "ceiling", "ceiling GB/s", "ratio"], rows)
    s32 = side["32MiB"]
    print(f"sidecar p99 latency, 32 MiB: put {s32['put_p99_ms']:.1f} ms, get {s32['get_p99_ms']:.1f} ms")
    print(f"load test: {load['clients']} clients x {load['seconds']:.1f} s of 2 MiB put+get: {load['ops_per_s']:.1f} ops/s, "
          f"{load['gbps']:.2f} GB/s, p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, "
          f"{load['puts']} puts, {load['gets']} gets, errors {load['errors']}, lost {load['lost']}, corrupt {load['corrupt']}")
    r32 = redis_results["32MiB"]
    gb = lambda n, sec: n / sec / 1e9  # noqa: E731
    result = {
        "redis_put_ratio": r32["raw_put_s"] / r32["put_s"], "redis_get_ratio": r32["raw_get_s"] / r32["get_s"],
        "sidecar_put_gbps": gb(s32["bytes"], s32["put_s"]), "sidecar_get_gbps": gb(s32["bytes"], s32["get_s"]),
        "sidecar_put_ratio_socket": s32["ceiling_put_s"] / s32["put_s"],
        "sidecar_get_ratio_socket": s32["ceiling_get_s"] / s32["get_s"],
        "sidecar_disk_get_gbps": gb(disk_get["32MiB"]["bytes"], disk_get["32MiB"]["get_s"]),
        "socket_put_gbps": gb(s32["bytes"], s32["ceiling_put_s"]), "socket_get_gbps": gb(s32["bytes"], s32["ceiling_get_s"]),
        "file_write_gbps": gb(s32["bytes"], s32["file_put_s"]),
        "raw_redis_set_gbps": gb(s32["bytes"], s32["raw_put_s"]), "raw_redis_get_gbps": gb(s32["bytes"], s32["raw_get_s"]),
        "sidecar_durability": durability, "sidecar_p99_ms": max(s32["put_p99_ms"], s32["get_p99_ms"]),
        "redis": redis_results, "sidecar": side, "sidecar_disk_get": disk_get, "load": load,
    }
    write_json(args.json, result)
    return 0 if load["errors"] == load["lost"] == load["corrupt"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
