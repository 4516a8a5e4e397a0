"""Entropy coders side by side: our rANS kernels (`codec.rans`) against `constriction` (PyPI, Rust), on the
same symbols, one thread, in the same run.

    python -m benchmarks.entropy_bench [--json PATH]

The symbols have the shape of one SmolLM2 chunk (30 layers x K/V, 192 channels, 256 tokens) over a
127-symbol alphabet (cachegen level 2), each (layer, K/V, channel) with its own distribution (a quantized
Gaussian of 0.5 to 4 steps, ~2 bits per symbol), as cachegen codes them. Ours: the fused quantize-and-encode kernel (symbols given as values with step 1) and
the four-streams-in-lockstep decoder writing float32. constriction: an `AnsCoder` with one `Categorical`
model per (layer, K/V, channel), one call per 256 symbols (its Python boundary), and its best case, one
model and one call for every symbol. Throughput in MB/s of the fp16 KV the symbols stand for (2 bytes
each), median of 7. constriction is not a dependency: install it to run this (`pip install constriction`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks.common import print_table, write_json
from codec import rans

LK, C, T, M = 60, 192, 256, 63


def _median(fn, repeats: int = 7) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        import constriction
    except ImportError:
        raise SystemExit("constriction is not installed: pip install constriction") from None
    rng = np.random.default_rng(0)
    a = 2 * M + 1
    # quantized Gaussians of a spread per channel (0.5 to 4 steps): ~2 bits per symbol, like cachegen level 2
    sigma = np.exp(rng.uniform(np.log(0.5), np.log(4.0), size=(LK * C, 1)))
    p = np.exp(-0.5 * ((np.arange(a) - M)[None, :] / sigma) ** 2) + 1e-6  # [LK * C, A]
    p /= p.sum(axis=1, keepdims=True)
    cum = p.cumsum(axis=1)
    sym = (rng.random((LK, T, C))[..., None] > cum.reshape(LK, 1, C, a)).sum(-1).clip(0, a - 1)  # [LK, T, C]
    mb = sym.size * 2 / 1e6
    rans.set_threads(1)
    tables = rans.CodingTables.from_freqs(rans.normalize_freqs(np.round(p * 1e6), floor=True))
    x = (sym - M).astype(np.float32).reshape(-1)
    step = np.ones(LK * C, dtype=np.float32)
    counts, words = rans.encode(x, "f32", T, C, 16, step, M, tables)
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    vals = ((np.arange(a, dtype=np.float32) - M)[None, :].repeat(LK * C, 0)).view(np.uint32)
    out = np.empty(x.size, dtype=np.uint32)
    status = np.empty(counts.size, dtype=np.int32)

    def our_decode():
        rans.decode_streams(words, offsets, T, C, 16, tables.packed, tables.lut, vals, out, status)

    our_decode()
    assert not status.any() and np.array_equal(out.view(np.float32), x)
    ours = (_median(lambda: rans.encode(x, "f32", T, C, 16, step, M, tables)), _median(our_decode))

    per_chan = sym.transpose(0, 2, 1).reshape(LK * C, T).astype(np.int32)  # [LK * C, T]
    models = [constriction.stream.model.Categorical(p[i], perfect=False) for i in range(LK * C)]

    def c_encode():
        coder = constriction.stream.stack.AnsCoder()
        for i in range(LK * C - 1, -1, -1):
            coder.encode_reverse(per_chan[i], models[i])
        return coder.get_compressed()

    comp = c_encode()

    def c_decode():
        coder = constriction.stream.stack.AnsCoder(comp)
        return [coder.decode(models[i], T) for i in range(LK * C)]

    assert all(np.array_equal(d, s) for d, s in zip(c_decode(), per_chan))
    flat = per_chan.reshape(-1)
    one = constriction.stream.stack.AnsCoder()
    one.encode_reverse(flat, models[0])
    one_comp = one.get_compressed()
    theirs = (_median(c_encode), _median(c_decode),
              _median(lambda: constriction.stream.stack.AnsCoder(one_comp).decode(models[0], flat.size)))
    rows = [["ours (codec.rans, 1 thread)", mb / ours[0], mb / ours[1], words.size * 16 / sym.size],
            ["constriction, a model per channel", mb / theirs[0], mb / theirs[1], comp.size * 32 / sym.size],
            ["constriction, one model, one call", "", mb / theirs[2], ""]]
    print_table([f"coder ({LK} x {C} x {T} symbols, A={a})", "encode MB/s", "decode MB/s", "bits/symbol"], rows)
    write_json(args.json, {"ours_encode_mb_s": mb / ours[0], "ours_decode_mb_s": mb / ours[1],
                           "constriction_encode_mb_s": mb / theirs[0], "constriction_decode_mb_s": mb / theirs[1],
                           "constriction_one_model_decode_mb_s": mb / theirs[2],
                           "constriction_version": getattr(constriction, "__version__", "unknown")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
