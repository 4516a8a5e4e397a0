"""The manifest of a precompute job: which chunk keys hold the KV of each corpus entry.

Format (JSONL, UTF-8, version 1), documented in docs/PRECOMPUTE.md:
- line 1, the header: `{"format": "kvstore-precompute-manifest", "version": 1, "model": <fingerprint>,
  "namespace": .., "kind": "prefix" | "standalone", "chunk_tokens": 256, "passage_tokens": null | N,
  "add_special_tokens": false}`: the parameters every key below depends on;
- then one record per unit (a document, or one passage of it): `{"id", "doc", "doc_start", "kind", "tokens",
  "stored_tokens", "chunks": [{"hash", "key", "start", "tokens"}], "model", "namespace"}`. `hash` is the
  chunk hash (32 hex digits): `ChunkKey(namespace, fingerprint, bytes.fromhex(hash))` is the store key (the
  fingerprint is the `model` field); `key`
  is that key's flat digest (`ChunkKey.hex()`, the name in Redis and on disk). When an id appears twice
  (its text changed between runs), the later record wins.

Why a kill never corrupts it: a record is one `write` of one whole line on an O_APPEND descriptor,
followed by fsync, and only after the record's chunks are verified in the store. A kill can at worst
leave a torn last line (no newline): readers ignore it and the next writer truncates it away. A second
job on the same manifest is refused (an exclusive `flock`), so lines never interleave.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from connectors.precompute.errors import ManifestError
from kvstore.keys import HASH_BYTES, ChunkKey, ChunkKind

FORMAT = "kvstore-precompute-manifest"
VERSION = 1
KIND_NAMES = {ChunkKind.PREFIX: "prefix", ChunkKind.STANDALONE: "standalone"}
_KINDS = {v: k for k, v in KIND_NAMES.items()}


@dataclass(frozen=True, slots=True)
class ManifestHeader:
    fingerprint: str  # "model" in the file
    namespace: str
    kind: ChunkKind
    chunk_tokens: int
    passage_tokens: int | None = None
    add_special_tokens: bool = False

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.fingerprint, "namespace": self.namespace,
                "kind": KIND_NAMES[self.kind], "chunk_tokens": self.chunk_tokens,
                "passage_tokens": self.passage_tokens, "add_special_tokens": self.add_special_tokens}

    @classmethod
    def from_json(cls, obj: object) -> "ManifestHeader":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ManifestError(f"not a precompute manifest (first line must have format {FORMAT!r})")
        if obj.get("version") != VERSION:
            raise ManifestError(f"manifest version {obj.get('version')!r} is not supported (this reader: {VERSION})")
        try:
            return cls(str(obj["model"]), str(obj["namespace"]), _KINDS[obj["kind"]], int(obj["chunk_tokens"]),
                       None if obj.get("passage_tokens") is None else int(obj["passage_tokens"]),
                       bool(obj.get("add_special_tokens", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"manifest header is malformed: {e!r}") from None


@dataclass(frozen=True, slots=True)
class ManifestChunk:
    hash: bytes  # the 16-byte chunk hash
    start: int  # first token of the chunk within its unit
    tokens: int


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    id: str  # the unit: a document id, or "<doc id>#<n>" for passage n of a split document
    doc: str  # the document it belongs to
    doc_start: int  # first token of the unit within its document (0 unless passages are split)
    kind: ChunkKind
    tokens: int  # tokens of the unit
    stored_tokens: int  # tokens covered by stored chunks (prefix mode leaves out a trailing partial chunk)
    chunks: tuple[ManifestChunk, ...]
    fingerprint: str  # "model" in the file
    namespace: str

    def keys(self) -> list[ChunkKey]:
        return [ChunkKey(self.namespace, self.fingerprint, c.hash) for c in self.chunks]

    def to_json(self) -> dict:
        keys = self.keys()
        return {"id": self.id, "doc": self.doc, "doc_start": self.doc_start, "kind": KIND_NAMES[self.kind], "tokens": self.tokens,
                "stored_tokens": self.stored_tokens,
                "chunks": [{"hash": c.hash.hex(), "key": k.hex(), "start": c.start, "tokens": c.tokens}
                           for c, k in zip(self.chunks, keys)],
                "model": self.fingerprint, "namespace": self.namespace}

    @classmethod
    def from_json(cls, obj: object) -> "ManifestRecord":
        try:
            if not isinstance(obj, dict):
                raise TypeError("record is not an object")
            chunks = []
            for c in obj["chunks"]:
                h = bytes.fromhex(c["hash"])
                if len(h) != HASH_BYTES:
                    raise ValueError(f"chunk hash must be {2 * HASH_BYTES} hex digits")
                chunks.append(ManifestChunk(h, int(c["start"]), int(c["tokens"])))
            return cls(str(obj["id"]), str(obj["doc"]), int(obj["doc_start"]), _KINDS[obj["kind"]], int(obj["tokens"]),
                       int(obj["stored_tokens"]), tuple(chunks), str(obj["model"]), str(obj["namespace"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"manifest record is malformed: {e!r}") from None


@dataclass(frozen=True, slots=True)
class Manifest:
    header: ManifestHeader | None  # None: no complete header line yet (an empty file, or a kill at once)
    records: dict[str, ManifestRecord]  # unit id -> its latest record
    good_bytes: int  # length of the well-formed part (a torn last line excluded)
    torn: bool  # a torn last line was found (and ignored)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse a manifest; a torn last line (a kill mid-append) is ignored, anything else malformed raises."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from None
    return _parse(data, str(path))


def _parse(data: bytes, where: str) -> Manifest:
    lines = data.split(b"\n")
    # The last element is b"" when the file ends with a newline, else a torn (partial) line.
    torn = lines[-1] != b""
    complete = lines[:-1]
    header: ManifestHeader | None = None
    records: dict[str, ManifestRecord] = {}
    good = 0
    for i, raw in enumerate(complete):
        try:
            obj = json.loads(raw)
            if header is None:
                header = ManifestHeader.from_json(obj)
            else:
                rec = ManifestRecord.from_json(obj)
                records[rec.id] = rec
        except (ValueError, ManifestError) as e:
            if i == len(complete) - 1 and not torn and isinstance(e, json.JSONDecodeError) and (header or _header_fragment(raw)):
                # A last line whose bytes never reached the disk whole (power loss): same as torn.
                torn = True
                break
            raise ManifestError(f"{where}: line {i + 1}: {e}") from None
        good += len(raw) + 1
    if torn and header is None and lines[-1] and not _header_fragment(lines[-1]):
        raise ManifestError(f"{where}: not a precompute manifest")
    return Manifest(header, records, good, torn)


class ManifestWriter:
    """Appends records to a manifest, one fsynced line each; safe to call from several threads.

    Opening an existing manifest checks that it was written with the same header (fingerprint, namespace,
    kind, chunk sizes), drops a torn last line, and loads its records so the job can skip units that are
    already recorded. Holds an exclusive lock on the file until `close`.
    """

    def __init__(self, path: str | os.PathLike, header: ManifestHeader) -> None:
        self.path = Path(path)
        self.header = header
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise ManifestError(f"cannot open manifest {self.path}: {e}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ManifestError(f"manifest {self.path} is in use by another precompute job") from None
        try:
            self.records, self.dropped_torn_line = self._load()
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> tuple[dict[str, ManifestRecord], bool]:
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        if not data:
            self._write_line(self.header.to_json())
            return {}, False
        m = _parse(data, str(self.path))
        if m.header is None:  # nothing but a torn header line
            os.ftruncate(self._fd, 0)
            self._write_line(self.header.to_json())
            return {}, m.torn
        if m.header != self.header:
            raise ManifestError(
                f"manifest {self.path} was written for other job parameters ({_diff(m.header, self.header)}); "
                f"use another --manifest path for this run")
        if m.torn:
            os.ftruncate(self._fd, m.good_bytes)
            os.fsync(self._fd)
        return dict(m.records), m.torn

    def get(self, unit_id: str) -> ManifestRecord | None:
        with self._lock:
            return self.records.get(unit_id)

    def append(self, record: ManifestRecord) -> None:
        with self._lock:
            self._write_line(record.to_json())
            self.records[record.id] = record

    def _write_line(self, obj: dict) -> None:
        line = (json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        view = memoryview(line)
        while view:  # O_APPEND: each write lands at the end; a short write is continued right after it
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _header_fragment(raw: bytes) -> bool:
    """Whether `raw` is (the start of) a header line as `ManifestWriter` writes it: never truncate a
    file that is not a manifest."""
    expected = b'{"format":"' + FORMAT.encode() + b'"'
    return raw[: len(expected)] == expected[: len(raw)]


def _diff(a: ManifestHeader, b: ManifestHeader) -> str:
    fields = ("fingerprint", "namespace", "kind", "chunk_tokens", "passage_tokens", "add_special_tokens")
    return ", ".join(f"{f}: file has {getattr(a, f)!r}, this run {getattr(b, f)!r}"
                     for f in fields if getattr(a, f) != getattr(b, f))
