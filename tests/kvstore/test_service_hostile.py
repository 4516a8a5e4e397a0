"""`kvstore serve` as a hostile client and a full disk find it, one test per defect of issue 15 (each
failed on the server before the record-server redesign): puts acknowledged but not stored (D1), 500s and
tracebacks on bad input (D2), memory amplification (D3), connection exhaustion (D4), a token echoed from a
malformed header (D8), and wrong statuses for methods on record paths. Real `kvstore serve` processes on
loopback; the server's log is read back after a clean stop."""

from __future__ import annotations

import json
import resource
import socket
import time
from pathlib import Path

import numpy as np
import torch
import urllib3
import zstandard

from codec import make_codec
from kvstore.chunk import Chunk
from kvstore.keys import chunk_refs
from kvstore.record import encode_header, encode_record, payload_checksum
from kvstore.wire import FRAME, key_to_json, record_path
from benchmarks.servers import ServeProcess

CT = 16
TOKENS = {"tok-a": ["a"]}


def chunk(i: int, shape=(4, 2, CT, 16, 64), namespace: str = "a") -> Chunk:
    ref = chunk_refs(np.arange(CT) + 1000 * i, namespace=namespace, fingerprint="m", chunk_tokens=CT)[0]
    return Chunk.from_ref(ref, torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(torch.float16))


def record(c: Chunk, codec: str = "raw") -> bytes:
    header, payload = encode_record(c, make_codec(codec))
    return header + bytes(payload)


def start(tmp_path: Path, **sets: str) -> ServeProcess:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    base = {"chunk_tokens": str(CT), "disk.path": str(tmp_path / "disk"), "server.tokens_file": str(tokens)}
    return ServeProcess({**base, **{k.replace("__", "."): v for k, v in sets.items()}}).start()


def stop_and_log(proc: ServeProcess) -> str:
    """Stop the server cleanly (SIGTERM) and return what it logged."""
    proc.proc.terminate()
    err = proc.proc.stderr.read().decode(errors="replace")
    proc.proc.wait(30)
    proc.kill()
    return err


def http(proc: ServeProcess, method: str, path: str, body=None, headers=None, token: str | None = "tok-a"):
    h = {"Authorization": f"Bearer {token}"} if token else {}
    return urllib3.connection_from_url(proc.url, retries=False, timeout=30).urlopen(method, path, body=body, headers={**h, **(headers or {})})


def raw_request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as it is on a fresh connection; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            more = s.recv(65536)
            if not more:
                break
            answer += more
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            more = s.recv(65536)
            if not more:
                break
            body += more
        return int(lines[0].split()[1]), headers, body


def rss_peak_kib(proc: ServeProcess) -> int:
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


# -- D1: acknowledged means stored -------------------------------------------------------------------


def test_full_disk_puts_are_507_and_every_acknowledged_put_survives_a_restart(tmp_path):
    from tests.support.fs import tiny_fs

    with tiny_fs(tmp_path / "fs", "2m") as fs:
        proc = start(tmp_path, disk__path=str(fs / "store"), memory__capacity="8MiB")
        try:
            cs = [chunk(i) for i in range(24)]  # 24 records of 128 KiB on a 2 MiB filesystem
            statuses = [http(proc, "PUT", record_path(c.key), record(c)).status for c in cs]
            assert set(statuses) <= {201, 507} and 201 in statuses and 507 in statuses, statuses
            r = http(proc, "PUT", record_path(cs[0].key), record(cs[0]))
            assert r.status == 200  # present: acknowledged before
            metrics = http(proc, "GET", "/metrics").data.decode()
            assert 'status="507"' in metrics and "kvstore_store_refused_puts_total" in metrics
            log = stop_and_log(proc)
            assert "No space left on device" in log and "did not store" in log  # logged at the default level
            proc.start()
            for c, status in zip(cs, statuses):
                r = http(proc, "GET", record_path(c.key))
                if status == 201:
                    assert r.status == 200 and r.data == record(c), f"acknowledged record {c.key} lost"
                else:
                    assert r.status == 404
        finally:
            proc.kill()


