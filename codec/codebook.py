"""Per-model codebooks: the symbol distributions of the `cachegen` codec, profiled once per model.

A `Codebook` holds, for one model fingerprint and layout (L layers, C = H * D channels) and for each
cachegen level, one frequency table per (layer, K/V, channel) over that level's alphabet and (version 2)
the level's base step per (layer, K/V, channel), derived from the model's measured sensitivity
(`cachegen_quant.sensitivity_steps`). With a codebook a chunk carries only its step sizes and stream
lengths; without one it carries its own tables.

File (before zstd), little-endian: magic b"KVCB" | version u16 | PREC u8 | layers u16 | channels u32 |
n_levels u8 | fingerprint length u8 | fingerprint | per level: level u8 | A u16 | [version 2: has steps u8]
| freq u16 [rows * A] | [has steps: step bits u16 [rows], bfloat16] | xxh3-64 of all before, u64
(rows = layers * 2 * channels). Version-1 files (no steps) still load: their levels use the layer-RMS steps.

Primitives:
- `profile_codebook(fingerprint, counts, layers, channels, steps)`: normalize the symbol counts of sample
  chunks (quantized with `steps`) into tables;
- `Codebook.to_bytes()` / `Codebook.from_bytes()`: a versioned, checksummed, zstd-compressed file
  (`*.kvcb`); `digest` (16 bytes) names its exact content and goes into each record's codec params;
- `CodebookRegistry`: codebooks by model fingerprint (for encoding) and by digest (for decoding), loaded
  from directories: `default_codebook_dirs()` = the user's `~/.cache/kvstore/codebooks` and the
  `connectors/assets/*/` folders shipped beside this package. `codebooks` is the process-wide instance.
- `MissingCodebooks`: chunks of a model that had to be encoded without its codebook (per-chunk tables,
  ~7% more bits), counted per fingerprint and logged as a warning once per fingerprint;
  `missing_codebooks` is the process-wide instance (the store's stats and the sidecar's metrics read it).

A record names its codebook by digest, so a codebook that changes can never decode old records wrongly:
an unknown digest is a `CodecError`, which the store counts as a miss.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
import zstandard

from codec.base import CodecError
from codec.rans import PREC, CodingTables, normalize_freqs

MAGIC = b"KVCB"
VERSION = 2
_READS = (1, 2)
SUFFIX = ".kvcb"
_HEAD = struct.Struct("<4sHBHIB")  # magic, version, PREC, layers, channels, n_levels
_MAX_FILE = 256 << 20

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Codebook:
    fingerprint: str  # the model's
    layers: int
    channels: int  # H * D
    freqs: dict[int, np.ndarray]  # level -> [layers * 2 * channels, A] uint32 summing to 2**PREC
    step_bits: dict[int, np.ndarray] = field(default_factory=dict)  # level -> [layers * 2 * channels] bf16 bits
    _bytes: bytes | None = field(default=None, repr=False)
    _tables: dict[int, CodingTables] = field(default_factory=dict, repr=False)
    _steps: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def base_steps(self, level: int) -> np.ndarray | None:
        """[layers * 2 * channels] float32: the level's base steps, or None (a level without steps)."""
        if level not in self.step_bits:
            return None
        s = self._steps.get(level)
        if s is None:
            s = self._steps[level] = (self.step_bits[level].astype(np.uint32) << 16).view(np.float32)
        return s

    def tables(self, level: int) -> CodingTables:
        t = self._tables.get(level)
        if t is None:
            if level not in self.freqs:
                raise CodecError(f"codebook for {self.fingerprint} has no tables for level {level}")
            t = self._tables[level] = CodingTables.from_freqs(self.freqs[level])
        return t

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            fp = self.fingerprint.encode()
            parts = [_HEAD.pack(MAGIC, VERSION, PREC, self.layers, self.channels, len(self.freqs)),
                     struct.pack("<B", len(fp)), fp]
            for level in sorted(self.freqs):
                f = self.freqs[level]
                st = self.step_bits.get(level)
                parts += [struct.pack("<BHB", level, f.shape[1], st is not None), f.astype("<u2").tobytes()]
                if st is not None:
                    parts.append(st.astype("<u2").tobytes())
            body = b"".join(parts)
            self._bytes = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
        return self._bytes

    @property
    def digest(self) -> bytes:
        return xxhash.xxh3_128_digest(self.to_bytes())

    def save(self, directory: Path) -> Path:
        """Write `<dir>/<fingerprint>.kvcb` (atomically: temp file, then rename)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / (self.fingerprint.replace("/", "_") + SUFFIX)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(zstandard.ZstdCompressor(level=19).compress(self.to_bytes()))
        tmp.replace(path)
        return path

    @classmethod
    def from_bytes(cls, data: bytes) -> "Codebook":
        """Uncompressed codebook bytes -> Codebook; `CodecError` on anything malformed."""
        if len(data) < _HEAD.size + 9:
            raise CodecError("codebook is truncated")
        body, (stored,) = data[:-8], struct.unpack("<Q", data[-8:])
        if xxhash.xxh3_64_intdigest(body) != stored:
            raise CodecError("codebook checksum mismatch")
        magic, version, prec, layers, channels, n_levels = _HEAD.unpack_from(body)
        if magic != MAGIC or version not in _READS or prec != PREC:
            raise CodecError(f"not a codebook of version {' or '.join(map(str, _READS))} with {PREC}-bit tables")
        pos = _HEAD.size
        n = body[pos]
        fingerprint = body[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
        freqs, tables, step_bits = {}, {}, {}
        rows = layers * 2 * channels
        level_head = struct.Struct("<BH" if version == 1 else "<BHB")
        for _ in range(n_levels):
            if pos + level_head.size > len(body):
                raise CodecError("codebook is truncated")
            level, a, *has_steps = level_head.unpack_from(body, pos)
            pos += level_head.size
            nbytes = rows * a * 2 + (2 * rows if has_steps and has_steps[0] else 0)
            if pos + nbytes > len(body):
                raise CodecError("codebook is truncated")
            f = np.frombuffer(body, dtype="<u2", count=rows * a, offset=pos).reshape(rows, a).astype(np.uint32)
            pos += rows * a * 2
            if has_steps and has_steps[0]:
                st = np.frombuffer(body, dtype="<u2", count=rows, offset=pos).astype(np.uint16)
                pos += 2 * rows
                v = (st.astype(np.uint32) << 16).view(np.float32)
                if not (np.isfinite(v).all() and (v > 0).all()):
                    raise CodecError(f"codebook level {level} has steps that are not finite and positive")
                step_bits[level] = st
            try:
                tables[level] = CodingTables.from_freqs(f)
            except ValueError as e:
                raise CodecError(f"codebook level {level}: {e}") from None
            freqs[level] = f
        if pos != len(body):
            raise CodecError("codebook has trailing bytes")
        return cls(fingerprint, layers, channels, freqs, step_bits, data, tables)

    @classmethod
    def load(cls, path: Path) -> "Codebook":
        raw = path.read_bytes()
        try:
            data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=_MAX_FILE)
        except zstandard.ZstdError as e:
            raise CodecError(f"codebook {path} is not zstd: {e}") from None
        return cls.from_bytes(data)


def profile_codebook(fingerprint: str, symbol_counts: dict[int, np.ndarray], layers: int, channels: int,
                     steps: dict[int, np.ndarray] | None = None) -> Codebook:
    """Counts per level [layers * 2 * channels, A] (from `cachegen_quant.count_symbols` over sample chunks,
    quantized with the level's `steps` [layers * 2 * channels] float32 where given) -> a codebook; every
    symbol keeps a non-zero frequency so any chunk can be coded. Steps are kept as bfloat16, rounded up."""
    rows = layers * 2 * channels
    freqs = {lv: normalize_freqs(c, floor=True) for lv, c in symbol_counts.items()}
    for lv, f in freqs.items():
        if f.shape[0] != rows:
            raise CodecError(f"level {lv} counts have {f.shape[0]} rows, expected {rows}")
    step_bits = {}
    for lv, st in (steps or {}).items():
        st = np.asarray(st, dtype=np.float32).reshape(-1)
        if lv not in freqs or st.size != rows or not (np.isfinite(st).all() and (st > 0).all()):
            raise CodecError(f"level {lv} steps must be {rows} finite positive values of a profiled level")
        step_bits[lv] = ((st.view(np.uint32).astype(np.uint64) + 0xFFFF) >> 16).astype(np.uint16)
    return Codebook(fingerprint, layers, channels, freqs, step_bits)


def default_codebook_dirs() -> list[Path]:
    """Where codebooks are looked up by default: the user's cache, then the shipped model assets."""
    shipped = Path(__file__).resolve().parent.parent / "connectors" / "assets"
    dirs = [Path.home() / ".cache" / "kvstore" / "codebooks"]
    if shipped.is_dir():
        dirs += sorted(p for p in shipped.iterdir() if p.is_dir())
    return dirs


class CodebookRegistry:
    """Codebooks by model fingerprint and by digest. Directories are scanned on first use and again on
    a miss (at most once per `rescan_s`), so a codebook profiled by another process is found."""

    def __init__(self, dirs: list[Path] | None = None, rescan_s: float = 5.0) -> None:
        self._dirs = list(dirs) if dirs is not None else default_codebook_dirs()
        self._by_fingerprint: dict[str, Codebook] = {}
        self._by_digest: dict[bytes, Codebook] = {}
        self._seen: set[Path] = set()
        self._last_scan = -1e9
        self._rescan_s = rescan_s
        self._lock = threading.Lock()

    def register(self, cb: Codebook) -> None:
        with self._lock:
            self._by_fingerprint[cb.fingerprint] = cb
            self._by_digest[cb.digest] = cb

    def _scan(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_scan < self._rescan_s:
            return
        self._last_scan = now
        for d in self._dirs:
            if not d.is_dir():
                continue
            for path in sorted(d.glob("*" + SUFFIX)):
                if path in self._seen:
                    continue
                self._seen.add(path)
                try:
                    cb = Codebook.load(path)
                except (OSError, CodecError):
                    continue  # a broken file is skipped: records that need it decode as misses
                self._by_fingerprint.setdefault(cb.fingerprint, cb)
                self._by_digest[cb.digest] = cb

    def for_fingerprint(self, fingerprint: str) -> Codebook | None:
        with self._lock:
            if fingerprint not in self._by_fingerprint:
                self._scan()
            return self._by_fingerprint.get(fingerprint)

    def by_digest(self, digest: bytes) -> Codebook | None:
        with self._lock:
            if digest not in self._by_digest:
                self._scan()
            return self._by_digest.get(digest)


codebooks = CodebookRegistry()


class MissingCodebooks:
    """Chunks encoded without a codebook although their model was named: per fingerprint, how many. The
    first one of each fingerprint logs a warning that says how to profile the codebook."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, fingerprint: str, chunks: int = 1) -> None:
        with self._lock:
            first = fingerprint not in self._counts
            self._counts[fingerprint] = self._counts.get(fingerprint, 0) + chunks
        if first:
            log.warning("no cachegen codebook for model %s: its chunks carry per-chunk tables (~7%% more bits); "
                        "profile one with `python -m connectors.profile --model ... --dtype ... --fingerprint %s` "
                        "in the dtype the model is served in (see docs/CODEC.md)", fingerprint, fingerprint)

    def snapshot(self) -> dict[str, int]:
        """{fingerprint: chunks encoded with per-chunk tables} since the process started."""
        with self._lock:
            return dict(self._counts)


missing_codebooks = MissingCodebooks()
