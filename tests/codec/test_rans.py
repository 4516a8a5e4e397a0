"""The rANS kernels against a plain Python reference on fresh random inputs: the encoder's words, and the
decoder's output and status, for shapes whose channels are not a multiple of the stream group and whose
stream count is not a multiple of the four-stream lockstep."""

from __future__ import annotations

import numpy as np
import pytest

from codec import rans
from codec.rans import PREC, RANS_L, CodingTables, normalize_freqs


def reference_words(sym: np.ndarray, group: int, freq: np.ndarray) -> list[list[int]]:
    """sym [LK, T, C] -> each stream's words, by the textbook rANS encoder (backwards, 16-bit words)."""
    n_lk, n_tok, n_chan = sym.shape
    cum = np.concatenate([np.zeros((freq.shape[0], 1), np.int64), np.cumsum(freq, axis=1)], axis=1)
    streams = []
    for lk in range(n_lk):
        for c0 in range(0, n_chan, group):
            x, out = RANS_L, []
            for t in range(n_tok - 1, -1, -1):
                for c in range(min(c0 + group, n_chan) - 1, c0 - 1, -1):
                    tb, s = lk * n_chan + c, int(sym[lk, t, c])
                    f = int(freq[tb, s])
                    if x >= f << (32 - PREC):
                        out.append(x & 0xFFFF)
                        x >>= 16
                    x = (x // f << PREC) + x % f + int(cum[tb, s])
            out += [x & 0xFFFF, x >> 16]
            streams.append(out[::-1])
    return streams


GROUP = 16


def random_coded(rng, shape: tuple[int, int, int], m: int):
    """Random tables over 2m + 1 symbols, steps and float32 input of shape [LK, T, C], and the kernels'
    encoding of it -> (freq, tables, step, x, counts, words)."""
    n_lk, n_tok, n_chan = shape
    freq = normalize_freqs(rng.integers(0, 50, (n_lk * n_chan, 2 * m + 1)) ** 2, floor=True)
    tables = CodingTables.from_freqs(freq)
    step = rng.uniform(0.5, 2.0, n_lk * n_chan).astype(np.float32)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    counts, words = rans.encode(x.reshape(-1), "f32", n_tok, n_chan, GROUP, step, m, tables)
    return freq, tables, step, x, counts, words


@pytest.mark.parametrize("shape", [(1, 5, 16), (3, 7, 40), (2, 3, 70)])
def test_kernels_match_the_reference(shape):
    rng = np.random.default_rng(sum(shape))
    n_lk, n_tok, n_chan = shape
    m, group = 7, GROUP
    freq, tables, step, x, counts, words = random_coded(rng, shape, m)
    sym = np.clip(np.rint(x / step.reshape(n_lk, 1, n_chan)), -m, m).astype(np.int64) + m
    want = reference_words(sym, group, freq)
    assert counts.tolist() == [len(w) for w in want]
    assert words.tolist() == [v for w in want for v in w]

    vals = (np.arange(n_lk * n_chan * (2 * m + 1), dtype=np.uint32) * 7).reshape(n_lk * n_chan, -1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out = np.zeros(sym.size, dtype=np.uint32)
    status = np.full(counts.size, -1, dtype=np.int32)
    rans.decode_streams(words, offsets, n_tok, n_chan, group, tables.packed, tables.lut, vals, out, status)
    assert not status.any()
    tb = np.arange(n_lk)[:, None, None] * n_chan + np.arange(n_chan)[None, None, :]
    assert np.array_equal(out, vals[tb, sym].reshape(-1))

    bad = words.copy()
    bad[offsets[-2] + 1] ^= 0x5A5A  # the last stream (a repeated lane in a short quad) is checked too
    rans.decode_streams(bad, offsets, n_tok, n_chan, group, tables.packed, tables.lut, vals, out, status)
    assert status[-1] != rans.OK and not status[:-1].any()


def test_decoder_reads_nothing_out_of_bounds():
    """The decoder compiled with numba's bounds checks (an out-of-range index raises IndexError) on shapes
    with a short last quad, a narrow last group, a short chunk and a long one, a wide alphabet, and 2- and
    4-byte values: its indices are unsigned and unchecked in the shipped build, so a read past a table
    (the next quad's rows that it loads ahead included) would go unnoticed there."""
    import numba

    checked = numba.njit(boundscheck=True)(rans._decode_kernel.py_func)  # prange runs as range
    rng = np.random.default_rng(7)
    group = GROUP
    for (n_lk, n_tok, n_chan), m in [((3, 7, 40), 7), ((2, 300, 70), 100), ((1, 5, 16), 7)]:
        _, tables, _, x, counts, words = random_coded(rng, (n_lk, n_tok, n_chan), m)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        for dtype in (np.uint16, np.uint32):
            vals = rng.integers(0, 1000, (n_lk * n_chan, 2 * m + 1)).astype(dtype)
            out = np.zeros(x.size, dtype=dtype)
            status = np.full(counts.size, -1, dtype=np.int32)
            checked(words, offsets, n_tok, n_chan, group, 2 * m + 1, tables.packed.reshape(-1),
                    tables.lut.reshape(-1), vals.reshape(-1), out, status)
            assert not status.any()
            want = np.empty_like(out)
            rans.decode_streams(words, offsets, n_tok, n_chan, group, tables.packed, tables.lut, vals, want, status)
            assert np.array_equal(out, want)
