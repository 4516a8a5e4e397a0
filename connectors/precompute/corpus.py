"""Reading a corpus for the precompute job: JSONL (one object per line) or a folder of text files.

`read_corpus(path, ...)` yields, in a deterministic order, one item per corpus entry:
- `Document(id, text, source)` for a readable entry;
- `BadEntry(id, source, reason)` for one that is not (a line that is not valid UTF-8 or JSON, an object
  without a string id or text, an empty text, a file that is not UTF-8 text or is too large).
A bad entry never stops the reading: the job reports it with its id and goes on.

Bounded memory: a JSONL line or a file is read with a byte limit (`max_entry_bytes`), so one huge line
costs at most that much memory, and the rest of it is skipped in bounded reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from connectors.precompute.errors import CorpusError

DEFAULT_MAX_ENTRY_BYTES = 64 << 20
_SKIP_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str
    source: str  # where it came from: "corpus.jsonl:12" or a file path, for messages


@dataclass(frozen=True, slots=True)
class BadEntry:
    id: str  # the entry's id where it could be read, else "line N" / the file's relative path
    source: str
    reason: str


CorpusItem = Document | BadEntry


def count_entries(path: str | os.PathLike) -> int:
    """How many entries `read_corpus` will yield (non-blank lines, or files): a progress bar's total."""
    p = Path(path)
    if p.is_dir():
        return sum(1 for _ in _folder_files(p))
    n = 0
    with _open(p) as f:
        content = False
        while part := f.readline(_SKIP_BLOCK):  # bounded reads, however long a line is
            content = content or bool(part.strip())
            if part.endswith(b"\n"):
                n += content
                content = False
        n += content
    return n


def read_corpus(
    path: str | os.PathLike,
    *,
    id_field: str = "id",
    text_field: str = "text",
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
) -> Iterator[CorpusItem]:
    """Entries of a JSONL file (`{"id": ..., "text": ...}` per line) or of a folder of UTF-8 text files
    (id = the file's path relative to the folder, files in sorted order, hidden files skipped)."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus {p} does not exist")
    if p.is_dir():
        return _read_folder(p, max_entry_bytes)
    return _read_jsonl(p, id_field, text_field, max_entry_bytes)


def _open(p: Path):
    try:
        return open(p, "rb")
    except OSError as e:
        raise CorpusError(f"cannot read corpus {p}: {e}") from None


def _read_jsonl(p: Path, id_field: str, text_field: str, max_bytes: int) -> Iterator[CorpusItem]:
    with _open(p) as f:
        lineno = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            lineno += 1
            source = f"{p.name}:{lineno}"
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while (rest := f.readline(_SKIP_BLOCK)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the oversized line in bounded reads
                yield BadEntry(f"line {lineno}", source, f"line longer than {max_bytes} bytes")
                continue
            if not raw.strip():
                continue
            yield _parse_line(raw, lineno, source, id_field, text_field)


def _parse_line(raw: bytes, lineno: int, source: str, id_field: str, text_field: str) -> CorpusItem:
    fallback = f"line {lineno}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadEntry(fallback, source, f"not valid UTF-8 ({e.reason} at byte {e.start})")
    try:
        obj = json.loads(line)
    except ValueError as e:
        return BadEntry(fallback, source, f"not valid JSON: {e}")
    if not isinstance(obj, dict):
        return BadEntry(fallback, source, f"expected a JSON object, got {type(obj).__name__}")
    doc_id = obj.get(id_field)
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        return BadEntry(fallback, source, f"missing or invalid {id_field!r} (a non-empty string or an integer)")
    doc_id = str(doc_id)
    text = obj.get(text_field)
    if not isinstance(text, str):
        return BadEntry(doc_id, source, f"missing or non-string {text_field!r}")
    if not text.strip():
        return BadEntry(doc_id, source, "empty document")
    return Document(doc_id, text, source)


def _folder_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _read_folder(root: Path, max_bytes: int) -> Iterator[CorpusItem]:
    # Sorted walk: the same folder always yields the same order, so reruns plan the same batches.
    for path in sorted(_folder_files(root), key=lambda q: q.relative_to(root).as_posix()):
        doc_id = path.relative_to(root).as_posix()
        try:
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as e:
            yield BadEntry(doc_id, str(path), f"cannot read: {e.strerror or e}")
            continue
        if len(data) > max_bytes:
            yield BadEntry(doc_id, str(path), f"file larger than {max_bytes} bytes")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield BadEntry(doc_id, str(path), f"not UTF-8 text ({e.reason} at byte {e.start})")
            continue
        if not text.strip():
            yield BadEntry(doc_id, str(path), "empty document")
            continue
        yield Document(doc_id, text, str(path))
