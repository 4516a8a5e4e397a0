"""The precompute job in process: corpus reading, the manifest, KV equal to the model's, resume, bad input,
batching, and the Redis and sidecar targets (real servers on loopback)."""

from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from codec import codec_names, make_codec  # noqa: E402
from connectors.hf import compute_chunks, model_fingerprint, prefill_kv  # noqa: E402
from connectors.precompute import (BadEntry, Document, ManifestError, ManifestHeader, ManifestWriter,  # noqa: E402
                                   PrecomputeError, PrecomputeJob, PrecomputeOptions, count_entries, read_corpus,
                                   read_manifest)
from connectors.precompute.compute import prefill_padded  # noqa: E402
from connectors.precompute.target import build_target  # noqa: E402
from connectors.models import load_model  # noqa: E402
from kvstore.config import load_config  # noqa: E402
from kvstore.keys import ChunkKind, chunk_refs  # noqa: E402
from kvstore.tiers import DiskTier, RedisTier  # noqa: E402

CHUNK = 64  # small chunks keep the corpus small while every document still spans several chunks
WORDS = ("the of and river stone tower library festival map city harbor market garden bridge lantern "
         "winter north south old new small great quiet").split()


@pytest.fixture(scope="module")
def shipped():
    return load_model("tiny", torch.float32)


@pytest.fixture(scope="module")
def fingerprint(shipped):
    return model_fingerprint(shipped[0])


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_corpus(path, docs: list[tuple[str, str]], extra_lines: tuple[bytes, ...] = ()) -> None:
    with open(path, "wb") as f:
        for doc_id, t in docs:
            f.write(json.dumps({"id": doc_id, "text": t}).encode() + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")


def gen_docs(n: int, seed: int = 0, lo: int = 40, hi: int = 160) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"doc-{i}", text(rng, rng.randint(lo, hi))) for i in range(n)]


def disk(tmp_path, name="store", codec="zstd") -> DiskTier:
    return DiskTier(tmp_path / name, 1 << 30, make_codec(codec))


def run_job(shipped, target, corpus_path, manifest=None, **opts):
    model, tok = shipped
    options = PrecomputeOptions(chunk_tokens=CHUNK, namespace="pc", **opts)
    job = PrecomputeJob(model, tok, target, options, manifest)
    return job, job.run(read_corpus(corpus_path))


def tokens_of(shipped, t: str) -> np.ndarray:
    return np.asarray(shipped[1](t, add_special_tokens=False)["input_ids"], dtype=np.int64)


# -- corpus ---------------------------------------------------------------------------------------------


def test_jsonl_reader_reports_each_bad_line_and_keeps_going(tmp_path):
    p = tmp_path / "c.jsonl"
    write_corpus(p, [("a", "alpha text")], extra_lines=(
        b"", b"   ",  # blank lines are not entries
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[1, 2]",
        b'{"text": "no id"}',
        b'{"id": "no-text"}',
        b'{"id": "empty", "text": "  \\n "}',
        b'{"id": 7, "text": "integer ids are fine"}',
        b'{"id": "huge", "text": "' + b"x" * 5000 + b'"}',
        b'{"id": "z", "text": "last one"}',
    ))
    items = list(read_corpus(p, max_entry_bytes=1000))
    good = [(d.id, d.text) for d in items if isinstance(d, Document)]
    bad = [(b.id, b.reason) for b in items if isinstance(b, BadEntry)]
    assert good == [("a", "alpha text"), ("7", "integer ids are fine"), ("z", "last one")]
    assert [b[0] for b in bad] == ["line 4", "line 5", "line 6", "line 7", "no-text", "empty", "line 11"]
    reasons = dict(bad)
    assert "UTF-8" in reasons["line 4"] and "JSON" in reasons["line 5"] and "object" in reasons["line 6"]
    assert "'id'" in reasons["line 7"] and "'text'" in reasons["no-text"] and "empty" in reasons["empty"]
    assert "longer than 1000 bytes" in reasons["line 11"]
    assert count_entries(p) == len(items)


