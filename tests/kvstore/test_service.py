"""The sidecar service over real loopback sockets: round trips, tenants, limits, malformed input, the
sidecar tier through a `TieredStore` (with the sidecar stopped and restarted), and a SIGKILLed server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import urllib3

from codec import make_codec
from codec.codebook import missing_codebooks
from kvstore.chunk import Chunk
from kvstore.cli import main as cli_main
from kvstore.config import ServerConfig
from kvstore.keys import chunk_refs
from kvstore.record import decode_record, encode_record
from kvstore.service import TokenTable, make_app
from kvstore.store import TieredStore
from kvstore.tiers import DiskTier, MemoryTier, RecordMemoryTier, SidecarTier
from kvstore.wire import FRAME, key_to_json, record_path
from benchmarks.servers import ServeProcess
from tests.support.service import ServiceThread

CT = 16
SHAPE = (2, 2, CT, 2, 8)  # [L, 2, T, H, D]: 2 KiB in fp16
TOKENS = {"tok-a": ["a"], "tok-b": ["b"], "tok-admin": ["*"],
          "tok-old": {"namespaces": ["a"], "expires": "2020-01-01T00:00:00Z"},
          "tok-dated": {"namespaces": ["a"], "expires": "2999-01-01T00:00:00+00:00"}}
LIMITS = ServerConfig(max_body_bytes=64 << 10, max_batch_keys=8, request_timeout_s=5.0)


def chunks_for(n: int, seed: int = 0, namespace: str = "a", fingerprint: str = "m") -> list[Chunk]:
    refs = chunk_refs(np.arange(n * CT) + seed * 1_000_000, namespace=namespace, fingerprint=fingerprint, chunk_tokens=CT)
    g = torch.Generator().manual_seed(seed)
    return [Chunk.from_ref(r, torch.randn(SHAPE, generator=g).to(torch.float16)) for r in refs]


def record(chunk: Chunk, codec: str = "zstd") -> bytes:
    header, payload = encode_record(chunk, make_codec(codec))
    return header + bytes(payload)


def frames(records: list[bytes]) -> bytes:
    return b"".join(FRAME.pack(len(r)) + r for r in records)


def read_frames(data: bytes) -> list[bytes | None]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = FRAME.unpack_from(data, pos)
        pos += FRAME.size
        out.append(data[pos : pos + n] if n else None)
        pos += n
    return out


class Client:
    def __init__(self, url: str, token: str | None) -> None:
        self.url, self.token = url, token
        # A connection pool sends paths as given (no dot-segment normalization, unlike PoolManager).
        self.http = urllib3.connection_from_url(url, retries=False, timeout=10.0)

    def __call__(self, method: str, path: str, body=None, *, json_body=None, token: str | None = "default", headers=None):
        token = self.token if token == "default" else token
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
        return self.http.urlopen(method, path, body=body, headers=h)


def error_of(resp) -> str:
    assert resp.headers["Content-Type"].startswith("application/json"), resp.data[:200]
    return json.loads(resp.data)["error"]


def make_store(tmp_path: Path) -> TieredStore:
    """A record server's store: records in memory, then on disk (what `kvstore serve` builds)."""
    mem = RecordMemoryTier(64 * 2048)
    disk = DiskTier(tmp_path / "disk", 1 << 30, make_codec("zstd"), fsync=False)
    return TieredStore([mem, disk], chunk_tokens=CT)


@pytest.fixture
def store(tmp_path):
    s = make_store(tmp_path)
    yield s
    s.close()


@pytest.fixture
def server(store):
    svc = ServiceThread(lambda: make_app(store, LIMITS, TokenTable(TOKENS))).start()
    yield svc
    svc.stop()


@pytest.fixture
def a(server):
    return Client(server.url, "tok-a")


