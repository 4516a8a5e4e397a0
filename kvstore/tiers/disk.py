"""Disk tier: one record file per chunk under a directory, persistent across restarts.

Layout: `<root>/records/<namespace>/<hh>/<digest>.kvr` (hh = first two hex digits of the key's digest,
so no directory grows past a few hundred thousand entries); `<root>/quarantine/` holds files that failed
a check, kept for inspection and never served.

Why a put is all-or-nothing: the record is written to a temp file in its final directory, fsynced,
and renamed over the final name; the directory is fsynced before the put returns (once per directory
per batch). A crash before the rename leaves only a `*.tmp` file, which the next start deletes; after
the rename the record is complete and durable. A reader therefore sees a whole record or none.
Why a hit is never wrong: every get checks the header checksum, the key in the header against the key
asked for, and the payload checksum before decoding; a file that fails is moved to quarantine and the
get is a miss.
The index (key digest -> size, LRU order) lives in memory and is rebuilt on start by scanning the
directories: names and sizes only, no file is opened, so 100k records index in well under a second.
A key missing from the index is looked for on disk by `contains` and `get` (one stat) and indexed when
found, so processes sharing a directory see each other's records.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from codec import Codec
from kvstore.chunk import Chunk
from kvstore.errors import InvalidChunkError, RecordError, TierError
from kvstore.keys import ChunkKey
from kvstore.record import DEFAULT_MAX_KV_BYTES, PRELUDE, decode_payload, encode_record, header_length, parse_header, payload_checksum
from kvstore.tiers.base import Tier, TierStats, TierUsage, Timer

log = logging.getLogger(__name__)

SUFFIX = ".kvr"
TMP_SUFFIX = ".tmp"


@dataclass(slots=True)
class _Entry:
    path: str
    size: int
    pins: int = 0
    readers: int = 0
    doomed: bool = False


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (quarantined path, reason)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise RecordError("record file is truncated")
    return data


class DiskTier(Tier):
    def __init__(
        self,
        root: str | os.PathLike,
        capacity_bytes: int,
        codec: Codec,
        *,
        fsync: bool = True,
        max_kv_bytes: int = DEFAULT_MAX_KV_BYTES,
        name: str = "disk",
        io_threads: int = 4,
    ) -> None:
        self.name = name
        self.root = Path(root).expanduser()
        self.records_dir = self.root / "records"
        self.quarantine_dir = self.root / "quarantine"
        self.capacity = capacity_bytes
        self.codec = codec
        self.fsync = fsync
        self.max_kv_bytes = max_kv_bytes
        self.stats = TierStats()
        self.on_evict = None
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, _Entry] = OrderedDict()  # key digest -> entry, LRU order
        self._writing: set[bytes] = set()
        self._doomed: dict[bytes, _Entry] = {}
        self._used = 0
        self._reserved = 0
        self._known_dirs: set[str] = set()
        self._closed = False
        self.io_threads = io_threads
        self._executor: ThreadPoolExecutor | None = None
        try:
            self.records_dir.mkdir(parents=True, exist_ok=True)
            self.quarantine_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise TierError(f"cannot create the disk tier under {self.root}: {e}") from e
        self.orphans_removed = self._rebuild_index()
        self._lifetime_base = self._load_lifetime()

    # -- lifetime counters (kept in <root>/stats.json across processes) ------------------------------

    _LIFETIME_FIELDS = ("hits", "misses", "puts", "put_rejected", "evictions", "corrupt", "errors", "bytes_read", "bytes_written")

    def _load_lifetime(self) -> dict[str, int]:
        try:
            with open(self.root / "stats.json") as f:
                data = json.load(f)
            return {k: int(data.get(k, 0)) for k in self._LIFETIME_FIELDS}
        except (OSError, ValueError, TypeError, AttributeError):
            return dict.fromkeys(self._LIFETIME_FIELDS, 0)

    @property
    def lifetime_stats(self) -> dict[str, int]:
        """Counters summed over every process that used this directory (saved at close)."""
        now = self.stats.snapshot()
        return {k: self._lifetime_base[k] + int(now[k]) for k in self._LIFETIME_FIELDS}

    def _save_lifetime(self) -> None:
        tmp = self.root / f"stats.json.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(self.lifetime_stats))
            os.replace(tmp, self.root / "stats.json")
        except OSError as e:
            log.warning("disk tier: cannot save lifetime counters: %s", e)

    # -- index ---------------------------------------------------------------------------------------

    def _rebuild_index(self) -> int:
        """Scan the record directories; delete leftover temp files; returns how many were deleted."""
        found: list[tuple[int, bytes, str, int]] = []
        orphans = 0
        for ns in os.scandir(self.records_dir):
            if not ns.is_dir(follow_symlinks=False):
                continue
            for fan in os.scandir(ns.path):
                if not fan.is_dir(follow_symlinks=False):
                    continue
                self._known_dirs.add(fan.path)
                for f in os.scandir(fan.path):
                    name = f.name
                    if name.endswith(TMP_SUFFIX):
                        # A put that never reached its rename: the process died mid-write.
                        try:
                            os.unlink(f.path)
                            orphans += 1
                        except FileNotFoundError:
                            pass
                        continue
                    if not name.endswith(SUFFIX) or len(name) != 32 + len(SUFFIX):
                        continue
                    try:
                        digest = bytes.fromhex(name[:32])
                        st = f.stat(follow_symlinks=False)
                    except (ValueError, OSError):
                        continue
                    found.append((st.st_mtime_ns, digest, f.path, st.st_size))
        found.sort()  # oldest first: the LRU order across restarts is write order
        for _, digest, path, size in found:
            self._index[digest] = _Entry(path, size)
            self._used += size
        if self._used > self.capacity:
            with self._lock:
                victims = self._evict_locked(0)
            self._unlink_all(victims)
        return orphans

    def _path(self, key: ChunkKey, digest: bytes) -> tuple[str, str]:
        hexd = digest.hex()
        d = os.path.join(self.records_dir, key.namespace, hexd[:2])
        return d, os.path.join(d, hexd + SUFFIX)

    def _ensure_dir(self, d: str) -> None:
        if d in self._known_dirs:
            return
        os.makedirs(d, exist_ok=True)
        if self.fsync:
            # New directories must themselves be durable entries of their parents.
            _fsync_dir(os.path.dirname(d))
            _fsync_dir(os.path.dirname(os.path.dirname(d)))
        self._known_dirs.add(d)

    def contains(self, keys: Sequence[ChunkKey], tokens=None) -> list[bool]:
        index = self._index
        return [k.digest() in index or self._adopt(k) for k in keys]

    def _adopt(self, key: ChunkKey) -> bool:
        """Index the record of `key` if another process sharing this directory wrote it after this one
        built its index (vLLM's scheduler looks up what its worker saves). One stat per call; nothing is
        evicted here, so a reader never deletes a writer's records."""
        digest = key.digest()
        final = self._path(key, digest)[1]
        try:
            size = os.stat(final).st_size
        except OSError:
            return False
        with self._lock:
            if digest in self._index or digest in self._writing:
                return True  # indexed meanwhile, or our own write about to be published
            if digest in self._doomed or self._closed:
                return False  # deleted here while pinned or read: not to be served again
            self._index[digest] = _Entry(final, size)
            self._used += size
        return True

    def usage(self) -> TierUsage:
        with self._lock:
            pinned = sum(1 for e in self._index.values() if e.pins)
            return TierUsage(self._used, self.capacity, len(self._index), pinned)

    # -- put -----------------------------------------------------------------------------------------

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        with Timer() as t:
            results = [False] * len(chunks)
            victims: list[str] = []
            def attempt(chunk: Chunk):
                try:
                    return self._put_one(chunk, victims)
                except Exception as e:  # re-raised below, after what was written is published
                    return e

            if len(chunks) > 1 and self.io_threads > 1:
                # Several records in flight at once: the filesystem merges their journal commits.
                outcomes = list(self._pool().map(attempt, chunks))
            else:
                outcomes = [attempt(c) for c in chunks]
            written = []
            failure: Exception | None = None
            for i, outcome in enumerate(outcomes):
                if outcome is True:
                    results[i] = True
                elif isinstance(outcome, Exception):
                    failure = failure or outcome
                elif outcome is not None:
                    written.append((i, *outcome))
            if self.fsync and written:
                # The renames are durable once their directories are; one fsync per directory per batch.
                for d in {w[2] for w in written}:
                    _fsync_dir(d)
            with self._lock:
                for i, digest, _, final, size in written:
                    self._reserved -= size
                    self._writing.discard(digest)
                    self._index[digest] = _Entry(final, size)
                    self._used += size
                    results[i] = True
            self._unlink_all(victims)
        nbytes = sum(w[4] for w in written)
        rejected = sum(1 for r in results if not r)
        self.stats.add(puts=len(written), put_rejected=rejected, bytes_written=nbytes, put_calls=1, put_seconds=t.seconds)
        if failure is not None:
            raise failure
        return results

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.io_threads, thread_name_prefix=f"kvstore-{self.name}-io")
            return self._executor

    def _put_one(self, chunk: Chunk, victims: list[str]):
        """Write one record up to its rename. True: already stored; None: rejected or failed;
        else (digest, directory, final path, size) to publish once the directory is synced."""
        digest = chunk.key.digest()
        with self._lock:
            if self._closed:
                raise TierError(f"{self.name} tier is closed")
            if digest in self._index:
                self._index.move_to_end(digest)
                return True
            if digest in self._writing:
                return True
            e = self._doomed.pop(digest, None)
            if e is not None:
                # Deleted while pinned or read, and put again: its file is this very record, so it comes
                # back. Writing it anew would rename over the same path, and the deferred unlink at the
                # last unpin or read would then delete the new record.
                e.doomed = False
                self._index[digest] = e
                self._used += e.size
                victims += self._evict_locked(0)
                return True
            self._writing.add(digest)
        try:
            header, payload = encode_record(chunk, self.codec)
        except BaseException:
            with self._lock:
                self._writing.discard(digest)
            raise
        size = len(header) + len(payload)
        with self._lock:
            ok = size <= self.capacity
            if ok:
                victims += self._evict_locked(size)
                ok = self._used + self._reserved + size <= self.capacity
            if ok:
                self._reserved += size
            else:
                self._writing.discard(digest)
        if not ok:
            return None
        d, final = self._path(chunk.key, digest)
        tmp = f"{final}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
        try:
            self._ensure_dir(d)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, (header, payload))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as e:
            log.warning("disk tier: put of %s failed: %s", chunk.key, e)
            self.stats.add(errors=1)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            with self._lock:
                self._reserved -= size
                self._writing.discard(digest)
            return None
        return digest, d, final, size

    def _evict_locked(self, incoming: int) -> list[str]:
        """Drop LRU unreferenced entries until `incoming` more bytes fit (lock held); paths to unlink."""
        paths = []
        if self._used + self._reserved + incoming <= self.capacity:
            return paths
        for digest in list(self._index):
            if self._used + self._reserved + incoming <= self.capacity:
                break
            e = self._index[digest]
            if e.pins or e.readers:
                continue
            del self._index[digest]
            self._used -= e.size
            paths.append(e.path)
            self.stats.add(evictions=1)
        return paths

    @staticmethod
    def _unlink_all(paths: Sequence[str]) -> None:
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    # -- get -----------------------------------------------------------------------------------------

    def get(self, keys: Sequence[ChunkKey], out: Sequence[torch.Tensor | None] | None = None) -> list[Chunk | None]:
        with Timer() as t:
            results: list[Chunk | None] = []
            nbytes = hits = 0
            for i, key in enumerate(keys):
                digest = key.digest()
                with self._lock:
                    e = self._index.get(digest)
                    if e is not None:
                        self._index.move_to_end(digest)
                        e.readers += 1
                if e is None and self._adopt(key):
                    with self._lock:
                        e = self._index.get(digest)
                        if e is not None:
                            e.readers += 1
                if e is None:
                    results.append(None)
                    continue
                try:
                    chunk = self._read(e.path, key, out[i] if out is not None else None)
                except FileNotFoundError:
                    chunk = None
                    self._forget(digest, e)
                except RecordError as err:
                    chunk = None
                    self._quarantine(digest, e, str(err))
                except OSError as err:
                    chunk = None
                    log.warning("disk tier: reading %s failed: %s", e.path, err)
                    self.stats.add(errors=1)
                finally:
                    self._release(digest, e)
                results.append(chunk)
                if chunk is not None:
                    hits += 1
                    nbytes += e.size
        self.stats.add(hits=hits, misses=len(keys) - hits, bytes_read=nbytes, get_calls=1, get_seconds=t.seconds)
        return results

    def _read(self, path: str, key: ChunkKey | None, out: torch.Tensor | None) -> Chunk:
        with open(path, "rb", buffering=0) as f:
            prelude = _read_exact(f, PRELUDE.size)
            total = header_length(prelude)
            header = parse_header(prelude + _read_exact(f, total - PRELUDE.size), self.max_kv_bytes)
            self._check_header(header, key, out)
            # Before allocating payload_len bytes (up to 2 * max_kv_bytes) for a file that cannot hold them.
            if os.fstat(f.fileno()).st_size != header.record_len:
                raise RecordError(f"record file is not the {header.record_len} bytes its header says (truncated?)")
            if header.codec == "raw" and (out is None or (out.device.type == "cpu" and out.is_contiguous())):
                # Zero-copy path: read the payload straight into the output tensor's memory.
                dst = out if out is not None else torch.empty(header.shape, dtype=header.dtype)
                view = memoryview(dst.reshape(-1).view(torch.uint8).numpy())
                if header.payload_len != len(view):
                    raise RecordError(f"raw payload of {header.payload_len} bytes does not fit {header.shape}")
                got = f.readinto(view)
                if got != len(view) or f.read(1):
                    raise RecordError("record payload length does not match its file")
                if payload_checksum(view) != header.payload_checksum:
                    raise RecordError("record payload checksum mismatch (corrupted)")
                return Chunk(header.key, dst, header.tokens, header.start_pos)
            payload = bytearray(header.payload_len)
            got = f.readinto(payload)
            if got != len(payload) or f.read(1):
                raise RecordError("record payload length does not match its file")
        return self._decode(header, memoryview(payload), out)

    def _check_header(self, header, key: ChunkKey | None, out: torch.Tensor | None) -> None:
        if key is not None and header.key != key:
            raise RecordError(f"record holds {header.key}, not {key} (foreign or misplaced file)")
        if out is not None and (tuple(out.shape) != header.shape or out.dtype != header.dtype):
            raise InvalidChunkError(f"output buffer {tuple(out.shape)} {out.dtype} does not fit record {header.shape} {header.dtype}")

    @staticmethod
    def _decode(header, payload: memoryview, out: torch.Tensor | None) -> Chunk:
        target = out if out is None or (out.device.type == "cpu" and out.is_contiguous()) else None
        chunk = decode_payload(header, payload, target)
        if out is not None and target is None:
            out.copy_(chunk.kv)
            chunk = Chunk(chunk.key, out, chunk.tokens, chunk.start_pos)
        return chunk

    def _release(self, digest: bytes, e: _Entry) -> None:
        with self._lock:
            e.readers -= 1
            self._unlink_if_doomed(digest, e)

    def _unlink_if_doomed(self, digest: bytes, e: _Entry) -> None:
        if e.doomed and not e.pins and not e.readers:
            self._doomed.pop(digest, None)
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass

    def _forget(self, digest: bytes, e: _Entry) -> None:
        with self._lock:
            if self._index.get(digest) is e:
                del self._index[digest]
                self._used -= e.size

    def _quarantine(self, digest: bytes, e: _Entry, reason: str) -> str:
        """Move a bad record out of the way (never served again); returns where it went."""
        self._forget(digest, e)
        dest = os.path.join(self.quarantine_dir, f"{os.path.basename(e.path)}.{time.time_ns()}")
        try:
            os.replace(e.path, dest)
        except FileNotFoundError:
            dest = ""
        except OSError:
            dest = ""
            try:
                os.unlink(e.path)
            except OSError:
                pass
        log.warning("disk tier: quarantined %s: %s", e.path, reason)
        self.stats.add(corrupt=1)
        return dest

    # -- control -------------------------------------------------------------------------------------

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        removed, paths = 0, []
        with self._lock:
            for key in keys:
                digest = key.digest()
                e = self._index.pop(digest, None)
                if e is None:
                    continue
                removed += 1
                self._used -= e.size
                if e.pins or e.readers:
                    e.doomed = True
                    self._doomed[digest] = e
                else:
                    paths.append(e.path)
        self._unlink_all(paths)
        return removed

    def pin(self, keys: Sequence[ChunkKey]) -> list[bool]:
        out = []
        with self._lock:
            for key in keys:
                e = self._index.get(key.digest())
                if e is not None:
                    e.pins += 1
                out.append(e is not None)
        return out

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                digest = key.digest()
                e = self._index.get(digest) or self._doomed.get(digest)
                if e is not None and e.pins:
                    e.pins -= 1
                    self._unlink_if_doomed(digest, e)

    def clear(self, namespace: str | None = None) -> int:
        prefix = os.path.join(self.records_dir, namespace, "") if namespace is not None else ""
        with self._lock:
            victims = [(d, e) for d, e in self._index.items()
                       if not e.pins and not e.readers and e.path.startswith(prefix)]
            for d, e in victims:
                del self._index[d]
                self._used -= e.size
        self._unlink_all([e.path for _, e in victims])
        return len(victims)

    def verify(self) -> VerifyReport:
        """Read and check every record (checksums, key, decode); quarantine the bad ones."""
        report = VerifyReport()
        with self._lock:
            entries = list(self._index.items())
        for digest, e in entries:
            report.checked += 1
            try:
                chunk = self._read(e.path, None, None)
                if chunk.key.digest() != digest:
                    raise RecordError("record's key does not match its file name")
            except FileNotFoundError:
                self._forget(digest, e)
            except (RecordError, OSError) as err:
                report.bad.append((self._quarantine(digest, e, str(err)), str(err)))
        return report

    def quarantined(self) -> Iterator[Path]:
        return iter(sorted(self.quarantine_dir.iterdir()))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        # Concurrent processes on one directory each add their own counts to the base they loaded,
        # so this is approximate under concurrency; it never touches the records.
        self._save_lifetime()
