"""Disk tier: one record file per chunk under a directory, persistent across restarts.

Layout: `<root>/records/<namespace>/<hh>/<digest>.kvr` (hh = first two hex digits of the key's digest,
so no directory grows past a few hundred thousand entries); `<root>/quarantine/` holds files that failed
a check, kept for inspection and never served; `<root>/stats.json` the lifetime counters.

Why a put is all-or-nothing: each record file is written crash-safe (`files.write_file`: temp file,
rename) before the put returns; only then is the entry published in the index. A reader therefore sees a
whole record or none, and so does the next start (a crash leaves temp files, which it deletes).
What an acknowledged put survives (`durability`): with `fsync` the file and its directory are fsynced
before the put returns ("power-loss"); without, the record is in the page cache when the put returns,
which a crash or SIGKILL of the process does not touch ("process-crash"), and a background `Syncer`
syncs the filesystem every `sync_interval_s` (Redis's `appendfsync everysec`), so a power loss takes at
most about that much. A record a power loss tore is caught by its checksums on read: a miss, never
wrong KV. Files are the owner's alone (0600, directories 0700) and no path in the tree follows a
symbolic link (`files.private_dir`, `files.open_record`), so what the write path stores is what the
index rebuild finds.
Why a hit is never wrong: every get checks the header checksum, the key in the header against the key
asked for, and the payload checksum before decoding (`ByteTier`); a file that fails is moved to
quarantine and the get is a miss.
The index (`PinnedLRU`: key digest -> file and size, LRU order, pins, readers) lives in memory and is
rebuilt on start from a scan of names and sizes. A file is unlinked only under the index's lock, so a put
of the same key can never have its new file removed by an older delete or eviction.
A key missing from the index is looked for on disk by `contains` and `get` (one stat) and indexed when
found, so processes sharing a directory see each other's records (vLLM's scheduler looks up what its
worker saves).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from codec import Codec
from kvstore.chunk import Chunk
from kvstore.errors import RecordError, TierError
from kvstore.keys import ChunkKey
from kvstore.record import DEFAULT_MAX_KV_BYTES, encode_record, read_record
from kvstore.tiers.base import TierUsage
from kvstore.tiers.byte_tier import ByteTier, RecordBytes, RecordParts
from kvstore.tiers.files import (DIR_MODE, SUFFIX, TMP_SUFFIX, LifetimeCounters, Syncer, fsync_dir, open_record,
                                 private_dir, scan_records, write_file)
from kvstore.tiers.lru import Entry, PinnedLRU

__all__ = ["SUFFIX", "TMP_SUFFIX", "DiskTier", "VerifyReport"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _File(Entry):
    path: str = ""


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (quarantined path, reason)


class DiskTier(ByteTier):
    def __init__(
        self,
        root: str | os.PathLike,
        capacity_bytes: int,
        codec: Codec,
        *,
        fsync: bool = False,
        sync_interval_s: float = 1.0,
        max_kv_bytes: int = DEFAULT_MAX_KV_BYTES,
        name: str = "disk",
        io_threads: int = 4,
    ) -> None:
        super().__init__(name, codec, max_kv_bytes=max_kv_bytes)
        self.root = Path(root).expanduser()
        self.records_dir = self.root / "records"
        self.quarantine_dir = self.root / "quarantine"
        self.capacity = capacity_bytes
        self.fsync = fsync
        self.durability = "power-loss" if fsync else "process-crash"
        self.io_threads = io_threads
        self.index: PinnedLRU[bytes, _File] = PinnedLRU(self._free)
        self._reserved = 0  # bytes of puts in progress
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            for d in (self.records_dir, self.quarantine_dir):  # private, also when made by an older version
                private_dir(str(d))
                os.chmod(d, DIR_MODE)
        except OSError as e:
            raise TierError(f"cannot create the disk tier under {self.root}: {e}") from e
        self._syncer = Syncer(str(self.records_dir), sync_interval_s) if not fsync and sync_interval_s > 0 else None
        scan = scan_records(self.records_dir)
        self._known_dirs = scan.directories
        self.orphans_removed = scan.orphans_removed
        with self.index.lock:
            for digest, path, size in scan.records:
                self.index.publish_locked(digest, _File(size, path=path))
            self._evict_to_fit(0)
        self._lifetime = LifetimeCounters(self.root / "stats.json")

    @property
    def lifetime_stats(self) -> dict[str, int]:
        """Counters summed over every process that used this directory (saved at close)."""
        return self._lifetime.total(self.stats.snapshot())

    def _free(self, e: _File, evicted: bool) -> None:
        if evicted:
            self.stats.add(evictions=1)
        try:
            os.unlink(e.path)
        except FileNotFoundError:
            pass

    def _evict_to_fit(self, incoming: int) -> bool:
        """Evict (lock held) until `incoming` more bytes fit; False if they cannot."""
        while self.index.used + self._reserved + incoming > self.capacity:
            if not self.index.evict_one_locked():
                return False
        return True

    def _path(self, key: ChunkKey, digest: bytes) -> tuple[str, str]:
        hexd = digest.hex()
        d = os.path.join(self.records_dir, key.namespace, hexd[:2])
        return d, os.path.join(d, hexd + SUFFIX)

    def _ensure_dir(self, d: str) -> None:
        if d in self._known_dirs:
            return
        private_dir(os.path.dirname(d))  # the namespace's directory
        private_dir(d)
        if self.fsync:
            # New directories must themselves be durable entries of their parents.
            fsync_dir(os.path.dirname(d))
            fsync_dir(os.path.dirname(os.path.dirname(d)))
        self._known_dirs.add(d)

    def _pool(self) -> ThreadPoolExecutor:
        with self.index.lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.io_threads, thread_name_prefix=f"kvstore-{self.name}-io")
            return self._executor

    def _map(self, fn, items: Sequence) -> list:
        """fn over items, on the I/O threads when there are several: the filesystem merges the journal
        commits of records in flight together, and codecs release the GIL."""
        if len(items) > 1 and self.io_threads > 1:
            return list(self._pool().map(fn, items))
        return [fn(x) for x in items]

    # -- queries -------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey], tokens=None) -> list[bool]:
        index = self.index
        return [(digest := k.digest()) in index or self._adopt(k, digest) for k in keys]

    def _adopt(self, key: ChunkKey, digest: bytes) -> bool:
        """Index the record of `key` if another process sharing this directory wrote it after this one
        built its index. One stat per call; nothing is evicted here, so a reader never deletes a writer's
        records (the directory may briefly hold more than this process's capacity)."""
        final = self._path(key, digest)[1]
        try:
            st = os.stat(final, follow_symlinks=False)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):  # the tree never follows a symbolic link
            return False
        size = st.st_size
        with self.index.lock:
            if self._closed:
                return False
            return self.index.adopt_locked(digest, _File(size, path=final))

    def usage(self) -> TierUsage:
        return TierUsage(self.index.used, self.capacity, len(self.index), self.index.pinned())

    # -- put -----------------------------------------------------------------------------------------

    def _encode(self, chunks: Sequence[Chunk]) -> list[RecordParts]:
        return self._map(lambda c: encode_record(c, self.codec), chunks)

    def _write(self, keys: Sequence[ChunkKey], records: Sequence[RecordParts]) -> tuple[list[bool], int, int]:
        def attempt(i: int):
            try:
                return self._write_one(keys[i], records[i])
            except Exception as e:  # re-raised below, after what was written is published
                return e

        outcomes = self._map(attempt, range(len(keys)))
        results = [o is True for o in outcomes]
        written = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, tuple)]
        if self.fsync and written:
            # The renames are durable once their directories are; one fsync per directory per batch.
            for d in {w[1] for _, w in written}:
                fsync_dir(d)
        elif self._syncer is not None and written:
            self._syncer.dirty()
        with self.index.lock:
            for i, (digest, _, final, size) in written:
                self._reserved -= size
                self.index.publish_locked(digest, _File(size, path=final))
                results[i] = True
        failure = next((o for o in outcomes if isinstance(o, Exception)), None)
        if failure is not None:
            raise failure
        return results, len(written), sum(w[3] for _, w in written)

    def _write_one(self, key: ChunkKey, parts: RecordParts):
        """Write one record up to its rename. True: already stored; None: rejected or failed;
        else (digest, directory, final path, size) to publish once the directory is synced."""
        digest = key.digest()
        size = sum(len(p) for p in parts)
        with self.index.lock:
            if self._closed:
                raise TierError(f"{self.name} tier is closed")
            if not self.index.claim_locked(digest):
                self._evict_to_fit(0)  # a record brought back from a deferred delete counts again
                return True
            if size > self.capacity or not self._evict_to_fit(size):
                self.index.abandon_locked(digest)
                return None
            self._reserved += size
        d, final = self._path(key, digest)
        try:
            self._ensure_dir(d)
            write_file(final, parts, self.fsync)
        except OSError as e:
            log.error("disk tier: put of %s failed: %s", key, e)
            self.stats.add(errors=1)
            with self.index.lock:
                self._reserved -= size
                self.index.abandon_locked(digest)
            return None
        return digest, d, final, size

    # -- get -----------------------------------------------------------------------------------------

    def _sources(self, keys: Sequence[ChunkKey]) -> Iterator[tuple[int, tuple[bytes, _File], int]]:
        digests = [k.digest() for k in keys]
        for key, digest in zip(keys, digests):
            if digest not in self.index:
                self._adopt(key, digest)
        # A reader on each: no delete or eviction unlinks it meanwhile.
        return ((i, (digest, e), e.size) for i, digest, e in self.index.held(digests))

    def _read(self, source: tuple[bytes, _File], key: ChunkKey | None, out: torch.Tensor | None) -> Chunk | None:
        digest, e = source
        try:
            with open_record(e.path) as f:
                return read_record(f, out, key=key, max_kv_bytes=self.max_kv_bytes)
        except FileNotFoundError:  # removed behind the index's back: forget it
            self.index.forget(digest, e)
            return None

    def _hold(self, source: tuple[bytes, _File], size: int) -> RecordBytes | None:
        """The record's file, its entry held (a reader: no eviction or delete unlinks it) until closed."""
        digest, e = source
        if not self.index.hold(digest, e):  # deleted (or put again) since `_sources` found it: a miss
            return None
        if not os.path.exists(e.path):
            self.index.release(digest, e)
            self.index.forget(digest, e)
            return None
        return RecordBytes(e.size, path=e.path, release=lambda: self.index.release(digest, e))

    def _discard(self, key: ChunkKey, source: tuple[bytes, _File], reason: str) -> None:
        self._quarantine(*source, reason)

    def _quarantine(self, digest: bytes, e: _File, reason: str) -> str:
        """Move a bad record out of the way (never served again); returns where it went."""
        self.index.forget(digest, e)
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
        return dest

    def verify(self) -> VerifyReport:
        """Read and check every record (checksums, key, decode); quarantine the bad ones."""
        report = VerifyReport()
        for digest, _ in self.index.items():
            e = self.index.acquire(digest)
            if e is None:
                continue
            report.checked += 1
            try:
                chunk = self._read((digest, e), None, None)
                if chunk is not None and chunk.key.digest() != digest:
                    raise RecordError("record's key does not match its file name")
            except (RecordError, OSError) as err:
                self.stats.add(corrupt=1)
                report.bad.append((self._quarantine(digest, e, str(err)), str(err)))
            finally:
                self.index.release(digest, e)
        return report

    def quarantined(self) -> Iterator[Path]:
        return iter(sorted(self.quarantine_dir.iterdir()))

    # -- control -------------------------------------------------------------------------------------

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return self.index.delete([k.digest() for k in keys])

    def pin(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self.index.pin([k.digest() for k in keys])

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        self.index.unpin([k.digest() for k in keys])

    def clear(self, namespace: str | None = None) -> int:
        prefix = os.path.join(self.records_dir, namespace, "") if namespace is not None else ""
        return self.index.clear(lambda digest, e: e.path.startswith(prefix))

    def close(self) -> None:
        with self.index.lock:
            if self._closed:
                return
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._syncer is not None:
            self._syncer.close()
        self._lifetime.save(self.stats.snapshot())