def test_folder_reader_ids_are_relative_paths_in_sorted_order(tmp_path):
    root = tmp_path / "docs"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("first")
    (root / "b" / "c.md").write_text("nested")
    (root / ".hidden").write_text("skipped")
    (root / "bin.dat").write_bytes(b"\x00\xff\xfe")
    (root / "blank.txt").write_text("\n\n")
    items = list(read_corpus(root))
    assert [(type(i).__name__, i.id) for i in items] == [
        ("Document", "a.txt"), ("Document", "b/c.md"), ("BadEntry", "bin.dat"), ("BadEntry", "blank.txt")]
    assert count_entries(root) == 4
    with pytest.raises(PrecomputeError, match="does not exist"):
        read_corpus(tmp_path / "missing.jsonl")


# -- manifest -------------------------------------------------------------------------------------------


def header(**kw) -> ManifestHeader:
    base = dict(fingerprint="m-1", namespace="pc", kind=ChunkKind.PREFIX, chunk_tokens=CHUNK)
    return ManifestHeader(**{**base, **kw})


def test_manifest_torn_tail_is_ignored_then_truncated_and_params_are_checked(tmp_path, shipped, fingerprint):
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, gen_docs(3, seed=1))
    m = tmp_path / "m.jsonl"
    job, s = run_job(shipped, disk(tmp_path), corpus, m)
    assert s.units_uploaded == 3
    good = m.read_bytes()
    with open(m, "ab") as f:
        f.write(b'{"id":"doc-9","doc":"doc-9","chun')  # a kill in the middle of an append
    got = read_manifest(m)
    assert got.torn and set(got.records) == {"doc-0", "doc-1", "doc-2"}
    with ManifestWriter(m, job.header) as w:
        assert w.dropped_torn_line and len(w.records) == 3
        with pytest.raises(ManifestError, match="in use"):
            ManifestWriter(m, job.header)
    assert m.read_bytes() == good
    with pytest.raises(ManifestError, match="chunk_tokens"):
        ManifestWriter(m, ManifestHeader(fingerprint, "pc", ChunkKind.PREFIX, 128))
    other = tmp_path / "not-a-manifest.jsonl"
    other.write_bytes(b'{"id": "x", "text": "a corpus line"}')
    with pytest.raises(ManifestError):
        ManifestWriter(other, header())
    assert other.read_bytes() == b'{"id": "x", "text": "a corpus line"}'  # never truncated


# -- the job --------------------------------------------------------------------------------------------


def test_prefix_job_uploads_the_models_kv_and_a_manifest_then_a_rerun_computes_nothing(tmp_path, shipped, fingerprint):
    docs = gen_docs(5, seed=2)
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, docs)
    m = tmp_path / "m.jsonl"
    target = disk(tmp_path)
    _, s = run_job(shipped, target, corpus, m)
    assert s.ok and s.units_uploaded + s.units_without_chunks == 5 and s.chunks_skipped == 0
    manifest = read_manifest(m)
    total = 0
    for doc_id, t in docs:
        ids = tokens_of(shipped, t)
        want = compute_chunks(shipped[0], ids, fingerprint=fingerprint, namespace="pc", chunk_tokens=CHUNK)
        rec = manifest.records[doc_id]
        assert rec.keys() == [c.key for c in want]  # full chunks only: no trailing partial in prefix mode
        assert rec.tokens == len(ids) and rec.stored_tokens == len(ids) // CHUNK * CHUNK
        got = target.get(rec.keys())
        for g, w in zip(got, want):
            assert torch.equal(g.kv, w.kv) and np.array_equal(g.tokens, w.tokens)  # zstd: lossless
        total += len(want)
    assert s.chunks_computed == s.chunks_uploaded == total > 5
    assert s.kv_bytes > s.stored_bytes > 0  # zstd compresses fp32 KV
    before = m.read_bytes()
    _, s2 = run_job(shipped, target, corpus, m)
    assert s2.chunks_computed == 0 and s2.tokens_computed == 0 and s2.chunks_skipped == total
    assert s2.units_present + s2.units_without_chunks == 5
    assert m.read_bytes() == before  # no duplicate records


