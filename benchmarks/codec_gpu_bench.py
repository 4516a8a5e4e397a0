"""The CUDA decoder of `cachegen` payloads on a GPU: speed, beside the CPU decoder and a host -> GPU copy of
the uncompressed KV in the same run, and bit-exactness with the CPU decoder on every chunk.

    python -m benchmarks.codec_gpu_bench [--quick] [--json PATH]

Needs a CUDA device (it says so and exits 1 without one; the decoder's CPU twin is tested under numba's
simulator, tests/codec/test_cuda_decode.py). Random 32 layers x 8 KV heads x 128 chunks of 256 tokens (an
8B model's chunk, fp16) with random codebooks as in `benchmarks.codec_bench`, rotating through three
distinct chunks. Per codec and level:
- `decode_cuda` end to end, in GB/s of fp16 KV written on the GPU: the host's parse and checks, the
  value table, the upload of the stream words, the kernel and the status read-back (what a loader pays
  for a payload that arrived in host memory);
- the kernel alone, its inputs already on the GPU (CUDA events);
- the CPU decoder on all the host's cores (`codec.rans.set_threads`);
- the ceiling: a pinned host -> GPU copy of the same KV uncompressed (what loading it without a codec
  moves over the link), and the ratio of the decode to it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

import torch

from benchmarks.codec_bench import CHUNK, SPEED_CHUNKS, _random_codebook
from benchmarks.common import paired, print_table, write_json
from codec import rans
from codec.cachegen import CacheGenCodec

SHAPE = (32, 2, CHUNK, 8, 128)  # [L, 2, T, H, D]: an 8B model's chunk
DEVICE = "cuda"


def _synced(fn):
    """fn, then a wait for the GPU: what host wall-clock timing of GPU work needs."""
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def _kernel_ms(codec: CacheGenCodec, payload: bytes, out: torch.Tensor, repeats: int) -> float:
    """The CUDA kernel alone, every input already on the device (median ms, CUDA events)."""
    from codec.cuda_decode import prepare

    launch = prepare(codec, memoryview(payload), out)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch.run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])  # the first launch compiles


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("codec_gpu_bench needs a CUDA device; none is visible here (the CPU decoder's speed is "
              "benchmarks.codec_bench's)", file=sys.stderr)
        return 1
    from codec.cuda_decode import decode_cuda

    repeats = 2 * SPEED_CHUNKS if args.quick else 7 * SPEED_CHUNKS
    cores = os.cpu_count() or 1
    rans.set_threads(cores)
    torch.manual_seed(0)
    kvs = [torch.randn(*SHAPE).to(torch.float16) for _ in range(SPEED_CHUNKS)]
    gb = kvs[0].numel() * 2 / 1e9
    pinned = kvs[0].pin_memory()
    on_gpu = torch.empty_like(kvs[0], device=DEVICE)
    codecs = [(f"cachegen-{lv}", CacheGenCodec(lv, _random_codebook(kvs[0], lv))) for lv in (1, 2, 3, 4)]
    codecs.append(("cachegen-2 per-chunk tables", CacheGenCodec(2)))
    rows, table = [], []
    for name, codec in codecs:
        payloads = [codec.encode(kv) for kv in kvs]
        host = torch.empty_like(kvs[0])
        exact = True
        for p in payloads:  # bit-exactness with the CPU decoder, and the warm-up (compiles the kernel)
            codec.decode(memoryview(p), host)
            decode_cuda(codec, memoryview(p), on_gpu)
            exact &= torch.equal(host.view(torch.int16), on_gpu.cpu().view(torch.int16))
        gpu_turn, cpu_turn = itertools.count(), itertools.count()

        def gpu_decode():
            decode_cuda(codec, memoryview(payloads[next(gpu_turn) % len(payloads)]), on_gpu)

        def cpu_decode():
            codec.decode(memoryview(payloads[next(cpu_turn) % len(payloads)]), host)

        # the decode beside the uncompressed copy (and the CPU decoder), in turn: the same machine state
        gpu_s, copy_s, cpu_s = paired(_synced(gpu_decode), _synced(lambda: on_gpu.copy_(pinned, non_blocking=True)),
                                      repeats, cpu_decode)
        kernel_ms = _kernel_ms(codec, payloads[0], on_gpu, repeats)
        row = {"codec": name, "bits": sum(len(p) for p in payloads) * 8 / (kvs[0].numel() * len(payloads)),
               "bit_exact": bool(exact), "gpu_decode_gb_s": gb / gpu_s, "gpu_kernel_gb_s": gb / (kernel_ms / 1e3),
               "cpu_decode_gb_s": gb / cpu_s, "h2d_copy_gb_s": gb / copy_s, "gpu_decode_vs_h2d_copy": copy_s / gpu_s}
        rows.append(row)
        table.append([name, row["bits"], "yes" if exact else "NO", row["gpu_decode_gb_s"], row["gpu_kernel_gb_s"],
                      row["cpu_decode_gb_s"], row["h2d_copy_gb_s"], row["gpu_decode_vs_h2d_copy"]])
        print(f"  {name}: done", flush=True)
    device = torch.cuda.get_device_name()
    print(f"{device}; random {SHAPE[0]} x {SHAPE[3]} x {SHAPE[4]} chunks of {SHAPE[2]} tokens, fp16 ({gb * 1e3:.1f} MB each); CPU decoder "
          f"on {cores} cores; median of {repeats}")
    print_table(["codec", "bits/elem", "bit-exact", "GPU decode GB/s", "kernel alone GB/s", "CPU decode GB/s",
                 "H2D copy GB/s", "decode / copy"], table)
    l2 = next(r for r in rows if r["codec"] == "cachegen-2")
    write_json(args.json, {"device": device, "chunk_tokens": SHAPE[2], "repeats": repeats, "cpu_cores": cores,
                           "rows": rows, "gpu_decode_gb_s": l2["gpu_decode_gb_s"],
                           "gpu_kernel_gb_s": l2["gpu_kernel_gb_s"], "h2d_copy_gb_s": l2["h2d_copy_gb_s"],
                           "bit_exact": all(r["bit_exact"] for r in rows)})
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