def snapshot(store: TieredStore) -> tuple:
    """What is stored: entries per tier and the disk tier's files."""
    disk = store.tiers[1]
    return tuple(t.usage().entries for t in store.tiers), sorted(p.name for p in disk.records_dir.rglob("*") if p.is_file())


# -- round trips ----------------------------------------------------------------------------------------


def test_record_round_trip(store, a):
    c = chunks_for(1)[0]
    path = record_path(c.key)
    assert a("HEAD", path).status == 404
    r = a("GET", path)
    assert r.status == 404 and error_of(r) == "no such record"
    assert a("PUT", path, record(c)).status == 201
    assert a("PUT", path, record(c, "raw")).status == 200  # already present
    assert a("HEAD", path).status == 200
    r = a("GET", path)
    assert r.status == 200 and r.headers["Content-Type"] == "application/octet-stream"
    got = decode_record(r.data)
    assert got.key == c.key and torch.equal(got.kv, c.kv) and np.array_equal(got.tokens, c.tokens)
    assert store.tiers[1].contains([c.key]) == [True]  # acknowledged means on disk
    r = a("DELETE", path)
    assert r.status == 200 and json.loads(r.data)["deleted"] >= 1
    assert a("HEAD", path).status == 404 and a("DELETE", path).status == 404
    assert store.contains([c.key]) == [False]


def test_lookup_by_tokens_and_by_chunk_hashes(store, a):
    cs = chunks_for(4)
    store.put(cs[:3])
    tokens = list(range(4 * CT))
    r = a("POST", "/v1/lookup", json_body={"namespace": "a", "model": "m", "tokens": tokens})
    assert r.status == 200 and json.loads(r.data) == {"tokens": 3 * CT, "chunk_tokens": CT}
    hashes = [c.key.chunk_hash.hex() for c in cs]
    r = a("POST", "/v1/lookup", json_body={"namespace": "a", "model": "m", "chunk_hashes": [hashes[0], hashes[3], hashes[1]]})
    assert json.loads(r.data) == {"chunks": 1}  # prefix semantics: stops at the first miss
    r = a("POST", "/v1/lookup", json_body={"namespace": "a", "model": "other", "tokens": tokens})
    assert json.loads(r.data)["tokens"] == 0


def test_batch_put_get_contains_delete(store, a):
    cs = chunks_for(5, seed=1)
    r = a("POST", "/v1/records:batch_put", frames([record(c) for c in cs[:4]]))
    assert r.status == 200 and json.loads(r.data) == {"results": ["created"] * 4, "durability": "process-crash"}
    r = a("POST", "/v1/records:batch_put", frames([record(cs[0]), record(cs[4], "raw")]))
    assert json.loads(r.data)["results"] == ["present", "created"]
    assert store.tiers[1].contains([c.key for c in cs]) == [True] * 5
    missing = chunks_for(1, seed=9)[0].key
    keys = [cs[2].key, missing, cs[0].key]
    r = a("POST", "/v1/records:batch_get", json_body=[key_to_json(k) for k in keys])
    assert r.status == 200 and r.headers["X-Record-Count"] == "3"
    got = read_frames(r.data)
    assert got[1] is None and len(got) == 3
    for data, c in ((got[0], cs[2]), (got[2], cs[0])):
        d = decode_record(data)
        assert d.key == c.key and torch.equal(d.kv, c.kv)
    r = a("POST", "/v1/records:batch_contains", json_body={"keys": [key_to_json(k) for k in keys]})
    assert json.loads(r.data) == {"present": [True, False, True]}
    r = a("POST", "/v1/records:batch_get", json_body=[])
    assert r.status == 200 and r.data == b""
    r = a("POST", "/v1/records:batch_delete", json_body=[key_to_json(k) for k in keys])
    assert r.status == 200 and json.loads(r.data)["deleted"] == 2
    assert store.contains([c.key for c in cs]) == [False, True, False, True, True]
    r = a("DELETE", "/v1/namespaces/a")
    assert r.status == 200 and json.loads(r.data)["removed"] >= 3
    assert store.contains([c.key for c in cs]) == [False] * 5


