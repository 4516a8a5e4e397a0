"""File primitives of the disk tier: crash-safe record files, the directory scan, lifetime counters.

- `write_file(final, parts, fsync)`: the record is written to a temp file in its final directory
  (fsynced when asked), and renamed over the final name. A crash before the rename leaves only a `*.tmp`
  file (which `scan_records` deletes); after it the file is complete. With `fsync` the caller fsyncs the
  directory (`fsync_dir`) before it calls the put durable, once per directory per batch.
- Everything is private to the owner: files 0600, directories 0700 (`private_dir`), since record headers
  hold token ids, i.e. prompts. Nothing in the tree is reached through a symbolic link: `private_dir`
  refuses one (`ELOOP`), `open_record` does not follow one, and `scan_records` skips them, so the write
  path and the index rebuild see the same files.
- `Syncer`: the background half of the "process-crash" policy: every `interval` seconds after a write it
  syncs the filesystem (`syncfs`), which bounds what a power loss can take to about that long.
- `scan_records(records_dir)`: every record file by name and size (no file is opened), oldest first, and
  leftover temp files deleted: an index of 100k records rebuilds in well under a second.
- `LifetimeCounters`: counters summed over every process that used a directory (`<root>/stats.json`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

SUFFIX = ".kvr"
TMP_SUFFIX = ".tmp"
FILE_MODE = 0o600
DIR_MODE = 0o700


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: str) -> None:
    """Make `path` a directory of the owner's alone (0700) if it is not there; refuse a symbolic link."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise OSError(errno.ELOOP, "not a directory of the store's own (a symbolic link?); refused", path)


def open_record(path: str):
    """The record file at `path` for reading (unbuffered), never through a symbolic link."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)), "rb", buffering=0)


_IOV_MAX = 512  # buffers per writev call (the OS takes at least 1024)


def _write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def write_file(final: str, parts: Sequence[bytes | memoryview], fsync: bool) -> None:
    """Write `parts` back to back as the file `final`, all or nothing (see the module docstring)."""
    tmp = f"{final}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            _write_all(fd, parts)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass(slots=True)
class Scan:
    records: list[tuple[bytes, str, int]] = field(default_factory=list)  # (digest, path, size), oldest first
    directories: set[str] = field(default_factory=set)  # the fan-out directories found
    orphans_removed: int = 0  # temp files of puts that never reached their rename


def scan_records(records_dir: Path) -> Scan:
    """`<records_dir>/<namespace>/<hh>/<32 hex digits>.kvr` files, by mtime (the LRU order across restarts
    is write order); temp files of interrupted puts are deleted on the way."""
    scan, found = Scan(), []
    for ns in os.scandir(records_dir):
        if not ns.is_dir(follow_symlinks=False):
            _skipped(ns)
            continue
        for fan in os.scandir(ns.path):
            if not fan.is_dir(follow_symlinks=False):
                _skipped(fan)
                continue
            scan.directories.add(fan.path)
            for f in os.scandir(fan.path):
                name = f.name
                if name.endswith(TMP_SUFFIX):
                    # A put that never reached its rename: the process died mid-write.
                    try:
                        os.unlink(f.path)
                        scan.orphans_removed += 1
                    except FileNotFoundError:
                        pass
                    continue
                if not name.endswith(SUFFIX) or len(name) != 32 + len(SUFFIX):
                    continue
                if not f.is_file(follow_symlinks=False):
                    _skipped(f)
                    continue
                try:
                    digest = bytes.fromhex(name[:32])
                    st = f.stat(follow_symlinks=False)
                except (ValueError, OSError):
                    continue
                found.append((st.st_mtime_ns, digest, f.path, st.st_size))
    found.sort()
    scan.records = [(digest, path, size) for _, digest, path, size in found]
    return scan


def _skipped(entry: os.DirEntry) -> None:
    if entry.is_symlink():
        log.warning("disk tier: %s is a symbolic link; the store neither follows nor serves it", entry.path)


def _syncfs():
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux: sync everything
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


_SYNCFS = _syncfs()


def sync_filesystem(path: str) -> None:
    """Flush every written file and directory entry of the filesystem that holds `path` to stable storage."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


class Syncer:
    """Syncs the filesystem under `path` every `interval` seconds while there are writes (`dirty()`), on a
    daemon thread, and once more at `close()`: what a put in the page cache waits for before a power
    loss can no longer take it."""

    def __init__(self, path: str, interval: float) -> None:
        self.path, self.interval = path, interval
        self._dirty = False
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def dirty(self) -> None:
        with self._cond:
            self._dirty = True
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="kvstore-disk-sync", daemon=True)
                self._thread.start()

    def _sync(self) -> None:
        with self._cond:
            if not self._dirty:
                return
            self._dirty = False
        try:
            sync_filesystem(self.path)
        except OSError as e:
            log.error("disk tier: syncing %s failed: %s", self.path, e)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._closed, self.interval):
                    return
            self._sync()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._sync()


class LifetimeCounters:
    """Counters of a directory across processes: the base loaded at start plus this process's own, saved
    at close. Processes on one directory each add their own counts to the base they loaded, so this is
    approximate under concurrency; it never touches the records."""

    FIELDS = ("hits", "misses", "puts", "put_rejected", "evictions", "corrupt", "errors", "bytes_read", "bytes_written")

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path) as f:
                data = json.load(f)
            self.base = {k: int(data.get(k, 0)) for k in self.FIELDS}
        except (OSError, ValueError, TypeError, AttributeError):
            self.base = dict.fromkeys(self.FIELDS, 0)

    def total(self, now: dict[str, float]) -> dict[str, int]:
        return {k: self.base[k] + int(now[k]) for k in self.FIELDS}

    def save(self, now: dict[str, float]) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.total(now)))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot save lifetime counters to %s: %s", self.path, e)
