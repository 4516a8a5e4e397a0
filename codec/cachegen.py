"""The `cachegen` codec: layer-dependent uniform quantization (`codec.cachegen_quant`), then rANS
(`codec.rans`) over per-(layer, K/V, channel) distributions from a per-model codebook (or a table carried
by the chunk when there is none).

Payload (little-endian), version 2:
    magic b"KVCG" | version u8 | level u8 | flags u8 (bit 0: per-chunk tables, bit 1: sink tokens) | group u8
    | layers u16 | channels u32 | tokens u32
    | steps u16 [L * 2 * C] (bfloat16 bits)
    | if per-chunk tables: blob_len u32 | zstd(lo u8 [N] | hi u8 [N] | freq u16 [sum(hi - lo + 1)])
    | if sink tokens: n u8 | dtype u8 (1 float16, 2 bfloat16) | token u32 [n] | values u16 [n, L, 2, C]
    | word counts u32 [n_streams] | words u16 [sum(counts)]
Sink tokens (`cachegen_quant.sink_tokens`) are coded in the streams like every token and then written
over with their 16-bit values: the rANS streams are those of version 1. Version-1 payloads (no sink
section) still decode.
Params (in the record header): version u8 | level u8 | codebook digest (16 bytes) or nothing.
The quantizer's names (`LEVELS`, `quantize`, `count_symbols`, ...) are re-exported here, the codec's face.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from codec import rans
from codec.base import Codec, CodecError, register
from codec.cachegen_quant import (_OUT_BITS, LEVELS, Level, _bf16_to_f32, _quantize, chunk_tables, count_symbols,
                                  dequantize_values, pack_tables, quantize, sensitivity_steps, sink_dtype, steps,
                                  unpack_tables)
from codec.codebook import Codebook, codebooks, missing_codebooks

FORMAT_VERSION = 2
_READS = (1, 2)
PARAMS_VERSION = 1
# Bits per element expected of each level before a record is measured (`nominal_bits`): SmolLM2's, with
# its codebook (docs/PERFORMANCE.md); per-chunk tables add ~0.8.
NOMINAL_BITS = {1: 1.2, 2: 2.0, 3: 2.9, 4: 5.9}
MAGIC = b"KVCG"
GROUP = 16  # channels per stream: 4096 streams for an 8B model's chunk, enough for a GPU
_HEAD = struct.Struct("<4sBBBBHII")
_FLAG_CHUNK_TABLES = 1
_FLAG_SINKS = 2
_SINK_DTYPES = {1: torch.float16, 2: torch.bfloat16}

__all__ = ["GROUP", "LEVELS", "CacheGenCodec", "Level", "Parsed", "chunk_tables", "count_symbols", "dequantize_values",
           "pack_tables", "quantize", "sensitivity_steps", "steps", "unpack_tables"]


@dataclass(frozen=True, slots=True)
class Parsed:
    """A checked payload, ready for a CPU or CUDA stream decoder."""

    level: Level
    layers: int
    channels: int
    tokens: int
    group: int
    step_bits: np.ndarray  # [L * 2 * C] uint16
    tables: rans.CodingTables
    offsets: np.ndarray  # [n_streams + 1] int64, in words
    words: np.ndarray  # uint16
    sinks: np.ndarray  # [n] int64 token indices
    sink_values: torch.Tensor  # [L, 2, n, C] float16 or bfloat16: what the sink tokens decode to

    def write_sinks(self, out: torch.Tensor) -> None:
        """Write the sink tokens' values into out [L, 2, T, H, D] (any device), after the streams."""
        if self.sinks.size:
            idx = torch.from_numpy(self.sinks).to(out.device)
            vals = self.sink_values.to(out.device).reshape(self.layers, 2, -1, *out.shape[3:])
            out.index_copy_(2, idx, vals.to(out.dtype))