# -- tenants and tokens ---------------------------------------------------------------------------------


def test_tenants_are_kept_apart(store, server, a):
    b = Client(server.url, "tok-b")
    mine, theirs = chunks_for(1, seed=2, namespace="a")[0], chunks_for(1, seed=3, namespace="b")[0]
    assert a("PUT", record_path(mine.key), record(mine)).status == 201
    assert b("PUT", record_path(theirs.key), record(theirs)).status == 201
    path = record_path(theirs.key)
    for method, body in (("GET", None), ("HEAD", None), ("DELETE", None), ("PUT", record(theirs))):
        r = a(method, path, body)
        assert r.status == 403, method
        if method != "HEAD":
            assert "namespace 'b'" in error_of(r)
    keys = [key_to_json(theirs.key)]
    for endpoint in ("batch_get", "batch_contains", "batch_delete"):
        assert a("POST", f"/v1/records:{endpoint}", json_body=keys).status == 403, endpoint
    r = a("POST", "/v1/records:batch_put", frames([record(chunks_for(1, seed=4, namespace="b")[0])]))
    assert r.status == 403 and "nothing was stored" in error_of(r)
    assert a("POST", "/v1/lookup", json_body={"namespace": "b", "model": "m", "tokens": [1]}).status == 403
    assert a("DELETE", "/v1/namespaces/b").status == 403
    assert store.contains([theirs.key]) == [True]  # nothing tenant A did touched it
    assert b("GET", path).status == 200
    admin = Client(server.url, "tok-admin")
    assert admin("GET", path).status == 200 and admin("GET", record_path(mine.key)).status == 200


def test_missing_or_wrong_token_is_401(server, a):
    c = chunks_for(1)[0]
    for token in (None, "nope"):
        for method, path in (("GET", record_path(c.key)), ("POST", "/v1/lookup"), ("GET", "/metrics"), ("GET", "/nowhere")):
            r = a(method, path, token=token)
            assert r.status == 401, (token, path)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "token" in error_of(r)
    r = a("GET", "/metrics", headers={"Authorization": "Basic dG9rLWE6"}, token=None)
    assert r.status == 401
    # An expired token is refused with a message that says so; one that expires later works.
    r = a("GET", record_path(c.key), token="tok-old")
    assert r.status == 401 and "expired" in error_of(r)
    assert a("GET", record_path(c.key), token="tok-dated").status == 404
    # Public endpoints need no token.
    h = a("GET", "/healthz", token=None)
    assert h.status == 200 and json.loads(h.data) == {"status": "ok", "chunk_tokens": CT, "durability": "process-crash"}
    assert json.loads(a("GET", "/openapi.json", token=None).data)["openapi"].startswith("3.")


def test_metrics(store, server, a):
    c = chunks_for(1)[0]
    a("PUT", record_path(c.key), record(c))
    a("GET", record_path(c.key))
    a("GET", "/v1/records/a/m/zz")
    r = Client(server.url, "tok-b")("GET", "/metrics")  # any valid token
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.data.decode()
    assert 'kvstore_http_requests_total{endpoint="/v1/records/{namespace}/{model}/{chunk_hash}",method="PUT",status="201"} 1.0' in text
    assert 'status="400"' in text
    assert 'kvstore_http_request_seconds_count{endpoint="/v1/records/{namespace}/{model}/{chunk_hash}"}' in text
    assert 'kvstore_tier_hits_total{tier="cpu"} 1.0' in text
    assert 'kvstore_tier_entries{tier="disk"} 1.0' in text
    assert "kvstore_store_async_writes_total" in text
    missing_codebooks.count("metrics-test-model", 3)
    text = Client(server.url, "tok-b")("GET", "/metrics").data.decode()
    assert 'kvstore_codec_chunks_without_codebook_total{model="metrics-test-model"} 3.0' in text


