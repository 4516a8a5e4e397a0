"""End to end on a real vLLM (CPU backend) with SmolLM2-135M-Instruct: kvstore as vLLM's KV cache.

Five engine starts in all (each ~1 minute on 2 cores), shared by the scenarios:
1. no connector: the reference greedy outputs of every prompt;
2. embedded store (memory + disk) with Redis as a second persistent tier: every prompt computed once and
   saved; a prompt sharing a prefix with an earlier one loads that prefix;
3. the same store after a restart: a long prompt loads from disk, a prompt whose disk records were
   deleted loads from Redis, a prompt with a corrupted disk record recomputes it (the load error is
   reported to vLLM), and with Redis killed a prompt stored only there is recomputed;
4. + 5. two engines, two processes, sharing one sidecar (`kvstore serve`): the second engine's first
   request loads what the first saved.
Every engine runs chunked prefill (`max_num_batched_tokens=512`, prompts of 700-1,300 tokens) with
vLLM's prefix cache off, so `num_cached_tokens` counts the connector's hits alone. Every output must
equal the reference token for token.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from tests.support.engines import require_vllm

require_vllm()

from benchmarks.servers import RedisServer, ServeProcess  # noqa: E402
from benchmarks.texts import evaluation_text  # noqa: E402
from codec import make_codec  # noqa: E402
from connectors.vllm.driver import Engine  # noqa: E402
from kvstore.keys import chunk_refs  # noqa: E402
from kvstore.record import PRELUDE, header_length, parse_header  # noqa: E402
from kvstore.tiers import DiskTier, RedisTier  # noqa: E402

pytestmark = pytest.mark.slow

C = 256
MAX_TOKENS = 8
ENGINE = {"max_num_batched_tokens": 512}


@pytest.fixture(scope="module")
def model():
    from connectors.models import model_path

    return str(model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def prompts(model):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(evaluation_text())["input_ids"]
    return {
        "long": ids[:1300],  # five full chunks: 1,280 tokens to load, 20 to compute
        "shared": ids[:700] + ids[3000:3500],  # shares two full chunks (512 tokens) with "long"
        "redis": ids[1300:2200],  # three chunks, deleted from disk before the restart: Redis serves them
        "corrupt": ids[2200:3000],  # three chunks, the second one's disk record corrupted
        "dead": ids[3500:4200],  # two chunks, only in Redis, which is killed before asking
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-e2e")


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(2) as p:
        yield p


def _reference(model, prompts, workdir):
    with Engine(model, log_path=workdir / "reference.log", **ENGINE) as e:
        return {name: r.tokens for name, r in zip(prompts, e.generate(list(prompts.values()), MAX_TOKENS))}


@pytest.fixture(scope="module")
def reference_job(pool, model, prompts, workdir):
    return pool.submit(_reference, model, prompts, workdir)  # runs beside the first connector engine


@pytest.fixture(scope="module")
def reference(reference_job):
    return reference_job.result()


@pytest.fixture(scope="module")
def redis_server(workdir):
    server = RedisServer(workdir / "redis").start()
    yield server
    server.kill()


def embedded(workdir, redis_url):
    return {"set": {"disk.path": str(workdir / "kv"), "memory.capacity": "256MiB", "redis.url": redis_url}}


def run(engine, prompts, names, flush=True):
    out = {}
    for name in names:
        out[name] = engine.generate([prompts[name]], MAX_TOKENS)[0]
        if flush:
            assert engine.flush()  # saves in every tier before the next lookup (they are asynchronous)
    return out


@pytest.fixture(scope="module")
def first_run(model, prompts, workdir, redis_server, reference_job):
    with Engine(model, connector=embedded(workdir, redis_server.url), log_path=workdir / "first.log", **ENGINE) as e:
        results = run(e, prompts, ["long", "shared", "redis", "corrupt", "dead"])
        return results, e.metrics()


def disk_refs(workdir, tokens):
    """The refs of `tokens` under the fingerprint the connector wrote with (read from a stored record)."""
    record = next((workdir / "kv" / "records").rglob("*.kvr"))
    with open(record, "rb") as f:
        prelude = f.read(PRELUDE.size)
        header = parse_header(prelude + f.read(header_length(prelude) - PRELUDE.size))
    return chunk_refs(tokens, namespace=header.key.namespace, fingerprint=header.key.fingerprint, chunk_tokens=C)


@pytest.fixture(scope="module")
def second_run(model, prompts, workdir, redis_server, first_run):
    disk = DiskTier(workdir / "kv", 1 << 40, make_codec("raw"))
    gone = [r.key for name in ("redis", "dead") for r in disk_refs(workdir, prompts[name])]
    assert disk.delete(gone) == len(gone)
    corrupt_refs = disk_refs(workdir, prompts["corrupt"])
    redis = RedisTier(redis_server.url, make_codec("raw"))
    assert redis.delete([r.key for r in corrupt_refs]) == 3  # so that no other tier can stand in for the bad record
    redis.close()
    corrupt = corrupt_refs[1].key.hex()
    (path,) = (workdir / "kv" / "records").rglob(f"{corrupt}.kvr")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a payload byte: the checksum catches it at load time, the lookup does not
    path.write_bytes(bytes(data))
    disk.close()
    with Engine(model, connector=embedded(workdir, redis_server.url), log_path=workdir / "second.log", **ENGINE) as e:
        results = run(e, prompts, ["long", "shared", "redis", "corrupt"], flush=False)
        redis_server.kill()  # a tier dies mid-run
        results.update(run(e, prompts, ["dead", "long"], flush=False))
        metrics = e.metrics()
    # The engine's shutdown flushed its saves: the chunk recomputed after the failed load is stored again.
    disk = DiskTier(workdir / "kv", 1 << 40, make_codec("raw"))
    resaved = disk.contains([corrupt_refs[1].key])[0]
    disk.close()
    return results, metrics, list((workdir / "kv" / "quarantine").iterdir()), resaved


def test_first_run_computes_saves_and_reuses_a_shared_prefix(first_run, reference):
    results, metrics = first_run
    assert {n: r.tokens for n, r in results.items()} == reference
    assert {n: r.cached for n, r in results.items()} == {"long": 0, "shared": 512, "redis": 0, "corrupt": 0, "dead": 0}
    # Every full prompt chunk was saved once: 5 + 2 new ("shared" loads its first two) + 3 + 3 + 2.
    assert metrics["saved_tokens|"] == (5 + 2 + 3 + 3 + 2) * C
    assert metrics["loaded_tokens|cpu"] == 512  # the worker's memory tier served the shared prefix
    assert metrics["tier_bytes_written|redis"] > 0 and metrics["tier_bytes_written|disk"] > 0


def test_restart_loads_from_disk_and_redis_identically(reference, second_run):
    results, metrics, _, _ = second_run
    for name in ("long", "shared", "redis"):
        assert results[name].tokens == reference[name], name
    # "shared" saved its own two chunks after the shared prefix in the first run: four chunks stored now.
    assert results["long"].cached == 1280 and results["shared"].cached == 1024 and results["redis"].cached == 768
    # Disk: "long" (5 chunks), "shared" beyond the prefix "long" put in memory (2), "corrupt" up to its bad
    # record (1). Redis: "redis", whose disk records were deleted. Memory: the shared prefix, "long" again.
    loaded = {k.split("|")[1]: v for k, v in metrics.items() if k.startswith("loaded_tokens|")}
    assert loaded == {"disk": 2048, "redis": 768, "cpu": 1792}


def test_bad_record_costs_a_recompute_not_a_wrong_token(reference, second_run):
    results, metrics, quarantined, resaved = second_run
    assert results["corrupt"].tokens == reference["corrupt"]
    assert metrics["load_failures|"] == 2 and metrics["tier_corrupt|disk"] == 1  # chunks 1-2 recomputed
    assert len(quarantined) == 1 and resaved


def test_dead_tier_costs_a_recompute(reference, second_run):
    results, _, _, _ = second_run
    assert results["dead"].tokens == reference["dead"] and results["dead"].cached == 0
    assert results["long"].tokens == reference["long"] and results["long"].cached == 1280  # disk still serves


@pytest.fixture(scope="module")
def sidecar(workdir):
    tokens = workdir / "tokens.toml"
    tokens.write_text('[tokens]\n"engine-token" = ["default"]\n')
    # raw records: the sidecar re-encodes what it serves, and zstd makes a batch slower than a loaded
    # 2-core host answers within the tier's timeout (that would be a recompute, caught below).
    server = ServeProcess({"disk.path": str(workdir / "sidecar"), "disk.codec": "raw", "memory.capacity": "256MiB",
                           "server.tokens_file": str(tokens)}).start()
    yield server
    server.kill()


def test_two_engines_share_one_sidecar(model, prompts, reference, workdir, sidecar):
    conf = {"set": {"disk.enabled": "false", "memory.capacity": "256MiB", "sidecar.url": sidecar.url,
                    "sidecar.token": "engine-token", "sidecar.codec": "raw"}}
    engines = [Engine(model, connector=conf, log_path=workdir / f"sidecar{i}.log", **ENGINE) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two processes, started side by side
        list(pool.map(lambda e: e.start(), engines))
    try:
        first = run(engines[0], prompts, ["long"])["long"]
        second = run(engines[1], prompts, ["long"], flush=False)["long"]
        metrics = engines[1].metrics()
    finally:
        for e in engines:
            e.stop()
    assert first.tokens == reference["long"] and first.cached == 0
    assert second.tokens == reference["long"] and second.cached == 1280
    assert metrics.get("loaded_tokens|sidecar") == 1280 and "load_failures|" not in metrics, metrics
