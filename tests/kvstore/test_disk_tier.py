"""Disk tier: persistence, crash safety (a real SIGKILL), corruption handling, capacity, index rebuild."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from codec import make_codec
from kvstore.chunk import Chunk
from kvstore.errors import InvalidChunkError, TierError
from kvstore.record import encode_header, encode_record
from kvstore.tiers.disk import SUFFIX, TMP_SUFFIX, DiskTier

REPO = Path(__file__).resolve().parents[2]
BIG = 1 << 30


def tier_at(path, codec="zstd", capacity=BIG, **kw) -> DiskTier:
    kw.setdefault("fsync", False)
    return DiskTier(path, capacity, make_codec(codec), **kw)


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in Path(root).rglob(pattern) if p.is_file())


def record_path(tier: DiskTier, chunk: Chunk) -> Path:
    d, final = tier._path(chunk.key, chunk.key.digest())
    return Path(final)


# -- persistence and round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_put_get_and_persistence_across_instances(tmp_path, codec, chunk_factory, same_bits):
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    chunks = [chunk_factory(i, dtype=dtypes[i % 3], start_pos=16 * i, special=i % 2 == 1) for i in range(6)]
    tier = tier_at(tmp_path, codec, fsync=True)
    assert tier.put(chunks) == [True] * 6
    assert tier.put(chunks[:2]) == [True] * 2  # present: a no-op
    assert tier.stats.puts == 6
    used = tier.usage().used_bytes
    assert used == sum(p.stat().st_size for p in files(tmp_path, "*" + SUFFIX))
    tier.close()

    again = tier_at(tmp_path, codec)
    assert again.usage().used_bytes == used and again.usage().entries == 6
    assert again.contains([c.key for c in chunks]) == [True] * 6
    for got, c in zip(again.get([c.key for c in chunks]), chunks):
        assert got.key == c.key and got.start_pos == c.start_pos and np.array_equal(got.tokens, c.tokens)
        assert same_bits(got.kv, c.kv)
    assert again.stats.hits == 6 and again.stats.corrupt == 0
    assert again.get([chunk_factory(100).key]) == [None]
    # Records live under <root>/records/<namespace>/<hh>/<digest>.kvr
    p = record_path(again, chunks[0])
    assert p.parent.parent.name == "test" and p.name == chunks[0].key.hex() + SUFFIX
    assert p.parent.name == chunks[0].key.hex()[:2]


def test_zstd_records_read_by_a_raw_configured_tier(tmp_path, chunk_factory, same_bits):
    chunks = [chunk_factory(i) for i in range(3)]
    tier_at(tmp_path, "zstd").put(chunks)
    reader = tier_at(tmp_path, "raw")  # the codec comes from each record's header
    for got, c in zip(reader.get([c.key for c in chunks]), chunks):
        assert same_bits(got.kv, c.kv)
    # And the other way round, with both kinds of record side by side in one directory.
    more = [chunk_factory(i) for i in range(3, 5)]
    reader.put(more)
    mixed = tier_at(tmp_path, "zstd")
    for got, c in zip(mixed.get([c.key for c in chunks + more]), chunks + more):
        assert same_bits(got.kv, c.kv)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_get_into_out(tmp_path, codec, chunk_factory, same_bits):
    tier = tier_at(tmp_path, codec)
    a, b = chunk_factory(1), chunk_factory(2, dtype=torch.bfloat16)
    tier.put([a, b])
    out = [torch.empty_like(a.kv), None]
    got = tier.get([a.key, b.key], out)
    assert got[0].kv is out[0] and same_bits(out[0], a.kv) and same_bits(got[1].kv, b.kv)
    strided = torch.empty(a.kv.shape[::-1], dtype=a.kv.dtype).permute(4, 3, 2, 1, 0)
    got = tier.get([a.key], [strided])
    assert got[0].kv is strided and same_bits(strided, a.kv)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_get_into_wrong_out_is_a_caller_error(tmp_path, codec, chunk_factory, same_bits):
    tier = tier_at(tmp_path, codec)
    a = chunk_factory(1)
    tier.put([a])
    for bad in (torch.empty(2, 2, 16, 2, 4, dtype=torch.float16), torch.empty(a.kv.shape, dtype=torch.float32)):
        with pytest.raises(InvalidChunkError):
            tier.get([a.key], [bad])
    # Not mistaken for corruption: the record stays and still reads.
    assert tier.stats.corrupt == 0 and list(tier.quarantined()) == []
    assert same_bits(tier.get([a.key])[0].kv, a.kv)


# -- crash safety --------------------------------------------------------------------------------------

CHUNK_SRC = r'''
import numpy as np, torch
from kvstore.chunk import Chunk
from kvstore.keys import ChunkKind, chunk_refs

def det_chunk(i):
    """Chunk number i, the same in every process: [4, 2, 64, 4, 32] fp16 (128 KiB)."""
    tokens = (np.arange(64, dtype=np.int64) + 64 * i) % 50_000
    ref = chunk_refs(tokens, namespace="crash", fingerprint="m", chunk_tokens=64, kind=ChunkKind.STANDALONE)[0]
    g = torch.Generator().manual_seed(i)
    kv = torch.randn(4, 2, 64, 4, 32, generator=g).to(torch.float16)
    return Chunk(ref.key, kv, ref.tokens, 64 * i)
'''

CHILD_SRC = CHUNK_SRC + r'''
import sys
from codec import make_codec
from kvstore.tiers.disk import DiskTier

tier = DiskTier(sys.argv[1], 1 << 30, make_codec(sys.argv[2]), fsync=True)
i = 0
while True:
    c = det_chunk(i)
    assert tier.put([c]) == [True]
    sys.stdout.write(f"{i} {c.key.hex()}\n")
    sys.stdout.flush()
    i += 1
'''


@pytest.mark.parametrize("codec", ["zstd", "raw"])
def test_sigkill_mid_put_loses_no_reported_record(tmp_path, codec, same_bits):
    ns: dict = {}
    exec(CHUNK_SRC, ns)
    det_chunk = ns["det_chunk"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD_SRC, str(tmp_path), codec], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    reported = []
    try:
        while len(reported) < 25:
            line = child.stdout.readline()
            assert line, f"child died: {child.stderr.read()}"
            reported.append(line.split())
    finally:
        os.kill(child.pid, signal.SIGKILL)  # while it is busy with the next puts
        rest, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    reported += [line.split() for line in rest.splitlines() if line.endswith(tuple("0123456789abcdef"))]

    tier = tier_at(tmp_path, codec)
    assert files(tmp_path, "*" + TMP_SUFFIX) == []  # a put cut short left nothing visible
    assert tier.orphans_removed in (0, 1)
    keys = []
    for i, hexd in reported:
        c = det_chunk(int(i))
        assert c.key.hex() == hexd
        keys.append(c.key)
    assert all(tier.contains(keys))
    for (i, _), got in zip(reported, tier.get(keys)):
        c = det_chunk(int(i))
        assert got is not None and same_bits(got.kv, c.kv) and got.start_pos == c.start_pos
    report = tier.verify()
    assert report.checked >= len(reported) and report.bad == []
    assert tier.stats.corrupt == 0


def test_leftover_temp_files_are_removed_at_start(tmp_path, chunk_factory):
    tier = tier_at(tmp_path)
    c = chunk_factory(1)
    tier.put([c])
    final = record_path(tier, c)
    # What a process killed between write and rename leaves behind: a complete-looking temp file.
    header, payload = encode_record(chunk_factory(2), make_codec("raw"))
    tmp = final.parent / (chunk_factory(2).key.hex() + SUFFIX + ".1234.5678" + TMP_SUFFIX)
    tmp.write_bytes(header + bytes(payload))
    half = final.parent / (final.name + ".99.1" + TMP_SUFFIX)
    half.write_bytes(final.read_bytes()[:100])
    again = tier_at(tmp_path)
    assert again.orphans_removed == 2
    assert not tmp.exists() and not half.exists() and final.exists()
    assert again.usage().entries == 1
    assert again.contains([chunk_factory(2).key]) == [False]


def test_stray_files_are_ignored(tmp_path, chunk_factory):
    tier = tier_at(tmp_path)
    c = chunk_factory(1)
    tier.put([c])
    d = record_path(tier, c).parent
    (d / "README").write_text("hello")
    (d / ("ab" + SUFFIX)).write_text("short name")
    (d / ("zz" * 16 + SUFFIX)).write_text("not hex")
    (tmp_path / "records" / "loose-file").write_text("x")
    again = tier_at(tmp_path)
    assert again.usage().entries == 1 and again.get([c.key])[0] is not None


# -- corruption ----------------------------------------------------------------------------------------


def _flip_payload_byte(p: Path, tier, other) -> None:
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x10
    p.write_bytes(bytes(data))


def _flip_header_byte(p: Path, tier, other) -> None:
    data = bytearray(p.read_bytes())
    data[20] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate_payload(p: Path, tier, other) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def _truncate_header(p: Path, tier, other) -> None:
    p.write_bytes(p.read_bytes()[:30])


def _empty(p: Path, tier, other) -> None:
    p.write_bytes(b"")


def _extend(p: Path, tier, other) -> None:
    p.write_bytes(p.read_bytes() + b"\x00")


def _garbage_header(p: Path, tier, other) -> None:
    data = bytearray(p.read_bytes())
    data[:64] = os.urandom(64)
    p.write_bytes(bytes(data))


def _foreign_record(p: Path, tier, other) -> None:
    # A valid record of another key, under this key's name.
    os.replace(record_path(tier, other), p)


CORRUPTIONS = [_flip_payload_byte, _flip_header_byte, _truncate_payload, _truncate_header, _empty, _extend, _garbage_header, _foreign_record]


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_record_is_a_miss_and_is_quarantined(tmp_path, codec, corrupt, chunk_factory, same_bits):
    tier = tier_at(tmp_path, codec)
    victim, other, bystander = chunk_factory(1), chunk_factory(2), chunk_factory(3)
    tier.put([victim, other, bystander])
    p = record_path(tier, victim)
    corrupt(p, tier, other)
    got = tier.get([victim.key, bystander.key], [torch.empty_like(victim.kv), None])
    assert got[0] is None
    assert same_bits(got[1].kv, bystander.kv)
    assert tier.stats.corrupt == 1
    assert not p.exists()
    q = list(tier.quarantined())
    assert len(q) == 1 and q[0].name.startswith(p.name)
    assert tier.contains([victim.key]) == [False]
    # A second get is a plain miss: nothing more is quarantined or counted as corrupt.
    assert tier.get([victim.key]) == [None]
    assert tier.stats.corrupt == 1 and len(list(tier.quarantined())) == 1
    if corrupt is _foreign_record:
        # The moved record's own key lost its file: a plain miss, forgotten, not corruption.
        assert tier.get([other.key]) == [None] and tier.stats.corrupt == 1
    assert tier.usage().entries == (1 if corrupt is _foreign_record else 2)
    assert tier.usage().used_bytes == sum(f.stat().st_size for f in files(tmp_path / "records", "*" + SUFFIX))
    # The key can be stored again afterwards.
    assert tier.put([victim]) == [True]
    assert same_bits(tier.get([victim.key])[0].kv, victim.kv)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_truncated_record_claiming_a_large_payload_allocates_nothing_big(tmp_path, codec, chunk_factory):
    # A well-formed header for 64 MiB of KV and a 64 MiB payload, but the file ends soon after it.
    tier = tier_at(tmp_path, codec)
    small = chunk_factory(1)
    big = Chunk(small.key, torch.zeros(16, 2, 256, 8, 128, dtype=torch.float16), np.arange(256, dtype=np.uint32))
    header = encode_header(big, make_codec(codec), payload_len=big.nbytes, checksum=0)
    tier.put([small])
    p = record_path(tier, small)
    p.write_bytes(header + bytes(1000))
    tracemalloc.start()
    try:
        assert tier.get([small.key]) == [None]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert tier.stats.corrupt == 1


def test_verify_finds_and_quarantines_bad_records(tmp_path, chunk_factory, same_bits):
    tier = tier_at(tmp_path)
    chunks = [chunk_factory(i) for i in range(10)]
    tier.put(chunks)
    _flip_payload_byte(record_path(tier, chunks[0]), tier, None)
    _truncate_payload(record_path(tier, chunks[1]), tier, None)
    _flip_header_byte(record_path(tier, chunks[2]), tier, None)
    os.unlink(record_path(tier, chunks[3]))  # vanished: forgotten, not "bad"
    report = tier.verify()
    assert report.checked == 10
    assert len(report.bad) == 3
    assert sorted(Path(q).name.split(".")[0] for q, _ in report.bad) == sorted(c.key.hex() for c in chunks[:3])
    assert all(Path(q).exists() and Path(q).parent == tier.quarantine_dir for q, _ in report.bad)
    assert all(reason for _, reason in report.bad)
    assert tier.stats.corrupt == 3
    assert tier.contains([c.key for c in chunks]) == [False] * 4 + [True] * 6
    for got, c in zip(tier.get([c.key for c in chunks[4:]]), chunks[4:]):
        assert same_bits(got.kv, c.kv)
    again = tier.verify()
    assert again.checked == 6 and again.bad == []


def test_misplaced_record_is_caught_by_verify(tmp_path, chunk_factory):
    tier = tier_at(tmp_path)
    a, b = chunk_factory(1), chunk_factory(2)
    tier.put([a, b])
    os.replace(record_path(tier, b), record_path(tier, a))  # b's bytes under a's name
    fresh = tier_at(tmp_path)
    report = fresh.verify()
    assert report.checked == 1 and len(report.bad) == 1


# -- capacity, LRU, pins ---------------------------------------------------------------------------------


def _record_size(tmp_path, chunk) -> int:
    probe = tier_at(tmp_path / "probe", "raw")
    probe.put([chunk])
    return probe.usage().used_bytes


def test_capacity_bound_with_lru_and_pins(tmp_path, chunk_factory):
    chunks = [chunk_factory(i) for i in range(7)]
    size = _record_size(tmp_path, chunks[0])  # raw: every record of this shape has the same size
    tier = tier_at(tmp_path / "t", "raw", capacity=3 * size + size // 2)
    a, b, c, d, e, f, g = chunks
    assert tier.put([a, b, c]) == [True] * 3
    tier.get([a.key])  # a is now the most recent
    assert tier.put([d]) == [True]  # evicts b
    assert tier.contains([a.key, b.key, c.key, d.key]) == [True, False, True, True]
    assert not record_path(tier, b).exists()
    assert tier.pin([c.key]) == [True]  # c is the LRU one, but pinned
    assert tier.put([e]) == [True]  # evicts a instead
    assert tier.contains([a.key, c.key, d.key, e.key]) == [False, True, True, True]
    tier.pin([d.key, e.key])
    assert tier.put([f]) == [False]  # all pinned: no room
    assert tier.stats.put_rejected == 1 and not record_path(tier, f).exists()
    assert tier.usage().pinned == 3
    tier.unpin([d.key])
    assert tier.put([f]) == [True]  # evicts d
    assert tier.contains([c.key, d.key, e.key, f.key]) == [True, False, True, True]
    assert tier.stats.evictions == 3
    u = tier.usage()
    assert u.used_bytes <= u.capacity_bytes and u.entries == 3
    # Larger than the whole tier: refused outright.
    huge = chunk_factory(50, (2, 2, 64, 2, 8))
    assert tier.put([huge]) == [False]
    assert len(files(tmp_path / "t", "*" + SUFFIX)) == 3


def test_restart_with_smaller_capacity_evicts_oldest_first(tmp_path, chunk_factory):
    chunks = [chunk_factory(i) for i in range(5)]
    size = _record_size(tmp_path, chunks[0])
    tier = tier_at(tmp_path / "t", "raw")
    tier.put(chunks)
    for n, c in enumerate(chunks):  # make write order unambiguous whatever the clock resolution
        os.utime(record_path(tier, c), ns=(10**18 + n * 10**9, 10**18 + n * 10**9))
    small = tier_at(tmp_path / "t", "raw", capacity=2 * size)
    assert small.contains([c.key for c in chunks]) == [False, False, False, True, True]
    assert small.usage().used_bytes == 2 * size
    assert len(files(tmp_path / "t", "*" + SUFFIX)) == 2


def test_delete_and_deferred_delete(tmp_path, chunk_factory, same_bits):
    tier = tier_at(tmp_path)
    a, b = chunk_factory(1), chunk_factory(2)
    tier.put([a, b])
    assert tier.delete([a.key, chunk_factory(3).key]) == 1
    assert not record_path(tier, a).exists() and tier.contains([a.key]) == [False]
    tier.pin([b.key])
    tier.pin([b.key])
    assert tier.delete([b.key]) == 1
    assert tier.contains([b.key]) == [False] and tier.get([b.key]) == [None]
    assert tier.usage().used_bytes == 0
    assert record_path(tier, b).exists()  # still pinned: the file stays
    tier.unpin([b.key])
    assert record_path(tier, b).exists()
    tier.unpin([b.key])
    assert not record_path(tier, b).exists()


def test_put_again_while_a_delete_is_deferred(tmp_path, chunk_factory, same_bits):
    tier = tier_at(tmp_path)
    a = chunk_factory(1)
    tier.put([a])
    tier.pin([a.key])
    tier.delete([a.key])
    assert tier.put([a]) == [True]
    tier.unpin([a.key])
    assert same_bits(tier.get([a.key])[0].kv, a.kv)
    assert tier.usage().used_bytes == record_path(tier, a).stat().st_size
    assert tier.delete([a.key]) == 1 and not record_path(tier, a).exists()


class _PausingTier(DiskTier):
    """Holds the first read at its start until released: an interleaving that timing cannot force."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.entered, self.proceed = threading.Event(), threading.Event()

    def _read(self, path, key, out):
        if not self.entered.is_set():
            self.entered.set()
            assert self.proceed.wait(10)
        return super()._read(path, key, out)