def test_openapi_describes_every_route(server, a):
    spec = json.loads(a("GET", "/openapi.json").data)
    app = make_app(make_store_for_routes(), LIMITS, None)
    for route in app.router.routes():
        path = route.resource.canonical
        if path == "/v1/records/{tail}":
            continue  # the catch-all that answers 400 for malformed record paths
        assert path in spec["paths"], path
        assert route.method.lower() in spec["paths"][path], (route.method, path)


def make_store_for_routes():
    return TieredStore([RecordMemoryTier(1 << 16)], chunk_tokens=CT)


# -- limits and malformed input -------------------------------------------------------------------------


def test_limits(store, a):
    before = snapshot(store)
    big = chunks_for(1, seed=5)[0]
    big = Chunk(big.key, torch.randn(80, 2, CT, 2, 8).to(torch.float16), big.tokens)  # 80 KiB raw
    r = a("PUT", record_path(big.key), record(big, "raw"))
    assert r.status == 413 and "limit" in error_of(r)
    r = a("POST", "/v1/records:batch_put", frames([record(big, "raw")]))
    assert r.status == 413 and "over the limit" in error_of(r)
    cs = chunks_for(9, seed=6)
    r = a("POST", "/v1/records:batch_get", json_body=[key_to_json(c.key) for c in cs])
    assert r.status == 413 and "9 keys" in error_of(r)
    r = a("POST", "/v1/records:batch_put", frames([record(c) for c in cs]))
    assert r.status == 413 and "more than 8 records" in error_of(r)
    r = a("POST", "/v1/lookup", json_body={"namespace": "a", "model": "m", "chunk_hashes": ["0" * 32] * 9})
    assert r.status == 413
    r = a("POST", "/v1/lookup", json_body={"namespace": "a", "model": "m", "tokens": [1] * 40_000})
    assert r.status == 413
    # The 8 records before the 9th were valid and are kept; nothing else changed.
    assert store.contains([c.key for c in cs]) == [True] * 8 + [False]
    store.delete([c.key for c in cs])
    assert snapshot(store) == before


def test_request_timeout_is_503(store, a, monkeypatch):
    c = chunks_for(1)[0]
    monkeypatch.setattr(store, "contains", lambda keys, *_: time.sleep(0.6) or [False] * len(keys))
    svc_limits = ServerConfig(max_body_bytes=64 << 10, max_batch_keys=8, request_timeout_s=0.2)
    with_timeout = ServiceThread(lambda: make_app(store, svc_limits, TokenTable(TOKENS))).start()
    try:
        r = Client(with_timeout.url, "tok-a")("POST", "/v1/records:batch_contains", json_body=[key_to_json(c.key)])
        assert r.status == 503 and "0.2 s" in error_of(r)
    finally:
        with_timeout.stop()


