"""File primitives of the disk tier: crash-safe record files, the directory scan, lifetime counters.

- `write_file(directory, final, parts, fsync)`: the record is written to a temp file in its final
  directory, fsynced, and renamed over the final name. A crash before the rename leaves only a `*.tmp`
  file (which `scan_records` deletes); after it the file is complete. The caller fsyncs the directory
  (`fsync_dir`) before it calls the put durable, once per directory per batch.
- `scan_records(records_dir)`: every record file by name and size (no file is opened), oldest first, and
  leftover temp files deleted: an index of 100k records rebuilds in well under a second.
- `LifetimeCounters`: counters summed over every process that used a directory (`<root>/stats.json`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

SUFFIX = ".kvr"
TMP_SUFFIX = ".tmp"


def fsync_dir(path: str) -> None:
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


def write_file(final: str, parts: Sequence[bytes | memoryview], fsync: bool) -> None:
    """Write `parts` back to back as the file `final`, all or nothing (see the module docstring)."""
    tmp = f"{final}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
            continue
        for fan in os.scandir(ns.path):
            if not fan.is_dir(follow_symlinks=False):
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
                try:
                    digest = bytes.fromhex(name[:32])
                    st = f.stat(follow_symlinks=False)
                except (ValueError, OSError):
                    continue
                found.append((st.st_mtime_ns, digest, f.path, st.st_size))
    found.sort()
    scan.records = [(digest, path, size) for _, digest, path, size in found]
    return scan


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
            tmp.write_text(json.dumps(self.total(now)))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot save lifetime counters to %s: %s", self.path, e)
