"""The entropy coder: interleaved-free rANS streams over per-(layer, K/V, channel) distributions, in numba.

Primitives:
- `normalize_freqs(counts, floor)`: integer frequency tables summing to `2**PREC` (PREC = 15 bits);
- `CodingTables`: the decode-side tables built once per set of frequency tables (cumulative sums and a
  coarse slot -> symbol lookup);
- `encode_streams` / `decode_streams`: many independent streams, encoded and decoded in parallel
  (`numba.prange` over streams).

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

    @property
    def alphabet(self) -> int:
        return self.freq.shape[1]

    @classmethod
    def from_freqs(cls, freq: np.ndarray) -> "CodingTables":
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
        return cls(freq, cum, lut)


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


@njit(parallel=True, cache=True, nogil=True)
def encode_streams(sym, n_tok, n_chan, group, freq, cum, scratch, starts):  # pragma: no cover - numba
    """sym [LK * T * C] uint8 -> per stream, words at scratch[s, starts[s]:] (uint16).

    scratch: [n_streams, T * group + 2] uint16; starts: [n_streams] int64 (written).
    Returns nothing; a symbol with frequency 0 never occurs (the caller's tables guarantee it).
    """
    n_groups = (n_chan + group - 1) // group
    n_streams = scratch.shape[0]
    cap = scratch.shape[1]
    for s in prange(n_streams):
        lk = s // n_groups
        c0 = (s % n_groups) * group
        c1 = min(c0 + group, n_chan)
        x = np.int64(RANS_L)
        p = cap
        for t in range(n_tok - 1, -1, -1):
            base = (lk * n_tok + t) * n_chan
            for c in range(c1 - 1, c0 - 1, -1):
                tb = lk * n_chan + c
                sy = sym[base + c]
                f = np.int64(freq[tb, sy])
                if x >= (f << (32 - PREC)):
                    p -= 1
                    scratch[s, p] = x & 0xFFFF
                    x >>= 16
                x = ((x // f) << PREC) + (x % f) + np.int64(cum[tb, sy])
        p -= 2
        scratch[s, p] = (x >> 16) & 0xFFFF
        scratch[s, p + 1] = x & 0xFFFF
        starts[s] = p


@njit(parallel=True, cache=True, nogil=True)
def gather_streams(scratch, starts, offsets, words):  # pragma: no cover - numba
    """Concatenate scratch[s, starts[s]:] into words[offsets[s]:offsets[s + 1]]."""
    for s in prange(scratch.shape[0]):
        n = offsets[s + 1] - offsets[s]
        words[offsets[s] : offsets[s] + n] = scratch[s, starts[s] : starts[s] + n]


@njit(parallel=True, cache=True, nogil=True)
def decode_streams(words, offsets, n_tok, n_chan, group, freq, cum, lut, vals, out, status):  # pragma: no cover
    """words (uint16, every stream back to back), offsets [n_streams + 1] -> out [LK * T * C].

    vals [N, A]: the output element (its bits, uint16 or uint32) of each symbol of each table, so the
    kernel writes the final dtype directly. status [n_streams] int32: OK, OVERRUN or BAD_STATE.
    """
    n_groups = (n_chan + group - 1) // group
    n_streams = offsets.shape[0] - 1
    mask = TOTAL - 1
    for s in prange(n_streams):
        lk = s // n_groups
        c0 = (s % n_groups) * group
        c1 = min(c0 + group, n_chan)
        pos = offsets[s]
        end = offsets[s + 1]
        if end - pos < 2:
            status[s] = OVERRUN
            continue
        x = (np.int64(words[pos]) << 16) | np.int64(words[pos + 1])
        pos += 2
        bad = OK
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


def n_streams(lk: int, n_chan: int, group: int) -> int:
    return lk * ((n_chan + group - 1) // group)


def encode(sym: np.ndarray, n_tok: int, n_chan: int, group: int, tables: CodingTables) -> tuple[np.ndarray, np.ndarray]:
    """sym [LK, T, C] uint8 -> (word counts [n_streams] uint32, words uint16)."""
    lk = sym.shape[0]
    ns = n_streams(lk, n_chan, group)
    scratch = np.empty((ns, n_tok * min(group, n_chan) + 2), dtype=np.uint16)
    starts = np.empty(ns, dtype=np.int64)
    encode_streams(sym.reshape(-1), n_tok, n_chan, group, tables.freq, tables.cum, scratch, starts)
    counts = scratch.shape[1] - starts
    offsets = np.zeros(ns + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    words = np.empty(int(offsets[-1]), dtype=np.uint16)
    gather_streams(scratch, starts, offsets, words)
    return counts.astype(np.uint32), words


def set_threads(n: int | None) -> None:
    """Threads for the parallel kernels (None: numba's default, all cores)."""
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS) if n else numba.config.NUMBA_NUM_THREADS)
