"""The CUDA decoder of `cachegen` payloads (numba.cuda): one thread per rANS stream.

`decode_cuda(codec, payload, out)` parses and checks the payload on the host (the same `parse` as the CPU
path), uploads the stream words, the per-chunk step values and (once per table set) the coding tables,
and runs one thread per stream writing the output dtype's bits straight into `out` (a CUDA tensor). The
arithmetic is the CPU kernel's, integer for integer, and the symbol -> value table is computed on the host
for both, so the output is bit-exact with `CacheGenCodec.decode`; sink tokens (payload version 2) are
then written over by the same `Parsed.write_sinks` as on the CPU. `prepare` is its part up to the
kernel's launch (a `Launch`), which `benchmarks.codec_gpu_bench` times the kernel alone with.

Tested on the CPU through numba's simulator (`NUMBA_ENABLE_CUDASIM=1`, set before numba is imported),
where `out` may be a CPU tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda

from codec.base import CodecError
from codec.cachegen import CacheGenCodec, Parsed
from codec.cachegen_quant import _OUT_BITS, dequantize_values
from codec.rans import BAD_STATE, LUT_SHIFT, OK, OVERRUN, PREC, RANS_L, TOTAL, CodingTables

THREADS = 64
_device_tables: dict[int, tuple[CodingTables, object, object, object]] = {}


@cuda.jit
def _decode_kernel(words, offsets, n_tok, n_chan, group, freq, cum, lut, vals, out, status):  # pragma: no cover
    s = cuda.grid(1)
    if s >= offsets.shape[0] - 1:
        return
    n_groups = (n_chan + group - 1) // group
    lk = s // n_groups
    c0 = (s % n_groups) * group
    c1 = min(c0 + group, n_chan)
    pos = offsets[s]
    end = offsets[s + 1]
    if end - pos < 2:
        status[s] = OVERRUN
        return
    x = (np.int64(words[pos]) << 16) | np.int64(words[pos + 1])
    pos += 2
    bad = OK
    mask = TOTAL - 1
    for t in range(n_tok):
        base = (lk * n_tok + t) * n_chan
        for c in range(c0, c1):
            tb = lk * n_chan + c
            slot = x & mask
            sy = np.int64(lut[tb, slot >> LUT_SHIFT])
            while cum[tb, sy + 1] <= slot:
                sy += 1
            x = np.int64(freq[tb, sy]) * (x >> PREC) + slot - np.int64(cum[tb, sy])
            if x < RANS_L:
                if pos >= end:
                    bad = OVERRUN
                    break
                x = (x << 16) | np.int64(words[pos])
                pos += 1
            out[base + c] = vals[tb, sy]
        if bad != OK:
            break
    if bad == OK and (x != RANS_L or pos != end):
        bad = BAD_STATE
    status[s] = bad


def _tables_on_device(t: CodingTables):
    hit = _device_tables.get(id(t))
    if hit is None or hit[0] is not t:
        hit = _device_tables[id(t)] = (t, cuda.to_device(t.freq), cuda.to_device(t.cum), cuda.to_device(t.lut))
        if len(_device_tables) > 64:  # per-chunk tables come and go; codebook tables stay hot
            _device_tables.pop(next(iter(_device_tables)))
    return hit[1:]


@dataclass(frozen=True, slots=True)
class Launch:
    """One payload's decode, uploaded: `run()` launches the kernel (asynchronously); `status` holds each
    stream's status afterwards."""

    parsed: Parsed
    grid: int
    args: tuple
    status: object  # device array [n_streams] int32

    def run(self) -> None:
        _decode_kernel[self.grid, THREADS](*self.args)


def prepare(codec: CacheGenCodec, payload: memoryview, out: torch.Tensor) -> Launch:
    """Parse and check the payload on the host, upload its words and value table (the coding tables once per
    table set) and bind `out` [L, 2, T, H, D]: everything up to the kernel's launch."""
    if out.dtype not in _OUT_BITS or not out.is_contiguous() or out.dim() != 5:
        raise CodecError(f"cachegen decodes into a contiguous 5-d float tensor, got {out.dtype} {tuple(out.shape)}")
    p = codec.parse(payload, tuple(out.shape))
    vals = dequantize_values(p.step_bits, p.level, out.dtype)  # [N, A] output bits
    ibits, _ = _OUT_BITS[out.dtype]
    flat = out.view(ibits).reshape(-1)
    dst = cuda.as_cuda_array(flat) if flat.is_cuda else flat.numpy()
    freq, cum, lut = _tables_on_device(p.tables)
    n = p.offsets.size - 1
    status = cuda.device_array(n, dtype=np.int32)
    vals = vals.view(np.int16 if vals.itemsize == 2 else np.int32)  # the same bits, typed as `out`'s view
    args = (cuda.to_device(p.words), cuda.to_device(p.offsets), p.tokens, p.channels, p.group, freq, cum, lut,
            cuda.to_device(vals), dst, status)
    return Launch(p, (n + THREADS - 1) // THREADS, args, status)


def decode_cuda(codec: CacheGenCodec, payload: memoryview, out: torch.Tensor) -> None:
    """payload -> out [L, 2, T, H, D] on a CUDA device (or the CPU under the simulator)."""
    launch = prepare(codec, payload, out)
    launch.run()
    st = launch.status.copy_to_host()
    if st.any():
        bad = int(np.flatnonzero(st)[0])
        what = "runs past its end" if st[bad] == OVERRUN else "ends in a wrong state"
        raise CodecError(f"cachegen stream {bad} is corrupt ({what})")
    launch.parsed.write_sinks(out)  # the same 16-bit values and conversion as the CPU path


__all__ = ["Launch", "decode_cuda", "prepare"]