def test_a_record_larger_than_the_disk_tier_is_507_not_201(tmp_path):
    proc = start(tmp_path, disk__capacity="64KiB", memory__capacity="8MiB")
    try:
        c = chunk(1)  # 128 KiB
        r = http(proc, "PUT", record_path(c.key), record(c))
        assert r.status == 507 and "durable" in json.loads(r.data)["error"]
        assert http(proc, "GET", record_path(c.key)).status == 404
        r = http(proc, "POST", "/v1/records:batch_put", FRAME.pack(len(record(c))) + record(c))
        assert r.status == 507 and json.loads(r.data)["results"] == ["rejected"]
    finally:
        proc.kill()


# -- D2, D8 and methods: bad input is a JSON 4xx, never a 500, a traceback or a token in the log -----


def test_bad_input_is_a_json_4xx_and_logs_no_traceback(tmp_path):
    proc = start(tmp_path)
    try:
        # A bearer token that is not UTF-8 (no valid token needed).
        status, headers, body = raw_request(proc.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xfd\r\n\r\n")
        assert status == 401 and headers["content-type"].startswith("application/json") and json.loads(body)["error"]
        # JSON nested 5,000 deep.
        r = http(proc, "POST", "/v1/records:batch_get", b"[" * 5000 + b"]" * 5000)
        assert r.status == 400 and "nested" in json.loads(r.data)["error"]
        r = http(proc, "POST", "/v1/lookup", b'{"namespace": ' * 5000)
        assert r.status == 400
        # Content-Encoding: gzip with a body that is not gzip.
        r = http(proc, "POST", "/v1/lookup", b"not gzip at all", headers={"Content-Encoding": "gzip"})
        assert r.status == 415 and json.loads(r.data)["error"]
        assert http(proc, "GET", "/healthz", token=None).status == 200
    finally:
        log = stop_and_log(proc)
    assert "Traceback" not in log, log[-3000:]


def test_a_malformed_header_is_a_json_400_that_never_quotes_the_token(tmp_path):
    proc = start(tmp_path)
    try:
        # A stray control byte after a valid token: a 400 that quotes neither the header nor the token.
        status, headers, body = raw_request(proc.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-a\x01\r\n\r\n")
        assert status == 400 and headers["content-type"].startswith("application/json")
        assert b"tok-a" not in body and json.loads(body)["error"]
        status, headers, body = raw_request(proc.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad\x00Header: tok-a\r\n\r\n")
        assert status == 400 and headers["content-type"].startswith("application/json") and b"tok-a" not in body
    finally:
        log = stop_and_log(proc)
    assert "tok-a" not in log and "Traceback" not in log, log[-3000:]


def test_methods_a_record_path_does_not_take_are_405(tmp_path):
    proc = start(tmp_path)
    try:
        c = chunk(2)
        for method in ("POST", "PATCH", "OPTIONS"):
            r = http(proc, method, record_path(c.key), b"x")
            assert r.status == 405 and "PUT" in r.headers["Allow"] and json.loads(r.data)["error"], method
        r = http(proc, "POST", "/v1/records/a/m/zz/extra", b"x")
        assert r.status == 405
        assert http(proc, "GET", "/v1/records/a/m/zz").status == 400
    finally:
        proc.kill()


# -- D3: no memory amplification --------------------------------------------------------------------


def bomb(c: Chunk, shape) -> bytes:
    """A zstd record that declares (and really decodes to) `shape` of zeros, in a few KiB."""
    kv = torch.zeros(1, dtype=torch.float16).expand(shape)  # no memory behind it
    big = Chunk(c.key, kv, c.tokens)
    n = kv.numel() * 2
    z = zstandard.ZstdCompressor(level=3, write_content_size=True).compressobj(size=n)
    payload = b"".join(z.compress(bytes(1 << 20)) for _ in range(n >> 20)) + z.flush()
    codec = make_codec("zstd")
    header = encode_header(big, codec, len(payload), payload_checksum(payload))
    return header + payload


def test_records_that_decode_past_the_limit_and_repeated_keys_cost_no_memory(tmp_path):
    proc = start(tmp_path, server__max_body_bytes="16MiB", memory__capacity="64MiB")
    try:
        c = chunk(3)
        data = bomb(c, (4, 2, CT, 2048, 64))  # 32 MiB of KV in a few KiB: over the 16 MiB limit
        assert len(data) < 64 << 10
        before = rss_peak_kib(proc)
        r = http(proc, "PUT", record_path(c.key), data)
        assert r.status == 413 and "decodes to" in json.loads(r.data)["error"]
        assert http(proc, "HEAD", record_path(c.key)).status == 404
        assert rss_peak_kib(proc) - before < 16 << 10  # nothing decoded
        # One 8 MiB record asked for 16 times in one batch: served from the one stored copy.
        big = chunk(4, shape=(4, 2, CT, 512, 64))
        body = record(big)
        assert http(proc, "PUT", record_path(big.key), body).status == 201
        before = rss_peak_kib(proc)
        r = http(proc, "POST", "/v1/records:batch_get", json.dumps([key_to_json(big.key)] * 16).encode())
        assert r.status == 200 and r.data == (FRAME.pack(len(body)) + body) * 16
        assert rss_peak_kib(proc) - before < 3 * len(body) >> 10
        # A 64 MiB JSON list: refused before it is read (or parsed on the event loop).
        key = json.dumps(key_to_json(big.key)).encode()
        huge = b"[" + b",".join([key] * ((64 << 20) // len(key))) + b"]"
        before = rss_peak_kib(proc)
        r = http(proc, "POST", "/v1/records:batch_contains", huge)
        assert r.status == 413
        assert rss_peak_kib(proc) - before < 32 << 10
        assert http(proc, "GET", "/healthz", token=None).status == 200
    finally:
        proc.kill()


# -- D4: connections ----------------------------------------------------------------------------------


def test_idle_sockets_under_a_small_file_limit_leave_the_service_responsive(tmp_path):
    proc = start(tmp_path)
    idle: list[socket.socket] = []
    try:
        resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE, (128, 128))  # ulimit -n 128
        for _ in range(140):
            try:
                idle.append(socket.create_connection(("127.0.0.1", proc.port), timeout=5))
            except OSError:
                break
        time.sleep(1.5)
        for _ in range(5):
            r = urllib3.PoolManager(retries=urllib3.Retry(3, backoff_factor=0.2), timeout=10).request("GET", f"{proc.url}/healthz")
            assert r.status == 200
    finally:
        for s in idle:
            s.close()
        log = stop_and_log(proc)
    assert "Traceback" not in log and len(log.splitlines()) < 20, log[-3000:]


def test_idle_and_half_sent_requests_are_closed_after_the_idle_timeout(tmp_path):
    proc = start(tmp_path, server__idle_timeout_s="1")
    try:
        half = socket.create_connection(("127.0.0.1", proc.port), timeout=20)
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthoriz")
        quiet = socket.create_connection(("127.0.0.1", proc.port), timeout=20)
        t = time.monotonic()
        assert half.recv(1024) == b"" and quiet.recv(1024) == b""  # closed by the server, not by the timeout
        assert time.monotonic() - t < 15
        half.close()
        quiet.close()
    finally:
        proc.kill()


def test_a_flood_of_connections_gets_503s_not_silence(tmp_path):
    proc = start(tmp_path, server__max_connections="4")
    socks = []
    try:
        socks = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(4)]
        status, headers, body = raw_request(proc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and "connections" in json.loads(body)["error"]  # none idle for a second yet
        time.sleep(1.5)
        status, _, _ = raw_request(proc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200  # the connection idle longest made room
    finally:
        for s in socks:
            s.close()
        proc.kill()
