"""The quantizer of the `cachegen` codec: levels, step sizes, symbols, value tables, per-chunk tables.

Quantization (per chunk, per layer and K/V, `lk = layer * 2 + kv`):
    step[lk, c] = max(base[lk, c], max|kv[lk, :, c]| / M), rounded up to a bfloat16
    sym[lk, t, c] = round(kv[lk, t, c] / step[lk, c]) + M          in [0, 2M]
`base` comes from the model's codebook when it has steps (version 2): `budget / sqrt(w[lk, c])`, with
`w` the model's measured sensitivity to each (layer, K/V, channel) (the Fisher information of its next-
token distribution, `sensitivity_steps`), so that every element adds the same expected KL: sensitive
channels get fine steps, channels the model hardly reads get coarse ones. Without codebook steps (per-chunk
tables, or a version-1 codebook) `base[lk, c] = alpha[lk] * rms(kv[lk])`, one step per layer and K/V,
`alpha` depending on the level, K vs V and the layer (the first quarter of layers is finer).
The `max|.| / M` floor only widens the step of a channel whose outliers would not fit the alphabet. Every
element's error is at most step / 2 (plus the output dtype's rounding), except on sink tokens
(`sink_tokens`: tokens whose keys are far below the chunk's median norm, the attention sink of a context),
which the codec also stores at 16 bits and writes over the quantized values.

Primitives: `steps` and `quantize` (KV -> step sizes, symbols), `sensitivity_steps` (sensitivity ->
a level's base steps), `count_symbols` (a codebook's profile), `reconstruct` (KV as decoded, for
profiling the model's response),
`dequantize_values` (symbol -> output bits, the decoders' table), `pack_tables` / `unpack_tables` /
`chunk_tables` (the per-chunk frequency tables of a chunk without a codebook). The loops over elements
are numba kernels.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from numba import njit, prange

from codec import rans
from codec.base import CodecError
from codec.rans import _load, _symbol

SINK_RATIO = 0.6  # a token whose keys are below this share of the median token's norm is a sink
MAX_SINKS = 4  # per chunk: bounds what sinks can cost (16 bits per element of each)
SINK_MIN_TOKENS = 16  # shorter chunks have no reliable median
_OUT_BITS = {torch.float16: (torch.int16, np.uint16), torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.int32, np.uint32)}


@dataclass(frozen=True, slots=True)
class Level:
    """One cachegen level: alphabet half-width M; the step from sensitivity (`budget`: the step of an
    element of unit sensitivity, `budget**2 / 24` its expected KL), and the fallback step in units of the
    layer's RMS (`alpha_k`, `alpha_v`, `early_factor`) where the codebook has no steps."""

    m: int
    budget: float
    alpha_k: float
    alpha_v: float
    early_factor: float  # multiplies alpha in the first quarter of the layers

    @property
    def alphabet(self) -> int:
        return 2 * self.m + 1

    def alphas(self, layers: int) -> np.ndarray:
        """[L * 2] float32: alpha of each (layer, K/V)."""
        early = max(1, layers // 4)
        a = np.empty(layers * 2, dtype=np.float32)
        for layer in range(layers):
            f = self.early_factor if layer < early else 1.0
            a[2 * layer], a[2 * layer + 1] = self.alpha_k * f, self.alpha_v * f
        return a


LEVELS: dict[int, Level] = {
    1: Level(m=31, budget=4e-3, alpha_k=1.0, alpha_v=1.4, early_factor=0.7),
    2: Level(m=63, budget=2e-3, alpha_k=0.5, alpha_v=0.7, early_factor=0.7),
    3: Level(m=127, budget=1e-3, alpha_k=0.22, alpha_v=0.3, early_factor=0.7),
    4: Level(m=127, budget=1e-4, alpha_k=0.08, alpha_v=0.1, early_factor=0.7),
}


@njit(parallel=True, cache=True, nogil=True)
def _stats(x16, x32, lut16, n_tok, n_chan, sumsq, maxabs, tok_sumsq):  # pragma: no cover - numba
    """input [LK * T * C] (see `rans._load`) -> sumsq [LK] float64, maxabs [LK * C] float32 (zeroed by the
    caller), tok_sumsq [LK * T] float64 (each token's sum of squares)."""
    for lk in prange(sumsq.shape[0]):
        ss = 0.0
        for t in range(n_tok):
            base = (lk * n_tok + t) * n_chan
            ts = 0.0
            for c in range(n_chan):
                v = _load(x16, x32, lut16, base + c)
                ts += np.float64(v) * v
                a = abs(v)
                if not a <= maxabs[lk * n_chan + c]:  # also propagates NaN
                    maxabs[lk * n_chan + c] = a
            tok_sumsq[lk * n_tok + t] = ts
            ss += ts
        sumsq[lk] = ss


@njit(parallel=True, cache=True, nogil=True)
def _quantize(x16, x32, lut16, n_tok, n_chan, step, m, sym):  # pragma: no cover - numba
    """input [LK * T * C], step [LK * C] float32 -> sym [LK * T * C] uint8 in [0, 2m] (the same rule
    as the fused encoder, `rans._symbol`)."""
    n_lk = step.shape[0] // n_chan
    for lk in prange(n_lk):
        for t in range(n_tok):
            base = (lk * n_tok + t) * n_chan
            for c in range(n_chan):
                sym[base + c] = np.uint8(_symbol(_load(x16, x32, lut16, base + c), step[lk * n_chan + c], m))


@njit(parallel=True, cache=True, nogil=True)
def _count(sym, n_tok, n_chan, alphabet, counts):  # pragma: no cover - numba
    """sym [LK * T * C] -> counts [LK * C, alphabet] += occurrences."""
    n_lk = counts.shape[0] // n_chan
    for lk in prange(n_lk):
        for t in range(n_tok):
            base = (lk * n_tok + t) * n_chan
            for c in range(n_chan):
                counts[lk * n_chan + c, sym[base + c]] += 1


@njit(inline="always")
def _f32_to_f16(u):  # pragma: no cover - numba
    """float32 bits -> float16 bits, round to nearest even (as torch's .to(float16)). Branch-free (both
    results computed, then selected; after F. Giesen's float_to_half_fast3_rtne), so the value-table loop
    does not stall on the zero symbol's subnormal path."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    # a subnormal (or zero) result: adding 0.5 makes the FPU round the 10 mantissa bits into place
    fs = np.float32(np.uint32(a).view(np.float32) + np.float32(0.5))
    sub = np.int64(fs.view(np.uint32)) - 0x3F000000
    norm = (a + (-112 << 23) + 0xFFF + ((a >> 13) & 1)) >> 13
    r = sub if a < 0x38800000 else norm
    r = (0x7E00 if a > 0x7F800000 else 0x7C00) if a >= 0x477FF000 else r  # NaN, or rounds to infinity
    return sign | r


@njit(inline="always")
def _f32_to_bf16(u):  # pragma: no cover - numba
    """float32 bits -> bfloat16 bits, round to nearest even (as torch's .to(bfloat16))."""
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


_ROWS_PER_TASK = 64


@njit(parallel=True, cache=True, nogil=True)
def _value_rows(step, rows, m, kind, vals32, vals16):  # pragma: no cover - numba
    """Build the value table's rows `rows` [R] from step [N] float32: vals32[i, s] = (s - m) * step[i]
    (kind 0, float32 output; exact: an 8-bit integer times a bfloat16), or for kind 1 / 2 (float16 /
    bfloat16 output) vals16[i, s], those values' bits rounded (through a row of scratch that stays in
    the cache)."""
    a = vals32.shape[1] if kind == 0 else vals16.shape[1]
    n_tasks = (rows.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for k in prange(n_tasks):
        row = np.empty(a, dtype=np.float32)
        bits = row.view(np.uint32)
        for r in range(k * _ROWS_PER_TASK, min(rows.shape[0], (k + 1) * _ROWS_PER_TASK)):
            i = rows[r]
            if kind == 0:
                for s in range(a):
                    vals32[i, s] = np.float32(s - m) * step[i]
                continue
            for s in range(a):
                row[s] = np.float32(s - m) * step[i]
            if kind == 1:
                for s in range(a):
                    vals16[i, s] = _f32_to_f16(np.int64(bits[s]))
            else:
                for s in range(a):
                    vals16[i, s] = _f32_to_bf16(np.int64(bits[s]))


def _bf16_up(step: np.ndarray) -> np.ndarray:
    """float32 steps -> bfloat16 bits (uint16), rounded up so that no symbol leaves the alphabet."""
    bits = step.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0xFFFF) >> 16).astype(np.uint16)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _input(kv: torch.Tensor) -> tuple[np.ndarray, str]:
    """kv (CPU) -> (flat array, kind): float32 values ("f32"), or float16 / bfloat16 bits as uint16
    ("f16" / "bf16"), without a conversion pass."""
    kv = kv.detach()
    if kv.dtype in (torch.float16, torch.bfloat16):
        bits = kv.contiguous().view(torch.int16).reshape(-1).numpy().view(np.uint16)
        return bits, ("f16" if kv.dtype == torch.float16 else "bf16")
    return kv.to(torch.float32).contiguous().reshape(-1).numpy(), "f32"


def sensitivity_steps(weights: np.ndarray, level: Level) -> np.ndarray:
    """Sensitivity w [L * 2 * C] (>= 0: expected KL per squared unit of error of each (layer, K/V, channel)
    element) -> the level's base steps [L * 2 * C] float32, `budget / sqrt(w)`: every element then adds
    about `budget**2 / 24` to the expected KL. A channel the model never reads gets a step 10**4 times
    its layer's finest (it codes as zeros), not an infinite one."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0 or not np.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise CodecError("sensitivity weights must be finite, >= 0 and not all zero")
    w = np.maximum(w, w.max() * 1e-8)
    return (level.budget / np.sqrt(w)).astype(np.float32)


def sink_tokens(tok_sumsq: np.ndarray, layers: int, n_tok: int) -> np.ndarray:
    """Each (layer, K/V, token)'s sum of squares [L * 2 * T] -> the chunk's attention-sink tokens (int64,
    sorted, at most `MAX_SINKS`): tokens whose key norm, relative to the chunk's median token in each layer
    and averaged over the layers but the first, is below `SINK_RATIO`. On SmolLM2 the first token of a
    context is the sink (three quarters of the model's sensitivity to its whole context's KV sits on it)
    and its keys are 0.40-0.42 of the median norm, every other token's >= 0.75 (44 contexts measured)."""
    if n_tok < SINK_MIN_TOKENS:
        return np.empty(0, dtype=np.int64)
    k = np.sqrt(tok_sumsq.reshape(layers, 2, n_tok)[:, 0])  # [L, T] key norms
    k = k[1:] if layers > 1 else k
    med = np.median(k, axis=1, keepdims=True)
    ratio = (k / np.where(med > 0, med, 1.0)).mean(axis=0)  # [T]
    idx = np.flatnonzero(ratio < SINK_RATIO)
    if idx.size > MAX_SINKS:
        idx = idx[np.argsort(ratio[idx], kind="stable")[:MAX_SINKS]]
    return np.sort(idx).astype(np.int64)


def steps(kv: torch.Tensor, level: Level, base: np.ndarray | None = None
          ) -> tuple[np.ndarray, str, np.ndarray, np.ndarray, np.ndarray]:
    """kv [L, 2, T, H, D] (CPU), base [L * 2 * C] float32 steps (a codebook's) or None (the layer-RMS
    rule) -> (input, kind, step [L * 2 * C] float32, step bits uint16, sink tokens int64 (`sink_tokens`))."""
    layers, _, n_tok = kv.shape[:3]
    n_chan = kv.shape[3] * kv.shape[4]
    x, kind = _input(kv)
    sumsq = np.zeros(layers * 2, dtype=np.float64)
    maxabs = np.zeros(layers * 2 * n_chan, dtype=np.float32)
    tok_sumsq = np.empty(layers * 2 * n_tok, dtype=np.float64)
    _stats(*rans.kernel_input(x, kind), n_tok, n_chan, sumsq, maxabs, tok_sumsq)
    if not (np.isfinite(sumsq).all() and np.isfinite(maxabs).all()):
        raise CodecError("cachegen cannot encode KV with non-finite values")
    if base is None:
        rms = np.sqrt(sumsq / (n_tok * n_chan)).astype(np.float32)
        base = np.repeat(level.alphas(layers) * rms, n_chan)
    step = np.maximum(base, maxabs / np.float32(level.m))
    step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)  # an all-zero channel codes zeros
    bits = _bf16_up(step)
    step = _bf16_to_f32(bits)
    if not np.isfinite(step).all():
        raise CodecError("cachegen cannot encode KV this large (step size overflows bfloat16)")
    return x, kind, step, bits, sink_tokens(tok_sumsq, layers, n_tok)