BAD_PATHS = [
    "/v1/records/a/m/" + "0" * 31,  # short hash
    "/v1/records/a/m/" + "A" * 32,  # uppercase hex
    "/v1/records/a/m/" + "g" * 32,
    "/v1/records/a/m/" + "0" * 32 + "/x",
    "/v1/records/..%2Fb/m/" + "0" * 32,
    "/v1/records/%2e%2e/m/" + "0" * 32,
    "/v1/records/.hidden/m/" + "0" * 32,
    "/v1/records/a/..%2F..%2Fetc/" + "0" * 32,
    "/v1/records/a/%2E%2E/" + "0" * 32,
    "/v1/records/a/../b/m/" + "0" * 32,
    "/v1/records/a/m/../../b/m/" + "0" * 32,
    "/v1/records/a//" + "0" * 32,
    "/v1/records/a/m%00x/" + "0" * 32,
    "/v1/records/" + "n" * 65 + "/m/" + "0" * 32,
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_malformed_paths_are_400_and_change_nothing(store, a, path):
    c = chunks_for(1, seed=7)[0]
    before = snapshot(store)
    for method, body in (("PUT", record(c)), ("GET", None), ("DELETE", None)):
        r = a(method, path, body)
        assert r.status == 400, (method, path, r.data[:200])
        assert error_of(r)
    assert snapshot(store) == before


def test_bad_json_bodies_are_400(a):
    cases = [
        b"not json", b"[1, 2", json.dumps({"namespace": "a", "model": "m"}).encode(),
        json.dumps({"namespace": "a", "model": "m", "tokens": [1], "chunk_hashes": []}).encode(),
        json.dumps({"namespace": "a", "model": "m", "tokens": [1.5]}).encode(),
        json.dumps({"namespace": "a", "model": "m", "tokens": [-1]}).encode(),
        json.dumps({"namespace": "a", "model": "m", "tokens": [2**40]}).encode(),
        json.dumps({"namespace": "a", "model": "m", "tokens": [[1], [2, 3]]}).encode(),
        json.dumps({"namespace": "a", "model": "m", "tokens": "123"}).encode(),
        json.dumps({"namespace": "../a", "model": "m", "tokens": [1]}).encode(),
        json.dumps({"namespace": "a", "model": "", "tokens": [1]}).encode(),
        json.dumps({"namespace": "a", "model": "m", "tokens": [1], "extra": 1}).encode(),
        json.dumps({"namespace": "a", "model": "m", "chunk_hashes": ["xyz"]}).encode(),
        json.dumps(["a"]).encode(),
    ]
    for body in cases:
        r = a("POST", "/v1/lookup", body)
        assert r.status == 400, body
        assert error_of(r)
    for body in ([{"namespace": "a"}], [{"namespace": "a", "model": "m", "chunk_hash": "00"}], {"keys": 3}, "x", [1]):
        r = a("POST", "/v1/records:batch_get", json_body=body)
        assert r.status == 400, body


def test_garbage_records_are_400_and_change_nothing(store, a):
    c, other = chunks_for(2, seed=8)
    good = record(c)
    flipped = bytearray(good)
    flipped[-5] ^= 0x10
    header_flip = bytearray(good)
    header_flip[20] ^= 0x01
    bodies = {
        "junk": b"definitely not a record",
        "magic only": b"KVSR" + bytes(200),
        "truncated": good[:-7],
        "payload bit flip": bytes(flipped),
        "header bit flip": bytes(header_flip),
        "trailing bytes": good + b"x",
        "another key's record": record(other),
        "empty": b"",
    }
    before = snapshot(store)
    for name, body in bodies.items():
        r = a("PUT", record_path(c.key), body)
        assert r.status == 400, name
        assert error_of(r), name
    for name, body in bodies.items():
        if not body or name == "another key's record":  # a batch names no key: that record is valid there
            continue
        r = a("POST", "/v1/records:batch_put", frames([body]))
        assert r.status == 400 and "record 0" in error_of(r), name
    r = a("POST", "/v1/records:batch_put", FRAME.pack(100) + b"short")
    assert r.status == 400 and "truncated" in error_of(r)
    r = a("POST", "/v1/records:batch_put", b"\x01\x02")
    assert r.status == 400 and "length prefix" in error_of(r)
    r = a("POST", "/v1/records:batch_put", FRAME.pack(0))
    assert r.status == 400 and "empty" in error_of(r)
    assert snapshot(store) == before
    assert store.contains([c.key, other.key]) == [False, False]


# -- the HTTP tier --------------------------------------------------------------------------------------


def client_store(url: str, token: str = "tok-a", **kw) -> TieredStore:
    remote = SidecarTier(url, token, make_codec("zstd"), timeout=0.5, retry_after=0.5, **kw)
    return TieredStore([MemoryTier(64 * 2048), remote], chunk_tokens=CT)


def test_http_tier_round_trip_through_a_store(store, server):
    engine = client_store(server.url, max_batch_keys=3)  # several requests per batch
    remote = engine.tiers[1]
    cs = chunks_for(7, seed=11)
    assert engine.put(cs) == [True] * 7
    assert engine.flush(10)
    assert store.tiers[1].contains([c.key for c in cs]) == [True] * 7  # durable on the sidecar's disk
    assert remote.contains([c.key for c in cs] + [chunks_for(1, seed=99)[0].key]) == [True] * 7 + [False]
    engine.tiers[0].clear()
    tokens = np.arange(7 * CT) + 11 * 1_000_000
    assert engine.lookup(tokens, fingerprint="m", namespace="a") == 7 * CT
    refs = engine.chunk_refs(tokens, fingerprint="m", namespace="a")
    out = [torch.empty(SHAPE, dtype=torch.float16) for _ in refs]
    got = engine.get(refs, out)
    assert all(g is not None and g.kv is o and torch.equal(o, c.kv) for g, o, c in zip(got, out, cs))
    assert remote.stats.hits == 7 and remote.stats.errors == 0
    assert engine.tiers[0].contains([c.key for c in cs]) == [True] * 7  # promoted
    assert remote.delete([cs[0].key]) == 1 and remote.contains([cs[0].key]) == [False]
    assert remote.clear("a") >= 6 and store.contains([c.key for c in cs]) == [False] * 7
    engine.close()


def test_http_tier_with_a_rejected_token_degrades(server):
    engine = client_store(server.url, token="wrong")
    cs = chunks_for(2, seed=12)
    assert engine.put(cs) == [True, True]  # the local tier has them
    assert engine.flush(10)
    remote = engine.tiers[1]
    assert remote.stats.errors >= 1 and not remote.available()
    assert remote.get([c.key for c in cs]) == [None, None]
    engine.close()


def test_sidecar_stopped_costs_bounded_misses_then_recovers(store, server):
    engine = client_store(server.url)
    remote = engine.tiers[1]
    cs = chunks_for(3, seed=13)
    engine.put(cs)
    assert engine.flush(10)
    server.stop()
    engine.tiers[0].clear()
    t = time.monotonic()
    tokens = np.arange(3 * CT) + 13 * 1_000_000
    assert engine.lookup(tokens, fingerprint="m", namespace="a") == 0
    assert engine.get([c.key for c in cs]) == [None] * 3
    more = chunks_for(2, seed=14)
    assert engine.put(more) == [True, True]
    assert engine.flush(10)
    assert time.monotonic() - t < 3
    assert remote.stats.errors >= 1
    server.start()  # same port, same store behind it
    time.sleep(0.6)  # retry_after
    got = engine.get([c.key for c in cs])
    assert all(g is not None and torch.equal(g.kv, c.kv) for g, c in zip(got, cs))
    again = chunks_for(2, seed=15)
    engine.put(again)
    assert engine.flush(10)
    assert store.contains([c.key for c in again]) == [True, True]
    engine.close()


# -- the real process -----------------------------------------------------------------------------------


def test_acknowledged_puts_survive_sigkill(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    sets = {"chunk_tokens": str(CT), "memory.capacity": "1MiB", "disk.path": str(tmp_path / "disk"),
            "server.tokens_file": str(tokens)}
    proc = ServeProcess(sets).start()
    try:
        a = Client(proc.url, "tok-a")
        cs = chunks_for(12, seed=20)
        for c in cs[:4]:
            assert a("PUT", record_path(c.key), record(c)).status == 201
        r = a("POST", "/v1/records:batch_put", frames([record(c) for c in cs[4:]]))
        assert r.status == 200 and json.loads(r.data)["results"] == ["created"] * 8
        proc.kill()
        proc.start()
        r = a("POST", "/v1/records:batch_get", json_body=[key_to_json(c.key) for c in cs])
        got = read_frames(r.data)
        assert len(got) == 12 and all(g is not None for g in got)
        assert all(torch.equal(decode_record(g).kv, c.kv) for g, c in zip(got, cs))
    finally:
        proc.kill()


def test_puts_acknowledged_under_load_survive_a_sigkill(tmp_path):
    """8 clients put records as fast as they can; the server is SIGKILLed mid-stream. Every put it had
    acknowledged (as surviving a process crash, the default durability) is back, byte for byte, after a
    restart; the puts cut off are simply absent or whole."""
    import threading

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    sets = {"chunk_tokens": str(CT), "memory.capacity": "4MiB", "disk.path": str(tmp_path / "disk"),
            "server.tokens_file": str(tokens)}
    proc = ServeProcess(sets).start()
    acked: dict[str, bytes] = {}
    stop = threading.Event()

    def client(cid: int) -> None:
        c = Client(proc.url, "tok-a")
        for i in range(500):  # seeds stay below 4294: token ids are seed * 10**6 + ...
            if stop.is_set():
                return
            chunk = chunks_for(1, seed=100 + 500 * cid + i)[0]
            body = record(chunk, "raw")
            try:
                r = c("PUT", record_path(chunk.key), body)
            except urllib3.exceptions.HTTPError:
                return
            if r.status == 201:
                assert json.loads(r.data)["durability"] == "process-crash"
                acked[record_path(chunk.key)] = body

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        proc.kill()  # SIGKILL
        stop.set()
        for t in threads:
            t.join(30)
        assert len(acked) > 20
        proc.start()
        c = Client(proc.url, "tok-a")
        lost = [path for path, body in acked.items() if c("GET", path).data != body]
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged puts lost"
    finally:
        stop.set()
        proc.kill()


def test_serve_refuses_to_start_without_auth(tmp_path, capsys):
    base = ["--set", f"disk.path={tmp_path / 'disk'}", "serve"]
    assert cli_main(base) == 2
    assert "tokens_file" in capsys.readouterr().err
    assert cli_main(base + ["--insecure-no-auth", "--host", "0.0.0.0"]) == 2
    assert "loopback only" in capsys.readouterr().err
    bad = tmp_path / "tokens.toml"
    bad.write_text('[tokens]\n"t" = ["../x"]\n')
    assert cli_main(["--set", f"server.tokens_file={bad}", *base]) == 2
    assert "namespace" in capsys.readouterr().err


def test_insecure_no_auth_allows_everything(store):
    svc = ServiceThread(lambda: make_app(store, LIMITS, None)).start()
    try:
        c = chunks_for(1, namespace="anyone")[0]
        client = Client(svc.url, None)
        assert client("PUT", record_path(c.key), record(c)).status == 201
        assert client("GET", "/metrics").status == 200
    finally:
        svc.stop()


def test_tokens_file_expiry_formats(tmp_path):
    from datetime import datetime, timezone

    from kvstore.errors import ConfigError
    from kvstore.service import TokenTable

    f = tmp_path / "tokens.toml"
    f.write_text('[tokens]\n"t1" = { namespaces = ["a"], expires = 2020-01-01T00:00:00Z }\n'
                 '"t2" = { namespaces = ["b"], expires = 2999-01-01T00:00:00 }\n"t3" = ["c"]\n')
    table = TokenTable.load(f)
    now = datetime.now(timezone.utc)
    assert table.grant("t1").expired(now) and not table.grant("t2").expired(now) and not table.grant("t3").expired(now)
    assert table.grant("t2").expires.tzinfo is not None  # a time without offset is taken as UTC
    f.write_text('[tokens]\n"t1" = { namespaces = ["a"], expires = "next week" }\n')
    with pytest.raises(ConfigError, match="RFC 3339"):
        TokenTable.load(f)
    f.write_text('[tokens]\n"t1" = { namespace = ["a"] }\n')
    with pytest.raises(ConfigError, match="namespaces"):
        TokenTable.load(f)