def test_delete_and_put_again_during_a_read_keeps_the_new_record(tmp_path, chunk_factory, same_bits):
    tier = _PausingTier(tmp_path, BIG, make_codec("zstd"), fsync=False)
    a = chunk_factory(1)
    tier.put([a])
    got = []
    reader = threading.Thread(target=lambda: got.extend(tier.get([a.key])))
    reader.start()
    assert tier.entered.wait(10)
    assert tier.delete([a.key]) == 1  # deferred: a read is in flight
    assert tier.put([a]) == [True]  # a put that returned True must survive the deferred delete
    tier.proceed.set()
    reader.join(10)
    assert got and same_bits(got[0].kv, a.kv)
    assert record_path(tier, a).exists()
    assert same_bits(tier.get([a.key])[0].kv, a.kv)
    assert same_bits(tier_at(tmp_path).get([a.key])[0].kv, a.kv)


def test_clear_keeps_pinned(tmp_path, chunk_factory):
    tier = tier_at(tmp_path)
    chunks = [chunk_factory(i) for i in range(4)]
    tier.put(chunks)
    tier.pin([chunks[0].key])
    assert tier.clear() == 3
    assert tier.contains([c.key for c in chunks]) == [True, False, False, False]
    assert len(files(tmp_path, "*" + SUFFIX)) == 1