def _symbols(kv: torch.Tensor, level: Level, base: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """kv [L, 2, T, H, D] (CPU) -> (symbols [L * 2, T, C] uint8, step [L * 2 * C] float32, step bits uint16,
    sink tokens int64), the steps as in `steps`."""
    layers, _, n_tok = kv.shape[:3]
    n_chan = kv.shape[3] * kv.shape[4]
    x, kind, step, bits, sinks = steps(kv, level, base)
    sym = np.empty(x.size, dtype=np.uint8)
    _quantize(*rans.kernel_input(x, kind), n_tok, n_chan, step, level.m, sym)
    return sym.reshape(layers * 2, n_tok, n_chan), step, bits, sinks


def quantize(kv: torch.Tensor, level: Level, base: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """kv [L, 2, T, H, D] (CPU), base steps as in `steps` -> (symbols [L * 2, T, C] uint8, step bits
    [L * 2 * C] uint16)."""
    sym, _, bits, _ = _symbols(kv, level, base)
    return sym, bits


def reconstruct(kv: torch.Tensor, level: Level, base: np.ndarray | None = None) -> torch.Tensor:
    """kv [L, 2, T, H, D] (CPU) -> float32 KV [L, 2, T, H, D] as the codec decodes it at this level with
    `base` steps (as in `steps`; sink tokens kept as they are): what profiling measures the model on."""
    sym, step, _, sinks = _symbols(kv, level, base)
    vals = (sym.astype(np.float32) - level.m) * step.reshape(sym.shape[0], 1, sym.shape[2])
    out = torch.from_numpy(vals).reshape(kv.shape)
    if sinks.size:
        idx = torch.from_numpy(sinks)
        vals = kv[:, :, idx]
        out[:, :, idx] = vals.to(sink_dtype(vals)).to(torch.float32)
    return out


def sink_dtype(vals: torch.Tensor) -> torch.dtype:
    """The 16-bit dtype sink tokens' values are stored in: their own for float16 / bfloat16 KV; for float32
    KV float16 where it fits, else bfloat16."""
    if vals.dtype in (torch.float16, torch.bfloat16):
        return vals.dtype
    return torch.float16 if vals.abs().max().item() <= 65504 else torch.bfloat16


def count_symbols(kv: torch.Tensor, level: Level, counts: np.ndarray | None = None,
                  base: np.ndarray | None = None) -> np.ndarray:
    """Add one chunk's symbol counts (quantized with `base` steps as in `steps`) to counts [L * 2 * C, A]
    (int64): the profile of a codebook."""
    sym, _ = quantize(kv, level, base)
    n_lk, n_tok, n_chan = sym.shape
    if counts is None:
        counts = np.zeros((n_lk * n_chan, level.alphabet), dtype=np.int64)
    _count(sym.reshape(-1), n_tok, n_chan, level.alphabet, counts)
    return counts


_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_VALUE_TABLES_KEPT = 2  # per thread: the value tables of the last two (size, level, output dtype)s decoded
_value_tables = threading.local()
_NO_VALS32 = np.empty((0, 0), dtype=np.float32)
_NO_VALS16 = np.empty((0, 0), dtype=np.uint16)


@dataclass(slots=True)
class _ValueTable:
    step_bits: np.ndarray  # [N] uint16: the steps its rows were built for
    vals: np.ndarray  # [N, A] uint32 (float32 bits) or uint16


def dequantize_values(step_bits: np.ndarray, level: Level, dtype: torch.dtype) -> np.ndarray:
    """[N] step bits -> [N, A] the output element's bits for each symbol (uint16 or uint32).

    The returned array is a per-thread buffer, valid until this thread's next call. It is kept between
    calls (per thread, the last `_VALUE_TABLES_KEPT` sizes, levels and output dtypes), and a call rebuilds
    only the rows whose step changed: a model's chunks take most steps from its codebook (on SmolLM2 at
    levels 1-3, ~27 of 11,520 differ from one chunk to the next)."""
    n, a, kind = step_bits.size, level.alphabet, _OUT_KIND[dtype]
    tables = getattr(_value_tables, "by_key", None)
    if tables is None:
        tables = _value_tables.by_key = {}
    key = (n, a, level.m, kind)
    table = tables.pop(key, None)
    if table is None:
        vals = np.empty((n, a), dtype=np.uint32 if kind == 0 else np.uint16)
        table = _ValueTable(step_bits.copy(), vals)
        rows = np.arange(n, dtype=np.int64)
    else:
        rows = np.flatnonzero(table.step_bits != step_bits)
    if rows.size:
        step = rans._BF16_LUT[step_bits]
        if kind == 0:
            _value_rows(step, rows, level.m, kind, table.vals.view(np.float32), _NO_VALS16)
        else:
            _value_rows(step, rows, level.m, kind, _NO_VALS32, table.vals)
        table.step_bits[rows] = step_bits[rows]
    tables[key] = table  # most recent last
    while len(tables) > _VALUE_TABLES_KEPT:
        tables.pop(next(iter(tables)))
    return table.vals


# ---- per-chunk tables (the fallback when no codebook exists) ----

def pack_tables(freq: np.ndarray) -> bytes:
    """freq [N, A] (zeros outside each row's [lo, hi]) -> zstd(lo | hi | freq[lo..hi] per row)."""
    nz = freq > 0
    a = freq.shape[1]
    lo = np.argmax(nz, axis=1)
    hi = a - 1 - np.argmax(nz[:, ::-1], axis=1)
    idx = np.arange(a)[None, :]
    inside = (idx >= lo[:, None]) & (idx <= hi[:, None])
    blob = lo.astype(np.uint8).tobytes() + hi.astype(np.uint8).tobytes() + freq[inside].astype("<u2").tobytes()
    return zstandard.ZstdCompressor(level=3).compress(blob)


def unpack_tables(data: memoryview, n: int, a: int) -> rans.CodingTables:
    bound = 2 * n + 2 * n * a
    try:
        blob = zstandard.ZstdDecompressor().decompress(data, max_output_size=bound)
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt per-chunk tables: {e}") from None
    if len(blob) < 2 * n:
        raise CodecError("per-chunk tables are truncated")
    lo = np.frombuffer(blob, dtype=np.uint8, count=n).astype(np.int64)
    hi = np.frombuffer(blob, dtype=np.uint8, count=n, offset=n).astype(np.int64)
    if np.any(hi >= a) or np.any(lo > hi):
        raise CodecError("per-chunk tables have symbol ranges outside the alphabet")
    width = hi - lo + 1
    if len(blob) != 2 * n + 2 * int(width.sum()):
        raise CodecError("per-chunk tables have the wrong size")
    idx = np.arange(a)[None, :]
    inside = (idx >= lo[:, None]) & (idx <= hi[:, None])
    freq = np.zeros((n, a), dtype=np.uint32)
    freq[inside] = np.frombuffer(blob, dtype="<u2", offset=2 * n)
    try:
        return rans.CodingTables.from_freqs(freq)
    except ValueError as e:
        raise CodecError(f"per-chunk tables: {e}") from None


def chunk_tables(sym: np.ndarray, level: Level) -> np.ndarray:
    """symbols [LK, T, C] -> exact per-chunk frequency tables [LK * C, A]."""
    n_lk, n_tok, n_chan = sym.shape
    counts = np.zeros((n_lk * n_chan, level.alphabet), dtype=np.int64)
    _count(sym.reshape(-1), n_tok, n_chan, level.alphabet, counts)
    return rans.normalize_freqs(counts, floor=False)