def test_passages_mode_stores_standalone_chunks_including_short_ones(tmp_path, shipped, fingerprint):
    docs = gen_docs(3, seed=3, lo=60, hi=120)
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, docs)
    m = tmp_path / "m.jsonl"
    target = disk(tmp_path)
    _, s = run_job(shipped, target, corpus, m, kind=ChunkKind.STANDALONE, passage_tokens=100)
    assert s.ok
    recs = read_manifest(m).records
    for doc_id, t in docs:
        ids = tokens_of(shipped, t)
        starts = list(range(0, len(ids), 100))
        for n, start in enumerate(starts):
            rec = recs[f"{doc_id}#{n}"]
            passage = ids[start : start + 100]
            assert rec.doc == doc_id and rec.doc_start == start and rec.tokens == len(passage)
            want = compute_chunks(shipped[0], passage, fingerprint=fingerprint, namespace="pc", chunk_tokens=CHUNK,
                                  kind=ChunkKind.STANDALONE, include_partial=True)
            assert rec.keys() == [c.key for c in want] and rec.stored_tokens == len(passage)
            for g, w in zip(target.get(rec.keys()), want):
                assert torch.equal(g.kv, w.kv) and g.start_pos == w.start_pos
        assert f"{doc_id}#{len(starts)}" not in recs


def test_bad_documents_are_reported_by_id_and_the_rest_is_done(tmp_path, shipped):
    docs = gen_docs(3, seed=4)
    long_text = text(random.Random(5), 2600)  # more tokens than the model's 2048-token context
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, docs[:2] + [("too-long", long_text)] + docs[2:], extra_lines=(b"{oops", b'{"id": "e", "text": ""}'))
    m = tmp_path / "m.jsonl"
    _, s = run_job(shipped, disk(tmp_path), corpus, m)
    assert not s.ok and s.bad_entries == 3 and s.units_failed == 0
    by_id = {f.id: f.reason for f in s.failures}
    assert set(by_id) == {"too-long", "line 5", "e"} and "context of 2048" in by_id["too-long"]
    assert set(read_manifest(m).records) == {d for d, _ in docs}


def test_rerun_after_losing_chunks_computes_exactly_those(tmp_path, shipped):
    docs = gen_docs(4, seed=6, lo=120, hi=200)
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, docs)
    m = tmp_path / "m.jsonl"
    target = disk(tmp_path)
    _, s = run_job(shipped, target, corpus, m)
    recs = read_manifest(m).records
    # Lose the last chunk of doc-0 and the second chunk of doc-1 (a prefix: its tail must be recomputed too).
    lost = [recs["doc-0"].keys()[-1], recs["doc-1"].keys()[1]]
    assert target.delete(lost) == 2
    _, s2 = run_job(shipped, target, corpus, m)
    assert s2.ok and s2.chunks_computed == 2 and s2.chunks_skipped == s.chunks_computed - 2
    assert s2.tokens_computed == recs["doc-0"].stored_tokens + recs["doc-1"].chunks[1].start + CHUNK
    assert all(target.contains(lost))


def test_dry_run_reports_and_writes_nothing(tmp_path, shipped):
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, gen_docs(4, seed=7))
    target = disk(tmp_path)
    _, dry = run_job(shipped, target, corpus, tmp_path / "m.jsonl", dry_run=True)
    assert target.usage().entries == 0 and not (tmp_path / "m.jsonl").exists()
    _, real = run_job(shipped, target, corpus, tmp_path / "m.jsonl")
    assert dry.chunks_computed == real.chunks_computed > 0 and dry.tokens_computed == real.tokens_computed