def test_closed_tier_refuses_puts(tmp_path, chunk_factory):
    tier = tier_at(tmp_path)
    tier.close()
    with pytest.raises(TierError):
        tier.put([chunk_factory(1)])


# -- index rebuild -------------------------------------------------------------------------------------


def test_index_rebuild_sees_every_record(tmp_path):
    n, per_batch = 2000, 200
    kv = torch.arange(16, dtype=torch.float16).reshape(1, 2, 2, 1, 4)
    from kvstore.keys import ChunkKind, chunk_refs

    toks = np.arange(2 * n, dtype=np.uint32)
    refs = chunk_refs(toks, namespace="many", fingerprint="m", chunk_tokens=2, kind=ChunkKind.STANDALONE)
    # Standalone refs chain within the sequence, so every key is distinct.
    assert len({r.key for r in refs}) == n
    tier = tier_at(tmp_path, "raw")
    for i in range(0, n, per_batch):
        assert all(tier.put([Chunk(r.key, kv, r.tokens) for r in refs[i : i + per_batch]]))
    used = tier.usage().used_bytes
    again = tier_at(tmp_path, "raw")
    assert again.usage().entries == n and again.usage().used_bytes == used
    assert all(again.contains([r.key for r in refs]))
    sample = again.get([refs[0].key, refs[n // 2].key, refs[-1].key])
    assert [np.array_equal(s.tokens, r.tokens) for s, r in zip(sample, [refs[0], refs[n // 2], refs[-1]])] == [True] * 3


# -- privacy and symbolic links (issue 15, D6 and D7) ------------------------------------------------------


def test_records_and_directories_are_private(tmp_path, chunk_factory):
    tier = tier_at(tmp_path / "t")
    tier.put([chunk_factory(i) for i in range(3)])
    tier.close()
    root = tmp_path / "t"
    for p in root.rglob("*"):
        mode = p.stat().st_mode & 0o777
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


def test_an_older_store_is_made_private_at_start(tmp_path, chunk_factory):
    os.makedirs(tmp_path / "t" / "records" / "test", mode=0o755)
    os.chmod(tmp_path / "t" / "records", 0o755)
    tier_at(tmp_path / "t").close()
    assert (tmp_path / "t" / "records").stat().st_mode & 0o777 == 0o700


def test_a_symlinked_namespace_directory_is_refused_and_nothing_acknowledged_is_lost(tmp_path, chunk_factory):
    """Puts used to follow the link while the index rebuild skipped it: acknowledged, then gone."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tier = tier_at(tmp_path / "t")
    os.symlink(elsewhere, tmp_path / "t" / "records" / "test")
    cs = [chunk_factory(i) for i in range(5)]
    ok = tier.put(cs)
    tier.close()
    assert not list(elsewhere.rglob("*.kvr"))  # nothing written through the link
    again = tier_at(tmp_path / "t")
    for c, stored in zip(cs, ok):
        assert (again.get([c.key])[0] is not None) == stored  # every True is still there
    assert ok == [False] * 5 and tier.stats.errors == 5
    again.close()


def test_a_symlinked_record_file_is_never_read(tmp_path, chunk_factory):
    tier = tier_at(tmp_path / "t")
    c = chunk_factory(1)
    tier.put([c])
    path = record_path(tier, c)
    tier.close()
    target = tmp_path / "outside.kvr"
    os.replace(path, target)
    os.symlink(target, path)
    again = tier_at(tmp_path / "t")
    assert again.contains([c.key]) == [False] and again.get([c.key]) == [None]
    again.close()
