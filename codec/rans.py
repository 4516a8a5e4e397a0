"""The entropy coder: rANS streams over per-(layer, K/V, channel) distributions, in numba.

Primitives:
- `normalize_freqs(counts, floor)`: integer frequency tables summing to `2**PREC` (PREC = 15 bits);
- `CodingTables`: the decode-side tables built once per set of frequency tables (cumulative sums and a
  coarse slot -> symbol lookup);
- `encode_streams` / `decode_streams`: many independent streams, encoded and decoded in parallel
  (`numba.prange` over groups of four streams, run in lockstep: four independent dependency chains per
  core); the encoder quantizes as it codes (`encode` wraps it).
The kernels are instruction-bound scalar code, written for few instructions per symbol: tables are
indexed flat with unsigned indices (numba emits negative-index wraparound code for signed ones), and the
renormalization, taken at random for about one symbol in five, is branch-free. A large model's tables do
not fit the cache, so the decoder loads the next quad's table rows while it decodes the current quad.

The symbol grid is `sym[lk, t, c]` (uint8) with `lk` = layer * 2 + K/V, `t` the token and `c` the flattened
channel `h * D + d`. Stream `s` covers one `lk` and the channel group `[g * G, g * G + G)` and visits its
symbols token-major (for t: for c in group). Symbol `sym[lk, t, c]` is coded with table `lk * C + c`.

rANS: 32-bit state in [2**16, 2**32), 16-bit words out, at most one word per symbol. The encoder starts
from state `RANS_L` and runs backwards; the decoder must end exactly in `RANS_L` having consumed every word
of its stream, which catches most corruption beyond the payload checksum. Decoding is bounded by the
symbol count, checks every read against the stream's end, and reports a status per stream instead of
raising inside the kernel; the caller turns a non-zero status into `CodecError`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

PREC = 15  # frequency precision in bits (tables sum to 2**PREC)
TOTAL = 1 << PREC
RANS_L = 1 << 16
LUT_BITS = 8  # the coarse lookup has 2**LUT_BITS buckets per table
LUT_SHIFT = PREC - LUT_BITS

# Stream status codes written by the decoder.
OK, OVERRUN, BAD_STATE = 0, 1, 2


def normalize_freqs(counts: np.ndarray, floor: bool) -> np.ndarray:
    """counts [N, A] (>= 0) -> freqs [N, A] uint32 summing to TOTAL per row.

    floor=True gives every symbol at least 1 (a codebook must code any symbol a chunk may hold);
    floor=False gives a frequency only to symbols that occur (a per-chunk table).
    """
    counts = np.asarray(counts, dtype=np.float64)
    n, a = counts.shape
    if a > TOTAL // 2:
        raise ValueError(f"alphabet of {a} symbols does not fit {PREC}-bit frequencies")
    present = np.ones_like(counts, dtype=bool) if floor else counts > 0
    present[~present.any(axis=1), 0] = True
    k = present.sum(axis=1, keepdims=True)
    w = np.where(present, counts, 0.0)
    tot = w.sum(axis=1, keepdims=True)
    w = np.where(tot > 0, w, present.astype(np.float64))  # a row with no counts: uniform over `present`
    p = w / w.sum(axis=1, keepdims=True)
    f = np.where(present, 1 + np.floor(p * (TOTAL - k)), 0).astype(np.int64)
    rest = TOTAL - f.sum(axis=1)  # >= 0: the floors undershoot
    f[np.arange(n), np.argmax(p, axis=1)] += rest
    return f.astype(np.uint32)


@dataclass(frozen=True, slots=True)
class CodingTables:
    """Decode/encode tables for N frequency tables over an alphabet of A symbols."""

    freq: np.ndarray  # [N, A] uint32
    cum: np.ndarray  # [N, A + 1] uint32, cum[:, A] == TOTAL
    lut: np.ndarray  # [N, 2**LUT_BITS] uint8: the symbol whose range holds the bucket's first slot
    packed: np.ndarray  # [N, A] uint32: cum | freq << 16 (one load per symbol in the CPU kernels)

    @property
    def alphabet(self) -> int:
        return self.freq.shape[1]

    @classmethod
    def from_freqs(cls, freq: np.ndarray) -> CodingTables:
        """freq [N, A] summing to TOTAL per row (checked: tables may come from an untrusted payload)."""
        freq = np.ascontiguousarray(freq, dtype=np.uint32)
        if freq.ndim != 2 or freq.shape[1] == 0 or freq.shape[1] > 256:
            raise ValueError(f"frequency tables must be [N, 1..256], got {freq.shape}")
        cum = np.zeros((freq.shape[0], freq.shape[1] + 1), dtype=np.uint32)
        np.cumsum(freq, axis=1, out=cum[:, 1:])
        if not np.all(cum[:, -1] == TOTAL):
            raise ValueError(f"frequency tables must each sum to {TOTAL}")
        lut = np.empty((freq.shape[0], 1 << LUT_BITS), dtype=np.uint8)
        _build_lut(cum, lut)
        packed = cum[:, :-1] | (freq << 16)
        return cls(freq, cum, lut, packed)


@njit(parallel=True, cache=True, nogil=True)
def _build_lut(cum, lut):  # pragma: no cover - numba
    """lut[i, b]: the symbol s with cum[i, s] <= b << LUT_SHIFT < cum[i, s + 1]."""
    a = cum.shape[1] - 1
    for i in prange(cum.shape[0]):
        s = 0
        for b in range(lut.shape[1]):
            x = b << LUT_SHIFT
            while s < a - 1 and cum[i, s + 1] <= x:
                s += 1
            lut[i, b] = s


@njit(inline="always")
def _symbol(v, step, m):  # pragma: no cover - numba
    """The quantization rule, shared by every kernel that quantizes: round(v / step) + m, clamped."""
    q = np.rint(v / step)
    q = min(max(q, -m), m)
    return np.int64(q) + m


@njit(inline="always")
def _load(x16, x32, lut16, i):  # pragma: no cover - numba
    """Element i of the input as float32: x16 holds float16/bfloat16 bits (decoded through lut16 [65536]),
    or x32 holds the floats themselves (x16 empty)."""
    if x16.shape[0] > 0:
        return lut16[x16[i]]
    return x32[i]


@njit(inline="always")
def _enc(x, p, row, scratch, e, inv):  # pragma: no cover - numba
    """One rANS encoder step of the symbol whose packed entry is e, on a stream whose words go down from
    scratch[row + p - 1] -> (x, p). The renormalization is branchless: the word is always stored (a slot
    below the stream's start, overwritten later or never read) and p moves where it was needed."""
    f = e >> 16
    need = x >= (f << (32 - PREC))
    scratch[np.uint64(row + p - 1)] = x & 0xFFFF
    p -= np.int64(need)
    x = (x >> 16) if need else x
    # x // f without a 64-bit division: a float reciprocal, then an exact fix-up (x < 2**32)
    q = np.int64(np.float64(x) * inv[np.uint64(f)])
    r = x - q * f
    if r < 0:
        q -= 1
        r += f
    elif r >= f:
        q += 1
        r -= f
    return (q << PREC) + r + (e & 0xFFFF), p


@njit(inline="always")
def _enc_lane(x, p, active, x16, x32, lut16, i, tb, step, m, packed, a, row, scratch, inv):  # pragma: no cover
    """One lane's step in the lockstep loop: quantize input element i (see `_load`) with table tb and
    encode it (`_enc`) -> (x, p); nothing where the lane is not active (a stream narrower than the group)."""
    if not active:
        return x, p
    tb = np.uint64(tb)
    sy = _symbol(_load(x16, x32, lut16, np.uint64(i)), step[tb], m)
    return _enc(x, p, row, scratch, np.int64(packed[tb * np.uint64(a) + np.uint64(sy)]), inv)


@njit(inline="always")
def _enc_close(x, p, row, scratch):  # pragma: no cover - numba
    """Flush a stream's final state (two words) -> its first word's position."""
    p -= 2
    scratch[np.uint64(row + p)] = (x >> 16) & 0xFFFF
    scratch[np.uint64(row + p + 1)] = x & 0xFFFF
    return p


@njit(parallel=True, cache=True, nogil=True)
def _encode_kernel(x16, x32, lut16, n_tok, n_chan, group, step, m, a, packed, inv, cap, scratch, starts):  # pragma: no cover
    """`encode_streams` on flattened arrays: packed [N * a], scratch [n_streams * cap]."""
    n_groups = (n_chan + group - 1) // group
    ns = starts.shape[0]
    for qd in prange((ns + 3) // 4):
        s0 = 4 * qd
        s1, s2, s3 = min(s0 + 1, ns - 1), min(s0 + 2, ns - 1), min(s0 + 3, ns - 1)
        lk0, lk1, lk2, lk3 = s0 // n_groups, s1 // n_groups, s2 // n_groups, s3 // n_groups
        c0, c1, c2, c3 = (s0 % n_groups) * group, (s1 % n_groups) * group, (s2 % n_groups) * group, (s3 % n_groups) * group
        w0, w1, w2, w3 = min(group, n_chan - c0), min(group, n_chan - c1), min(group, n_chan - c2), min(group, n_chan - c3)
        x0 = x1 = x2 = x3 = np.int64(RANS_L)
        p0 = p1 = p2 = p3 = cap
        for t in range(n_tok - 1, -1, -1):
            for j in range(group - 1, -1, -1):
                x0, p0 = _enc_lane(x0, p0, j < w0, x16, x32, lut16, (lk0 * n_tok + t) * n_chan + c0 + j,
                                   lk0 * n_chan + c0 + j, step, m, packed, a, s0 * cap, scratch, inv)
                x1, p1 = _enc_lane(x1, p1, j < w1, x16, x32, lut16, (lk1 * n_tok + t) * n_chan + c1 + j,
                                   lk1 * n_chan + c1 + j, step, m, packed, a, s1 * cap, scratch, inv)
                x2, p2 = _enc_lane(x2, p2, j < w2, x16, x32, lut16, (lk2 * n_tok + t) * n_chan + c2 + j,
                                   lk2 * n_chan + c2 + j, step, m, packed, a, s2 * cap, scratch, inv)
                x3, p3 = _enc_lane(x3, p3, j < w3, x16, x32, lut16, (lk3 * n_tok + t) * n_chan + c3 + j,
                                   lk3 * n_chan + c3 + j, step, m, packed, a, s3 * cap, scratch, inv)
        starts[s0] = _enc_close(x0, p0, s0 * cap, scratch)
        starts[s1] = _enc_close(x1, p1, s1 * cap, scratch)
        starts[s2] = _enc_close(x2, p2, s2 * cap, scratch)
        starts[s3] = _enc_close(x3, p3, s3 * cap, scratch)


def encode_streams(x16: np.ndarray, x32: np.ndarray, lut16: np.ndarray, n_tok: int, n_chan: int, group: int,
                   step: np.ndarray, m: int, packed: np.ndarray, inv: np.ndarray, scratch: np.ndarray,
                   starts: np.ndarray) -> None:
    """Quantize and encode in one pass: the input [LK * T * C] (see `_load`) -> per stream, words at
    scratch[s, starts[s]:] (uint16).

    step [LK * C] float32; packed [N, A] uint32 (cum | freq << 16); inv [TOTAL + 1] float64 (1 / f);
    scratch [n_streams, T * group + 2] uint16; starts [n_streams] int64 (written).
    A symbol with frequency 0 never occurs (the caller's tables guarantee it). Four streams are encoded in
    lockstep (four independent dependency chains, as in the decoder; a last short quad repeats its last
    stream, which writes the same words).
    """
    _encode_kernel(x16, x32, lut16, n_tok, n_chan, group, step, m, packed.shape[1], packed.reshape(-1), inv,
                   scratch.shape[1], scratch.reshape(-1), starts)


@njit(parallel=True, cache=True, nogil=True)
def gather_streams(scratch, starts, offsets, words):  # pragma: no cover - numba
    """Concatenate scratch[s, starts[s]:] into words[offsets[s]:offsets[s + 1]]."""
    for s in prange(scratch.shape[0]):
        n = offsets[s + 1] - offsets[s]
        words[offsets[s] : offsets[s] + n] = scratch[s, starts[s] : starts[s] + n]


@njit(inline="always")
def _dec(x, pos, last, words, tp, tl, packed, lut):  # pragma: no cover - numba
    """One rANS decoder step with the table whose first element is packed[tp] and first bucket lut[tl]
    (both flattened) -> (index of the symbol in packed, x, pos). Indices are unsigned, so the hot loop has no negative-index wraparound code.
    The renormalization is branchless (it is taken for about one symbol in five, at random): a word is
    always loaded, clamped to the last one, and used where needed; a stream that reads past its end ends
    with pos > end and is reported."""
    slot = x & (TOTAL - 1)
    i = tp + np.uint64(lut[tl + np.uint64(slot >> LUT_SHIFT)])
    e = np.int64(packed[i])
    while (e & 0xFFFF) + (e >> 16) <= slot:
        i += np.uint64(1)
        e = np.int64(packed[i])
    x = (e >> 16) * (x >> PREC) + slot - (e & 0xFFFF)
    need = x < RANS_L
    w = np.int64(words[np.uint64(min(pos, last))])
    x = ((x << 16) | w) if need else x
    pos += np.int64(need)
    return i, x, pos


@njit(inline="always")
def _dec_write(x, pos, active, last, words, tp, tl, packed, lut, vals, out, o):  # pragma: no cover - numba
    """One lane's step in the lockstep loop: decode a symbol (`_dec`) and write its value vals[...] to
    out[o] -> (x, pos); nothing where the lane is not active (a stream narrower than the group)."""
    if active:
        i, x, pos = _dec(x, pos, last, words, tp, tl, packed, lut)
        out[np.uint64(o)] = vals[i]
    return x, pos


@njit(inline="always")
def _dec_open(words, offsets, s):  # pragma: no cover - numba
    """A stream's (state, first word, end); a stream too short for its state gets state 0 and reads
    nothing it does not own (it is reported as overrun)."""
    pos, end = offsets[s], offsets[s + 1]
    if end - pos < 2:
        return np.int64(0), end + 1, end
    return (np.int64(words[pos]) << 16) | np.int64(words[pos + 1]), pos + 2, end


@njit(inline="always")
def _dec_status(x, pos, end):  # pragma: no cover - numba
    if pos > end:
        return OVERRUN
    if x != RANS_L or pos != end:
        return BAD_STATE
    return OK


@njit(inline="always")
def _first_row(s, n_chan, group):  # pragma: no cover - numba
    """The table row of stream s's first channel."""
    n_groups = (n_chan + group - 1) // group
    return np.uint64((s // n_groups) * n_chan + (s % n_groups) * group)


@njit(inline="always")
def _dec_lane(words, offsets, s, n_tok, n_chan, group, alphabet):  # pragma: no cover - numba
    """Stream s's decoder lane: (state, position, end, packed index and lut index of its first table,
    output index of its first element, its width in channels)."""
    n_groups = (n_chan + group - 1) // group
    lk, c = s // n_groups, (s % n_groups) * group
    x, pos, end = _dec_open(words, offsets, s)
    tb = _first_row(s, n_chan, group)
    return x, pos, end, tb * np.uint64(alphabet), tb << np.uint64(LUT_BITS), lk * n_tok * n_chan + c, min(group, n_chan - c)


@njit(inline="always")
def _warm(arr, i, end):  # pragma: no cover - numba
    """arr[i] where i < end, else 0 (a load whose only purpose is to bring its cache line in)."""
    return np.uint32(arr[i]) if i < end else np.uint32(0)


@njit(inline="always")
def _warm_next(packed, lut, vals, p_lo, p_end, l_lo, l_end, t, n_tok, wide):  # pragma: no cover - numba
    """Token t's share of loading the next quad's rows packed[p_lo:p_end], vals[p_lo:p_end] and
    lut[l_lo:l_end] (line t of lut; lines t and t + n_tok of packed; line t of vals; where the alphabet is
    wide, also packed's lines t + 2 n_tok and t + 3 n_tok and vals' t + n_tok) -> the sum of what it loaded.
    At 256 tokens that is every line of 64 rows of up to 128 (wide: 256) symbols and 2-byte values."""
    ut, un = np.uint64(t), np.uint64(n_tok)
    lp, ll, lv = np.uint64(16), np.uint64(64), np.uint64(64 // vals.itemsize)  # entries per cache line
    ip, iv = p_lo + ut * lp, p_lo + ut * lv
    acc = _warm(lut, l_lo + ut * ll, l_end) + _warm(packed, ip, p_end) + _warm(packed, ip + un * lp, p_end)
    acc += _warm(vals, iv, p_end)
    if wide:
        acc += _warm(packed, ip + np.uint64(2) * un * lp, p_end) + _warm(packed, ip + np.uint64(3) * un * lp, p_end)
        acc += _warm(vals, iv + un * lv, p_end)
    return acc


@njit(parallel=True, cache=True, nogil=True)
def _decode_kernel(words, offsets, n_tok, n_chan, group, a, packed, lut, vals, out, status):  # pragma: no cover
    """`decode_streams` on flattened tables: packed, vals [N * a], lut [N * 2**LUT_BITS]. Returns the sum of
    the table entries `_warm_next` loaded ahead (meaningless; returned so that the loads are kept)."""
    ns = offsets.shape[0] - 1
    if words.shape[0] == 0:
        for s in range(ns):
            status[s] = OVERRUN
        return np.uint64(0)
    last = words.shape[0] - 1  # reads clamp here; the per-stream end check reports any overrun
    ua, ub = np.uint64(a), np.uint64(1 << LUT_BITS)
    # While a quad decodes, it loads the next quad's table rows a few cache lines per token (`_warm_next`),
    # so that they are in the cache when that quad starts instead of missing one by one on its first tokens
    # (tables of a large model's chunk do not fit the cache: 65,536 rows for 32 layers x 1,024 channels).
    rows = np.uint64(4 * group)
    wide = a > 128
    warmed = np.uint64(0)
    for qd in prange((ns + 3) // 4):
        s0 = 4 * qd
        s1, s2, s3 = min(s0 + 1, ns - 1), min(s0 + 2, ns - 1), min(s0 + 3, ns - 1)
        x0, p0, e0, tp0, tl0, o0, w0 = _dec_lane(words, offsets, s0, n_tok, n_chan, group, a)
        x1, p1, e1, tp1, tl1, o1, w1 = _dec_lane(words, offsets, s1, n_tok, n_chan, group, a)
        x2, p2, e2, tp2, tl2, o2, w2 = _dec_lane(words, offsets, s2, n_tok, n_chan, group, a)
        x3, p3, e3, tp3, tl3, o3, w3 = _dec_lane(words, offsets, s3, n_tok, n_chan, group, a)
        nxt = _first_row(s0 + 4, n_chan, group)
        p_lo, p_end = nxt * ua, min((nxt + rows) * ua, np.uint64(packed.shape[0]))
        l_lo, l_end = nxt * ub, min((nxt + rows) * ub, np.uint64(lut.shape[0]))
        full = min(w0, w1, w2, w3) == group  # no lane narrower than a group: the loop goes without lane checks
        acc = np.uint32(0)
        for t in range(n_tok):
            acc += _warm_next(packed, lut, vals, p_lo, p_end, l_lo, l_end, t, n_tok, wide)
            o = t * n_chan
            for j in range(group):
                uj = np.uint64(j)
                x0, p0 = _dec_write(x0, p0, full or j < w0, last, words, tp0 + uj * ua, tl0 + uj * ub, packed, lut, vals, out, o0 + o + j)
                x1, p1 = _dec_write(x1, p1, full or j < w1, last, words, tp1 + uj * ua, tl1 + uj * ub, packed, lut, vals, out, o1 + o + j)
                x2, p2 = _dec_write(x2, p2, full or j < w2, last, words, tp2 + uj * ua, tl2 + uj * ub, packed, lut, vals, out, o2 + o + j)
                x3, p3 = _dec_write(x3, p3, full or j < w3, last, words, tp3 + uj * ua, tl3 + uj * ub, packed, lut, vals, out, o3 + o + j)
        status[s0] = _dec_status(x0, p0, e0)
        status[s1] = _dec_status(x1, p1, e1)
        status[s2] = _dec_status(x2, p2, e2)
        status[s3] = _dec_status(x3, p3, e3)
        warmed += np.uint64(acc)
    return warmed


def decode_streams(words: np.ndarray, offsets: np.ndarray, n_tok: int, n_chan: int, group: int, packed: np.ndarray,
                   lut: np.ndarray, vals: np.ndarray, out: np.ndarray, status: np.ndarray) -> None:
    """words (uint16, every stream back to back), offsets [n_streams + 1] -> out [LK * T * C].

    packed [N, A] uint32 (cum | freq << 16), lut [N, 2**LUT_BITS] uint8; vals [N, A]: the output element
    (its bits, uint16 or uint32) of each symbol of each table, so the kernel writes the final dtype
    directly. status [n_streams] int32: OK, OVERRUN or BAD_STATE.
    Four streams are decoded in lockstep per iteration (four independent dependency chains that the core
    overlaps; a last short quad repeats its last stream, which writes the same values). Every loop is
    bounded by the symbol count, every read by the word array.
    """
    _decode_kernel(words, offsets, n_tok, n_chan, group, packed.shape[1], packed.reshape(-1), lut.reshape(-1),
                   vals.reshape(-1), out, status)


def n_streams(lk: int, n_chan: int, group: int) -> int:
    return lk * ((n_chan + group - 1) // group)


_INV = 1.0 / np.maximum(np.arange(TOTAL + 1, dtype=np.float64), 1.0)  # [TOTAL + 1]: 1 / f
_F16_LUT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # bits -> value
_BF16_LUT = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
_NO16 = np.empty(0, dtype=np.uint16)
_NO32 = np.empty(0, dtype=np.float32)
_scratch = threading.local()  # per-thread encoder scratch, reused across calls of the same shape


def kernel_input(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x and its kind -> the (x16, x32, lut16) triple the kernels read elements through (see `_load`)."""
    if kind == "f32":
        return _NO16, x, _F16_LUT
    return x, _NO32, (_F16_LUT if kind == "f16" else _BF16_LUT)


def _scratch_for(ns: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf[0].shape != (ns, cap):
        buf = _scratch.buf = (np.empty((ns, cap), dtype=np.uint16), np.empty(ns, dtype=np.int64))
    return buf


def encode(x: np.ndarray, kind: str, n_tok: int, n_chan: int, group: int, step: np.ndarray, m: int,
           tables: CodingTables) -> tuple[np.ndarray, np.ndarray]:
    """Quantize and encode: x [LK * T * C] (float32 values, or float16 / bfloat16 bits as uint16 with
    kind "f16" / "bf16"), step [LK * C] float32 -> (word counts [n_streams] uint32, words uint16)."""
    ns = n_streams(x.size // (n_tok * n_chan), n_chan, group)
    scratch, starts = _scratch_for(ns, n_tok * min(group, n_chan) + 2)
    encode_streams(*kernel_input(x, kind), n_tok, n_chan, group, step, m, tables.packed, _INV, scratch, starts)
    counts = scratch.shape[1] - starts
    offsets = np.zeros(ns + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    words = np.empty(int(offsets[-1]), dtype=np.uint16)
    gather_streams(scratch, starts, offsets, words)
    return counts.astype(np.uint32), words


def set_threads(n: int | None) -> None:
    """Threads for the parallel kernels (None: numba's default, all cores)."""
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS) if n else numba.config.NUMBA_NUM_THREADS)
