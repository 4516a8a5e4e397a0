"""Store benchmark: put/get per tier beside the machine's ceilings, measured in the same run.

    python -m benchmarks.store_bench [--quick] [--json PATH] [--dir DIR]

Ceilings: `copy_` into a preallocated, already-touched tensor (memory tier); write + fsync of the same
bytes to a new file in the same directory (disk put); a page-cached file read into a preallocated
buffer (disk get). Ratios are ceiling time / our time: 1.0 means "as fast as the ceiling".
Also: lookup of a 131072-token prompt (512 chunks, all stored) and an index rebuild of 100k records.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import median_seconds, paired, print_table, write_json
from codec import make_codec
from kvstore.chunk import Chunk
from kvstore.keys import chunk_refs
from kvstore.store import TieredStore
from kvstore.tiers import DiskTier, MemoryTier

SHAPES = {  # [L, 2, T, H, D] fp16, 256 tokens
    "2MiB": (8, 2, 256, 2, 128),
    "32MiB": (32, 2, 256, 8, 128),
}


def make_chunks(shape, n: int, seed: int) -> list[Chunk]:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=g).to(torch.float16)
    refs = chunk_refs(np.arange(n * shape[2]) + seed * 10_000_000, namespace="bench", fingerprint="bench", chunk_tokens=shape[2])
    # Distinct keys, shared content: content does not change the cost of raw moves.
    return [Chunk.from_ref(r, kv) for r in refs]


def bench_memory(shape, repeats: int) -> dict:
    """Both sides rotate over 256 MiB of distinct sources and destinations, so that neither copies
    from cache: KV handed over by an engine is not cache-resident either."""
    nbytes = int(np.prod(shape)) * 2
    n = max(8, (256 << 20) // nbytes)
    g = torch.Generator().manual_seed(shape[0])
    refs = chunk_refs(np.arange(n * shape[2]) + 7_000_000, namespace="bench", fingerprint="bench", chunk_tokens=shape[2])
    chunks = [Chunk.from_ref(r, torch.randn(shape, generator=g).to(torch.float16)) for r in refs]
    tier = MemoryTier(nbytes * (n + 1), "cpu")
    tier.arena.buffer.fill_(0)  # touch every page once so neither side pays first-touch faults
    dsts = [torch.zeros(shape, dtype=torch.float16) for _ in range(n)]
    tier.put(chunks[: n // 2])  # warm the put path on half; measure on the rest
    put_it, src_it, dst_it = iter(chunks[n // 2 :]), itertools.cycle(chunks), itertools.cycle(dsts)
    m = min(repeats * 2, n - n // 2 - 1)
    put_s, copy_put_s = paired(lambda: tier.put([next(put_it)]), lambda: next(dst_it).copy_(next(src_it).kv), m)
    keys = [c.key for c in chunks[: n // 2]]
    get_it, out_it = itertools.cycle(keys), itertools.cycle(dsts[1:] + dsts[:1])
    get_s, copy_get_s = paired(lambda: tier.get([next(get_it)], [next(out_it)]), lambda: next(dst_it).copy_(next(src_it).kv), repeats * 2)
    return {"bytes": nbytes, "copy_put_s": copy_put_s, "copy_get_s": copy_get_s, "put_s": put_s, "get_s": get_s}


def _write_fsync(path: str, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def bench_disk(shape, repeats: int, root: str, codec: str = "raw") -> dict:
    batch = 8
    chunks = make_chunks(shape, repeats + 2 + batch * max(repeats // batch, 2), seed=(2 if codec == "raw" else 3) * 100 + shape[0])
    nbytes = chunks[0].nbytes
    data = memoryview(chunks[0].kv.reshape(-1).view(torch.uint8).numpy())
    tag = f"{codec}-{nbytes}"
    ceiling_dir = os.path.join(root, f"ceiling-{tag}")
    os.makedirs(ceiling_dir, exist_ok=True)
    tier = DiskTier(os.path.join(root, f"tier-{tag}"), 1 << 40, make_codec(codec))
    put_times, write_times = [], []
    # Interleave ours and the ceiling so that both see the same disk state over time.
    for i in range(repeats + 1):
        t = time.perf_counter()
        _write_fsync(os.path.join(ceiling_dir, f"f{i}"), data)
        write_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        tier.put([chunks[i]])
        put_times.append(time.perf_counter() - t)
    bstart = repeats + 1
    batch_times = []
    for j in range(max(repeats // batch, 2)):
        group = chunks[bstart + j * batch : bstart + (j + 1) * batch]
        if len(group) < batch:
            break
        t = time.perf_counter()
        tier.put(group)
        batch_times.append((time.perf_counter() - t) / batch)
    out = torch.empty_like(chunks[0].kv)
    buf = bytearray(nbytes)
    paths = [os.path.join(ceiling_dir, f"f{i}") for i in range(repeats + 1)]

    def read_ceiling(p=itertools.cycle(paths)):
        with open(next(p), "rb", buffering=0) as f:
            f.readinto(buf)

    keys = itertools.cycle([c.key for c in chunks[: repeats + 1]])
    get_s, read_s = paired(lambda: tier.get([next(keys)], [out]), read_ceiling, repeats)
    assert torch.equal(out, chunks[0].kv)  # the benchmark reads back what it wrote
    size_on_disk = tier.usage().used_bytes / max(tier.usage().entries, 1)
    tier.close()
    return {
        "bytes": nbytes, "stored_bytes": size_on_disk,
        "write_fsync_s": float(np.median(write_times[1:])), "put_s": float(np.median(put_times[1:])),
        "put_batch_s": float(np.median(batch_times)) if batch_times else float("nan"),
        "read_s": read_s, "get_s": get_s,
    }


def bench_lookup(repeats: int, root: str) -> dict:
    tokens = np.random.default_rng(0).integers(0, 128_000, 131072)
    store = TieredStore([MemoryTier(1 << 30), DiskTier(os.path.join(root, "lookup"), 1 << 40, make_codec("raw"), fsync=False)])
    refs = store.chunk_refs(tokens, fingerprint="bench")
    kv = torch.zeros(1, 2, 256, 1, 8, dtype=torch.float16)
    store.put([Chunk.from_ref(r, kv) for r in refs])
    store.flush()
    assert store.lookup(tokens, fingerprint="bench") == len(tokens)
    mem_s = median_seconds(lambda: store.lookup(tokens, fingerprint="bench"), repeats * 4)
    store.tiers[0].clear()  # now every chunk is found in the disk tier's index
    assert store.lookup(tokens, fingerprint="bench") == len(tokens)
    disk_s = median_seconds(lambda: store.lookup(tokens, fingerprint="bench"), repeats * 4)
    store.close()
    return {"lookup_ms_128k": mem_s * 1e3, "lookup_ms_128k_disk": disk_s * 1e3}


def bench_rebuild(n: int, root: str) -> dict:
    d = os.path.join(root, "rebuild")
    tier = DiskTier(d, 1 << 40, make_codec("raw"), fsync=False)
    kv = torch.zeros(1, 2, 16, 1, 4, dtype=torch.float16)
    refs = chunk_refs(np.arange(n * 16), namespace="bench", fingerprint="bench", chunk_tokens=16)
    for i in range(0, n, 1000):
        tier.put([Chunk.from_ref(r, kv) for r in refs[i : i + 1000]])
    tier.close()
    os.sync()
    t = time.perf_counter()
    tier = DiskTier(d, 1 << 40, make_codec("raw"), fsync=False)
    s = time.perf_counter() - t
    assert tier.usage().entries == n
    tier.close()
    return {"rebuild_records": n, "rebuild_s": s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, no 32 MiB disk runs beyond 3, 10k-record rebuild")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--dir", help="scratch directory on the disk to measure (default: a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = tempfile.mkdtemp(prefix="kvstore-bench-", dir=args.dir)
    repeats = 5 if args.quick else 15
    try:
        results: dict = {"repeats": repeats}
        rows = []
        mem_ratios_get, mem_ratios_put, disk_put, disk_put_batch, disk_get = [], [], [], [], []
        for name, shape in SHAPES.items():
            m = bench_memory(shape, repeats)
            d = bench_disk(shape, repeats if name == "2MiB" or not args.quick else 3, root)
            z = bench_disk(shape, 3 if args.quick else 5, root, codec="zstd")
            results[name] = {"memory": m, "disk_raw": d, "disk_zstd": z}
            gb = lambda s, n=m["bytes"]: n / s / 1e9
            rows += [
                [name, "memory put", f"{gb(m['put_s']):.2f}", "copy_", f"{gb(m['copy_put_s']):.2f}", m["copy_put_s"] / m["put_s"]],
                [name, "memory get", f"{gb(m['get_s']):.2f}", "copy_", f"{gb(m['copy_get_s']):.2f}", m["copy_get_s"] / m["get_s"]],
                [name, "disk put raw (1/call)", f"{gb(d['put_s']):.2f}", "write+fsync", f"{gb(d['write_fsync_s']):.2f}", d["write_fsync_s"] / d["put_s"]],
                [name, "disk put raw (8/call)", f"{gb(d['put_batch_s']):.2f}", "write+fsync", f"{gb(d['write_fsync_s']):.2f}", d["write_fsync_s"] / d["put_batch_s"]],
                [name, "disk get raw", f"{gb(d['get_s']):.2f}", "cached read", f"{gb(d['read_s']):.2f}", d["read_s"] / d["get_s"]],
                [name, f"disk put zstd ({z['bytes'] / z['stored_bytes']:.2f}x)", f"{gb(z['put_s']):.2f}", "write+fsync", f"{gb(z['write_fsync_s']):.2f}", z["write_fsync_s"] / z["put_s"]],
                [name, "disk get zstd", f"{gb(z['get_s']):.2f}", "cached read", f"{gb(z['read_s']):.2f}", z["read_s"] / z["get_s"]],
            ]
            mem_ratios_put.append(m["copy_put_s"] / m["put_s"])
            mem_ratios_get.append(m["copy_get_s"] / m["get_s"])
            disk_put.append(d["write_fsync_s"] / d["put_s"])
            disk_put_batch.append(d["write_fsync_s"] / d["put_batch_s"])
            disk_get.append(d["read_s"] / d["get_s"])
        look = bench_lookup(repeats, root)
        rebuild = bench_rebuild(10_000 if args.quick else 100_000, root)
        results.update(look)
        results.update(rebuild)
        results.update({
            "memory_put_ratio": float(np.median(mem_ratios_put)),
            "memory_get_ratio": float(np.median(mem_ratios_get)),
            "disk_put_ratio": float(np.median(disk_put)),
            "disk_put_batch_ratio": float(np.median(disk_put_batch)),
            "disk_get_ratio": float(np.median(disk_get)),
        })
        print(f"store_bench ({'quick' if args.quick else 'full'}, median of {repeats}; GB/s = 1e9 bytes/s; ratio = ceiling time / our time)")
        print_table(["chunk", "operation", "ours GB/s", "ceiling", "ceiling GB/s", "ratio"], rows)
        print(f"lookup of 131072 tokens (512 chunks, all hit): {look['lookup_ms_128k']:.3f} ms from the memory tier, "
              f"{look['lookup_ms_128k_disk']:.3f} ms from the disk tier's index")
        print(f"disk index rebuild: {rebuild['rebuild_records']} records in {rebuild['rebuild_s']:.2f} s")
        print("summary: " + ", ".join(f"{k} {results[k]:.3f}" for k in
                                      ("memory_get_ratio", "memory_put_ratio", "disk_put_ratio", "disk_put_batch_ratio", "disk_get_ratio", "lookup_ms_128k")))
        write_json(args.json, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