def test_request_stop_finishes_in_flight_uploads_and_a_rerun_does_the_rest(tmp_path, shipped):
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, gen_docs(8, seed=8, lo=80, hi=120))
    m = tmp_path / "m.jsonl"
    target = disk(tmp_path)
    model, tok = shipped
    job = PrecomputeJob(model, tok, target, PrecomputeOptions(chunk_tokens=CHUNK, namespace="pc", window_docs=2), m)

    class StopAfterFirst:  # the progress hook is the job's own callback: stop once a document is done
        def update(self, n):
            job.request_stop()

        def set_postfix_str(self, s, refresh=False):
            pass

    job.progress = StopAfterFirst()
    s = job.run(read_corpus(corpus))
    assert s.interrupted and not s.ok and 1 <= s.units_uploaded < 8
    recs = read_manifest(m).records
    assert len(recs) == s.units_uploaded  # everything computed was uploaded and recorded
    assert all(all(target.contains(r.keys())) for r in recs.values())
    _, s2 = run_job(shipped, target, corpus, m)
    assert s2.ok and s2.chunks_skipped == s.chunks_computed and len(read_manifest(m).records) == 8


def test_batched_forward_matches_unbatched_prefill(shipped):
    model, _ = shipped
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 4096, n).astype(np.uint32) for n in (70, 130, 33)]
    for seq, kv in zip(seqs, prefill_padded(model, seqs)):
        ref = prefill_kv(model, torch.from_numpy(seq.astype(np.int64)))  # [L, 2, T, H, D]
        assert kv.shape == ref.shape
        torch.testing.assert_close(kv, ref, rtol=1e-4, atol=1e-4)


def test_batched_job_stores_the_same_keys_and_close_kv(tmp_path, shipped):
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, gen_docs(4, seed=9))
    one, many = disk(tmp_path, "one"), disk(tmp_path, "many")
    _, s1 = run_job(shipped, one, corpus, tmp_path / "m1.jsonl")
    _, s3 = run_job(shipped, many, corpus, tmp_path / "m3.jsonl", batch_size=3)
    r1, r3 = read_manifest(tmp_path / "m1.jsonl").records, read_manifest(tmp_path / "m3.jsonl").records
    assert r1 == r3 and s1.chunks_computed == s3.chunks_computed
    keys = [k for r in r1.values() for k in r.keys()]
    for a, b in zip(one.get(keys), many.get(keys)):
        torch.testing.assert_close(a.kv, b.kv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("codec_name", ["raw", "zstd"] + (["cachegen"] if "cachegen" in codec_names() else []))
def test_stored_kv_is_the_codecs_round_trip_of_the_models_kv(tmp_path, shipped, fingerprint, codec_name):
    docs = gen_docs(2, seed=10, lo=100, hi=140)
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, docs)
    codec = make_codec(codec_name)
    target = DiskTier(tmp_path / "s", 1 << 30, codec)
    _, s = run_job(shipped, target, corpus, tmp_path / "m.jsonl")
    assert s.ok and s.chunks_uploaded > 0
    for doc_id, t in docs:
        want = compute_chunks(shipped[0], tokens_of(shipped, t), fingerprint=fingerprint, namespace="pc", chunk_tokens=CHUNK)
        for w, g in zip(want, target.get([c.key for c in want])):
            roundtrip = torch.empty_like(w.kv)
            bound = codec.bind(w.key.fingerprint)  # cachegen: the model's codebook sets its steps
            bound.decode(memoryview(bytes(bound.encode(w.kv))), roundtrip)  # what the codec promises to keep
            assert torch.equal(g.kv, roundtrip)
            if codec.lossless:
                assert torch.equal(g.kv, w.kv)


# -- remote targets -------------------------------------------------------------------------------------


