"""Kernel throughput beside a plain device copy of the same bytes, measured in the same run.

    python -m benchmarks.kernels_bench [--quick] [--json PATH] [--device auto|cpu|cuda]
                                       [--backend auto|torch|triton] [--threads N]

Ops, on a Llama-8B-like KV layout (32 layers, 8 KV heads, head_dim 128, bf16, block_size 16, blocks
scattered over a cache twice the size needed, as vLLM hands them out):
- gather: paged (flash-attention layout, NHD) -> chunk [L, 2, T, H, D], all layers in one launch;
- scatter: chunk -> paged;
- rerotate: keys chunk[:, 0] ([L, T, H, D], strided) -> a new tensor, re-rotated by random deltas;
- rows: 15% of the token rows of the keys gathered and re-rotated in one launch (blend's selection).
Payload bytes are the bytes of the chunk side (the keys for rerotate, the selected rows for rows); the
ceiling is `dst.copy_(src)` of a contiguous tensor of the same byte count. Ratio = copy time / op time
(1.0 = as fast as the copy). On CUDA the ops run the Triton kernels, timed with CUDA events, each
repetition after an L2 flush (so neither side is served from cache and launch overhead stays hidden);
index checks are off in the timed calls (they wait for the device: one sync per call). On CPU the torch
reference runs, timed with perf_counter, op and copy alternating. JSON ratios are the minimum over sizes.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

from benchmarks.common import paired, print_table, write_json
from kernels import PagedLayout, RopeSpec, gather_paged, gather_rows, rerotate_keys, scatter_paged
from kernels.dispatch import resolve_backend

LAYERS, HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
SIZES = {  # (device, quick) -> token counts
    ("cpu", True): [64],  # 8 MiB
    ("cpu", False): [256, 512],  # 32, 64 MiB
    ("cuda", True): [256, 2048],  # 32, 256 MiB
    ("cuda", False): [256, 2048, 8192],  # 32, 256 MiB, 1 GiB
}


Timer = Callable[[Callable[[], object], Callable[[], object]], tuple[float, float]]  # (op, copy) -> seconds


def cpu_timer(repeats: int) -> Timer:
    def timed(op: Callable[[], object], copy: Callable[[], object]) -> tuple[float, float]:
        return paired(op, copy, repeats)

    return timed


def cuda_timer(repeats: int, device: torch.device) -> Timer:
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # > the 60 MB L2 of an H200

    def one(fn: Callable[[], object]) -> float:
        flush.zero_()  # keeps the GPU busy while the launch is queued, and empties L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def timed(op: Callable[[], object], copy: Callable[[], object]) -> tuple[float, float]:
        for _ in range(3):
            op(), copy()
        torch.cuda.synchronize(device)
        a, b = [], []
        for _ in range(repeats):
            a.append(one(op))
            b.append(one(copy))
        return statistics.median(a), statistics.median(b)

    return timed


def setup(tokens: int, device: torch.device, gen: torch.Generator) -> dict:
    nb = 2 * tokens // BLOCK
    caches = [torch.randn(2, nb, BLOCK, HEADS, HEAD_DIM, generator=gen).to(DTYPE).to(device) for _ in range(LAYERS)]
    blocks = torch.randperm(nb, generator=gen)[: tokens // BLOCK]
    slots = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1).to(device)  # [T]
    chunk = torch.empty(LAYERS, 2, tokens, HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    keys = chunk[:, 0]  # [L, T, H, D], strided
    old = torch.arange(tokens, device=device)
    new = torch.randint(0, 32768, (tokens,), generator=gen).to(device)
    n_rows = max(1, int(0.15 * tokens))
    rows = torch.randperm(tokens, generator=gen)[:n_rows].sort().values.to(device)
    return dict(caches=caches, slots=slots, chunk=chunk, keys=keys, old=old, new=new, rows=rows)


def check(d: dict, backend: str) -> None:
    """The timed backend agrees with the torch reference on this data (bit-exact moves, rotation close)."""
    ref = torch.empty_like(d["chunk"])
    kv_first = PagedLayout.KV_FIRST
    gather_paged(d["caches"], d["slots"], ref, layout=kv_first, backend="torch")
    gather_paged(d["caches"], d["slots"], d["chunk"], layout=kv_first, backend=backend)
    assert torch.equal(ref.view(torch.int16), d["chunk"].view(torch.int16)), "gather differs from the reference"
    spec = RopeSpec.default(HEAD_DIM, theta=500000.0)
    a = rerotate_keys(d["keys"], d["old"], d["new"], spec, backend="torch")
    b = rerotate_keys(d["keys"], d["old"], d["new"], spec, backend=backend)
    assert (a.float() - b.float()).abs().max() <= 0.02 * a.float().abs().max(), "rerotate differs from the reference"


def run(device: torch.device, backend: str, quick: bool, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    timed = cuda_timer(repeats, device) if device.type == "cuda" else cpu_timer(repeats)
    spec = RopeSpec.default(HEAD_DIM, theta=500000.0)
    figures = []
    for tokens in SIZES[(device.type, quick)]:
        d = setup(tokens, device, gen)
        if device.type == "cuda":
            check(d, backend)
        chunk, caches, slots, keys = d["chunk"], d["caches"], d["slots"], d["keys"]
        rows_out = torch.empty(LAYERS, d["rows"].numel(), HEADS, HEAD_DIM, dtype=DTYPE, device=device)
        rot_out = torch.empty_like(keys)
        ops = {
            "gather": (lambda: gather_paged(caches, slots, chunk, layout=PagedLayout.KV_FIRST, backend=backend,
                                            check_indices=False), chunk.numel()),
            "scatter": (lambda: scatter_paged(chunk, caches, slots, layout=PagedLayout.KV_FIRST, backend=backend,
                                              check_indices=False), chunk.numel()),
            "rerotate": (lambda: rerotate_keys(keys, d["old"], d["new"], spec, out=rot_out, backend=backend),
                         keys.numel()),
            "rows": (lambda: gather_rows(keys, d["rows"], rows_out, rope=spec, old_pos=d["old"][d["rows"]],
                                         new_pos=d["new"][d["rows"]], backend=backend, check_indices=False),
                     rows_out.numel()),
        }
        for name, (op, numel) in ops.items():
            nbytes = numel * DTYPE.itemsize
            src = torch.ones(nbytes, dtype=torch.uint8, device=device)
            dst = torch.zeros_like(src)
            op_s, copy_s = timed(op, lambda: dst.copy_(src))
            figures.append({"op": name, "tokens": tokens, "bytes": nbytes, "op_s": op_s, "copy_s": copy_s,
                            "op_gbps": nbytes / op_s / 1e9, "copy_gbps": nbytes / copy_s / 1e9,
                            "ratio": copy_s / op_s})
            del src, dst
        del d, chunk, caches, keys, rows_out, rot_out, ops
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"figures": figures}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible here (use --device cpu or auto)")
    backend = resolve_backend(args.backend, device)
    repeats = (5 if args.quick else 9) if device.type == "cpu" else (10 if args.quick else 30)
    figures = run(device, backend, args.quick, repeats)["figures"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    print(f"device: {name}, backend: {backend}, threads: {threads}, "
          f"KV [L={LAYERS}, 2, T, H={HEADS}, D={HEAD_DIM}] {DTYPE}, block {BLOCK}")
    print_table(
        ["op", "tokens", "MiB", "op GB/s", "copy GB/s", "ratio"],
        [[f["op"], f["tokens"], f["bytes"] / 2**20, f["op_gbps"], f["copy_gbps"], f["ratio"]] for f in figures],
    )
    out = {"device": name, "backend": backend, "quick": args.quick, "dtype": str(DTYPE), "threads": threads,
           "layout": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK},
           "figures": figures}
    ops = ("gather", "scatter", "rerotate", "rows")
    for op in ops:
        out[f"{op}_ratio"] = min(f["ratio"] for f in figures if f["op"] == op)
    print("ratios (min over sizes): " + ", ".join(f"{op} {out[op + '_ratio']:.2f}" for op in ops))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