@register
class CacheGenCodec(Codec):
    name = "cachegen"
    lossless = False

    def __init__(self, level: int = 2, codebook: Codebook | None = None, fingerprint: str | None = None) -> None:
        """`fingerprint`: the model whose chunks this codec encodes, where `bind` found no codebook for it:
        each chunk encoded is then counted in `codec.codebook.missing_codebooks` (a warning the first time)."""
        if level not in LEVELS:
            raise CodecError(f"cachegen level must be one of {sorted(LEVELS)}, got {level}")
        self.level = level
        self.spec = LEVELS[level]
        self.codebook = codebook
        self.fingerprint = codebook.fingerprint if codebook is not None else fingerprint
        self._bound: dict[str, CacheGenCodec] = {}

    # -- parameters and model binding --

    @classmethod
    def at_level(cls, level: int) -> "CacheGenCodec":
        return cls(level=level)

    def nominal_bits(self, element_bits: int) -> float:
        return NOMINAL_BITS[self.level]

    def params(self) -> bytes:
        digest = self.codebook.digest if self.codebook is not None else b""
        return struct.pack("<BB", PARAMS_VERSION, self.level) + digest

    @classmethod
    def from_params(cls, params: bytes) -> "CacheGenCodec":
        if len(params) not in (2, 18):
            raise CodecError(f"cachegen parameters must be 2 or 18 bytes, got {len(params)}")
        version, level = struct.unpack_from("<BB", params)
        if version != PARAMS_VERSION:
            raise CodecError(f"cachegen parameters version {version} is not supported")
        codebook = None
        if len(params) == 18:
            codebook = codebooks.by_digest(bytes(params[2:]))
            if codebook is None:
                raise CodecError(f"cachegen codebook {bytes(params[2:]).hex()} is not available here")
        return cls(level, codebook)

    def bind(self, fingerprint: str) -> "CacheGenCodec":
        """This codec with the codebook of the model `fingerprint` names, where one is registered; else the
        per-chunk tables, counted and warned about (`missing_codebooks`). A miss is looked up again on the
        next bind (the registry rescans its folders at most every few seconds), so a codebook profiled
        meanwhile is picked up."""
        if self.codebook is not None and self.codebook.fingerprint == fingerprint:
            return self
        bound = self._bound.get(fingerprint)
        if bound is None or bound.codebook is None:
            cb = codebooks.for_fingerprint(fingerprint)
            if cb is not None:
                bound = self._bound[fingerprint] = CacheGenCodec(self.level, cb)
            elif bound is None:
                bound = self._bound[fingerprint] = CacheGenCodec(self.level, fingerprint=fingerprint)
        return bound

    # -- encode --

    def encode(self, kv: torch.Tensor) -> bytes:
        """kv [L, 2, T, H, D] (CPU) -> payload."""
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise CodecError(f"KV must be [L, 2, T, H, D], got {tuple(kv.shape)}")
        layers, _, n_tok, heads, dim = kv.shape
        n_chan = heads * dim
        if layers >= 1 << 16 or n_tok == 0:
            raise CodecError(f"cachegen cannot encode KV of shape {tuple(kv.shape)}")
        base = None
        if self.codebook is not None:
            if (self.codebook.layers, self.codebook.channels) != (layers, n_chan):
                raise CodecError(
                    f"codebook of {self.codebook.fingerprint} is for {self.codebook.layers} layers x "
                    f"{self.codebook.channels} channels, KV has {layers} x {n_chan}")
            base = self.codebook.base_steps(self.level)
        x, kind, step, step_bits, sinks = steps(kv, self.spec, base)
        flags = _FLAG_SINKS if sinks.size else 0
        parts = [_HEAD.pack(MAGIC, FORMAT_VERSION, self.level, flags, GROUP, layers, n_chan, n_tok)]
        if self.codebook is not None:
            tables = self.codebook.tables(self.level)
            parts.append(step_bits.astype("<u2").tobytes())
        else:
            if self.fingerprint is not None:
                missing_codebooks.count(self.fingerprint)
            sym = np.empty(x.size, dtype=np.uint8)
            _quantize(*rans.kernel_input(x, kind), n_tok, n_chan, step, self.spec.m, sym)
            freq = chunk_tables(sym.reshape(layers * 2, n_tok, n_chan), self.spec)
            tables = rans.CodingTables.from_freqs(freq)
            blob = pack_tables(freq)
            parts[0] = _HEAD.pack(MAGIC, FORMAT_VERSION, self.level, flags | _FLAG_CHUNK_TABLES, GROUP, layers, n_chan, n_tok)
            parts += [step_bits.astype("<u2").tobytes(), struct.pack("<I", len(blob)), blob]
        if sinks.size:
            parts.append(_sink_section(kv, sinks))
        counts, words = rans.encode(x, kind, n_tok, n_chan, GROUP, step, self.spec.m, tables)
        parts += [counts.astype("<u4", copy=False).tobytes(), words.astype("<u2", copy=False).tobytes()]
        return b"".join(parts)

    # -- decode --

    def parse(self, payload: memoryview, shape: tuple[int, ...]) -> Parsed:
        """Check a payload against the output shape [L, 2, T, H, D]; `CodecError` on anything off."""
        buf = memoryview(payload).cast("B")
        if len(buf) < _HEAD.size:
            raise CodecError("cachegen payload is truncated")
        magic, version, level, flags, group, layers, n_chan, n_tok = _HEAD.unpack_from(buf)
        if magic != MAGIC:
            raise CodecError("not a cachegen payload (bad magic)")
        if version not in _READS:
            raise CodecError(f"cachegen payload version {version} is not supported (this build reads "
                             f"{' and '.join(map(str, _READS))})")
        known = _FLAG_CHUNK_TABLES | (_FLAG_SINKS if version >= 2 else 0)
        if level != self.level or flags & ~known or group == 0:
            raise CodecError(f"cachegen payload header (level {level}, flags {flags}, group {group}) does not match its params")
        want = (shape[0], shape[2], shape[3] * shape[4])
        if (layers, n_tok, n_chan) != want:
            raise CodecError(f"cachegen payload holds {layers} layers x {n_tok} tokens x {n_chan} channels, output wants {want}")
        spec = self.spec
        n_tab = layers * 2 * n_chan
        pos = _HEAD.size
        if len(buf) < pos + 2 * n_tab:
            raise CodecError("cachegen payload is truncated (steps)")
        step_bits = np.frombuffer(buf, dtype="<u2", count=n_tab, offset=pos).astype(np.uint16)
        pos += 2 * n_tab
        if not np.isfinite(_bf16_to_f32(step_bits)).all():
            raise CodecError("cachegen payload has non-finite step sizes")
        if flags & _FLAG_CHUNK_TABLES:
            if self.codebook is not None:
                raise CodecError("cachegen payload carries tables but its params name a codebook")
            if len(buf) < pos + 4:
                raise CodecError("cachegen payload is truncated (tables)")
            (blob_len,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if len(buf) < pos + blob_len:
                raise CodecError("cachegen payload is truncated (tables)")
            tables = unpack_tables(buf[pos : pos + blob_len], n_tab, spec.alphabet)
            pos += blob_len
        else:
            if self.codebook is None:
                raise CodecError("cachegen payload needs a codebook its params do not name")
            if (self.codebook.layers, self.codebook.channels) != (layers, n_chan):
                raise CodecError("cachegen payload does not fit its codebook's layout")
            tables = self.codebook.tables(self.level)
        sinks, sink_values = _NO_SINKS, None
        if flags & _FLAG_SINKS:
            sinks, sink_values, pos = _parse_sinks(buf, pos, layers, n_chan, n_tok)
        ns = rans.n_streams(layers * 2, n_chan, group)
        if len(buf) < pos + 4 * ns:
            raise CodecError("cachegen payload is truncated (stream lengths)")
        counts = np.frombuffer(buf, dtype="<u4", count=ns, offset=pos).astype(np.int64)
        pos += 4 * ns
        offsets = np.zeros(ns + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        if (len(buf) - pos) != 2 * offsets[-1]:
            raise CodecError(f"cachegen streams hold {len(buf) - pos} bytes, lengths say {2 * offsets[-1]}")
        words = np.frombuffer(buf, dtype="<u2", offset=pos)
        if sink_values is None:
            sink_values = torch.empty(layers, 2, 0, n_chan, dtype=torch.float16)
        return Parsed(spec, layers, n_chan, n_tok, group, step_bits, tables, offsets, words, sinks, sink_values)

    def decode(self, payload: memoryview, out: torch.Tensor) -> None:
        """payload -> out [L, 2, T, H, D] (CPU, contiguous, float16/bfloat16/float32)."""
        if out.dtype not in _OUT_BITS or not out.is_contiguous() or out.dim() != 5:
            raise CodecError(f"cachegen decodes into a contiguous 5-d float tensor, got {out.dtype} {tuple(out.shape)}")
        p = self.parse(payload, tuple(out.shape))
        vals = dequantize_values(p.step_bits, p.level, out.dtype)
        ibits, _ = _OUT_BITS[out.dtype]
        dst = out.view(ibits).reshape(-1).numpy().view(vals.dtype)
        status = np.empty(p.offsets.size - 1, dtype=np.int32)
        rans.decode_streams(p.words, p.offsets, p.tokens, p.channels, p.group, p.tables.packed, p.tables.lut,
                            vals, dst, status)
        if status.any():
            bad = int(np.flatnonzero(status)[0])
            what = "runs past its end" if status[bad] == rans.OVERRUN else "ends in a wrong state"
            raise CodecError(f"cachegen stream {bad} is corrupt ({what})")
        p.write_sinks(out)

    def _table_blob(self, sym: np.ndarray, freq: np.ndarray | None = None) -> bytes:
        """The packed per-chunk tables of these symbols (what a chunk without a codebook carries)."""
        return pack_tables(chunk_tables(sym, self.spec) if freq is None else freq)

    def symbols(self, kv: torch.Tensor) -> np.ndarray:
        """The quantized symbols [L * 2, T, C] this codec codes for kv (for tests and profiling)."""
        base = self.codebook.base_steps(self.level) if self.codebook is not None else None
        return quantize(kv, self.spec, base)[0]


_NO_SINKS = np.empty(0, dtype=np.int64)


def _sink_section(kv: torch.Tensor, sinks: np.ndarray) -> bytes:
    """kv [L, 2, T, H, D], sink token indices -> n u8 | dtype u8 | token u32 [n] | values u16 [L, 2, n, C]:
    the input's own bits for float16 / bfloat16 KV; float32 KV as float16 where it fits, else bfloat16."""
    layers, _, _, heads, dim = kv.shape
    vals = kv[:, :, torch.from_numpy(sinks)].reshape(layers, 2, sinks.size, heads * dim)
    dtype = sink_dtype(vals)
    code = 1 if dtype == torch.float16 else 2
    bits = vals.to(dtype).contiguous().view(torch.int16).numpy().astype("<u2")
    return struct.pack("<BB", sinks.size, code) + sinks.astype("<u4").tobytes() + bits.tobytes()


def _parse_sinks(buf: memoryview, pos: int, layers: int, n_chan: int, n_tok: int) -> tuple[np.ndarray, torch.Tensor, int]:
    """The sink section at `pos` -> (token indices, values [L, 2, n, C], position after); `CodecError` on a
    section that does not fit the payload or the chunk."""
    if len(buf) < pos + 2:
        raise CodecError("cachegen payload is truncated (sink tokens)")
    n, code = struct.unpack_from("<BB", buf, pos)
    pos += 2
    if n == 0 or code not in _SINK_DTYPES:
        raise CodecError(f"cachegen payload has a bad sink section ({n} tokens, dtype {code})")
    size = 4 * n + 2 * n * layers * 2 * n_chan
    if len(buf) < pos + size:
        raise CodecError("cachegen payload is truncated (sink tokens)")
    sinks = np.frombuffer(buf, dtype="<u4", count=n, offset=pos).astype(np.int64)
    if (sinks >= n_tok).any():
        raise CodecError("cachegen payload names sink tokens outside the chunk")
    pos += 4 * n
    bits = np.frombuffer(buf, dtype="<u2", count=n * layers * 2 * n_chan, offset=pos).astype(np.int16)
    values = torch.from_numpy(bits).view(_SINK_DTYPES[code]).reshape(layers, 2, n, n_chan)
    return sinks, values, pos + 2 * n * layers * 2 * n_chan