def test_redis_target_and_a_dead_server_is_reported_not_recorded(tmp_path, shipped, fingerprint):
    from benchmarks.servers import RedisServer

    docs = gen_docs(3, seed=11)
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, docs)
    server = RedisServer(tmp_path / "redis").start()
    try:
        config = load_config(None, {}, {"redis.url": server.url, "redis.codec": "zstd"})
        target = build_target(config)
        assert isinstance(target, RedisTier)
        _, s = run_job(shipped, target, corpus, tmp_path / "m.jsonl")
        assert s.ok and s.chunks_uploaded > 0
        for doc_id, t in docs:
            want = compute_chunks(shipped[0], tokens_of(shipped, t), fingerprint=fingerprint, namespace="pc", chunk_tokens=CHUNK)
            for w, g in zip(want, target.get([c.key for c in want])):
                assert torch.equal(g.kv, w.kv)
        _, again = run_job(shipped, target, corpus, tmp_path / "m.jsonl")
        assert again.chunks_computed == 0 and again.chunks_skipped == s.chunks_uploaded
        server.kill()
        more = tmp_path / "more.jsonl"
        write_corpus(more, gen_docs(2, seed=12))
        dead = RedisTier(server.url, make_codec("zstd"), timeout=0.2, retry_after=0.05)
        _, s3 = run_job(shipped, dead, more, tmp_path / "m2.jsonl", upload_attempts=2, retry_backoff_s=0.01)
        assert not s3.ok and s3.units_failed == 2 and s3.units_uploaded == 0
        assert all("not in the target" in f.reason for f in s3.failures)
        assert read_manifest(tmp_path / "m2.jsonl").records == {}
        target.close()
        dead.close()
    finally:
        server.kill()


def test_sidecar_target_with_a_token(tmp_path, shipped, fingerprint):
    from kvstore.config import ServerConfig, build_store
    from kvstore.service import TokenTable, make_app
    from tests.support.service import ServiceThread

    store_cfg = load_config(None, {}, {"disk.path": str(tmp_path / "sidecar"), "memory.enabled": "false"})
    store = build_store(store_cfg, records=True)
    table = TokenTable({"s3cret": ["pc"]})
    svc = ServiceThread(lambda: make_app(store, ServerConfig(), table)).start()
    try:
        docs = gen_docs(2, seed=13)
        corpus = tmp_path / "c.jsonl"
        write_corpus(corpus, docs)
        config = load_config(None, {}, {"sidecar.url": svc.url, "sidecar.token": "s3cret", "sidecar.codec": "raw"})
        target = build_target(config)
        _, s = run_job(shipped, target, corpus, tmp_path / "m.jsonl")
        assert s.ok and s.chunks_uploaded > 0
        for doc_id, t in docs:
            ids = tokens_of(shipped, t)
            refs = chunk_refs(ids, namespace="pc", fingerprint=fingerprint, chunk_tokens=CHUNK)
            assert store.lookup_refs(refs) == len(refs)  # in the sidecar's own store
        target.close()
    finally:
        svc.stop()
        store.close()


def test_levels_store_every_chunk_at_each_level_and_a_lost_copy_is_redone(tmp_path, shipped, fingerprint):
    from kvstore.errors import ConfigError
    from kvstore.keys import level_key
    from kvstore.record import decode_record

    docs = gen_docs(3, seed=9, lo=120, hi=200)
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, docs)
    m = tmp_path / "m.jsonl"
    target = disk(tmp_path)
    _, s = run_job(shipped, target, corpus, m, levels=("int8", "raw"))
    assert s.ok
    keys = [k for r in read_manifest(m).records.values() for k in r.keys()]
    assert len(keys) == s.chunks_uploaded > 3
    for level in ("int8", "raw"):
        assert all(target.contains([level_key(k, level) for k in keys]))
    base = target.get(keys[:1])[0]
    with target.get_bytes([level_key(keys[0], "raw")])[0] as rec:
        copy = decode_record(rec.read(), key=level_key(keys[0], "raw"))
    assert torch.equal(copy.kv, base.kv) and np.array_equal(copy.tokens, base.tokens)
    # A lost copy makes its chunk (and, prefix mode, what follows it in its document) count as missing.
    assert target.delete([level_key(keys[-1], "int8")]) == 1
    _, s2 = run_job(shipped, target, corpus, m, levels=("int8", "raw"))
    assert s2.ok and s2.chunks_computed == 1 and all(target.contains([level_key(k, "int8") for k in keys]))
    with pytest.raises(ConfigError):
        PrecomputeOptions(levels=("nosuchcodec",))
