"""Configuration: defaults < TOML file < environment < overrides; sizes; typed errors; build_store."""

from __future__ import annotations

from pathlib import Path

import pytest

from codec.lossless import RawCodec, ZstdCodec
from kvstore.config import DiskConfig, MemoryConfig, StoreConfig, build_store, default_cache_dir, load_config, parse_size
from kvstore.errors import ConfigError, KVStoreError
from kvstore.tiers import DiskTier, MemoryTier


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "kvstore.toml"
    p.write_text(text)
    return p


def test_defaults():
    cfg = load_config(env={})
    assert cfg == StoreConfig()
    assert cfg.chunk_tokens == 256 and cfg.namespace == "default"
    assert cfg.write_through and cfg.promote_on_hit and cfg.max_pending_bytes == 1 << 30
    assert cfg.memory == MemoryConfig(capacity=2 << 30, device="cpu")
    assert cfg.gpu is None
    assert cfg.disk.path == default_cache_dir() and cfg.disk.capacity == 20 << 30
    # Durability: acknowledged once in the page cache ("process-crash"), synced every second (docs/SERVICE.md).
    assert cfg.disk.codec == "zstd" and cfg.disk.codec_level is None and not cfg.disk.fsync
    assert cfg.disk.sync_interval_s == 1.0


def test_toml_file(tmp_path):
    p = write(tmp_path, f"""
chunk_tokens = 128
namespace = "team-a"
write_through = false
max_pending_bytes = "64MiB"
[memory]
capacity = "1GiB"
[disk]
path = "{tmp_path / 'cache'}"
capacity = "5GB"
codec = "raw"
fsync = true
""")
    cfg = load_config(p, env={})
    assert cfg.chunk_tokens == 128 and cfg.namespace == "team-a" and not cfg.write_through
    assert cfg.max_pending_bytes == 64 << 20
    assert cfg.memory.capacity == 1 << 30
    assert cfg.disk == DiskConfig(path=tmp_path / "cache", capacity=5 * 10**9, codec="raw", fsync=True)
    # The file may also come from $KVSTORE_CONFIG.
    assert load_config(env={"KVSTORE_CONFIG": str(p)}) == cfg


def test_precedence_file_env_overrides(tmp_path):
    p = write(tmp_path, """
chunk_tokens = 128
[memory]
capacity = "1GiB"
[disk]
codec = "raw"
capacity = "1GiB"
""")
    env = {"KVSTORE_CHUNK_TOKENS": "64", "KVSTORE_MEMORY_CAPACITY": "512MiB", "KVSTORE_DISK_CODEC_LEVEL": "7", "OTHER_VAR": "ignored"}
    cfg = load_config(p, env=env)
    assert cfg.chunk_tokens == 64  # env beats the file
    assert cfg.memory.capacity == 512 << 20
    assert cfg.disk.codec == "raw" and cfg.disk.capacity == 1 << 30  # untouched by env: from the file
    assert cfg.disk.codec_level == 7
    cfg = load_config(p, env=env, overrides={"chunk_tokens": "32", "memory.capacity": "3MiB", "disk.codec": "zstd"})
    assert cfg.chunk_tokens == 32 and cfg.memory.capacity == 3 << 20 and cfg.disk.codec == "zstd"  # overrides win
    assert cfg.disk.codec_level == 7 and cfg.disk.capacity == 1 << 30


def test_env_paths_and_booleans(tmp_path):
    cfg = load_config(env={"KVSTORE_DISK_PATH": "~/somewhere", "KVSTORE_DISK_FSYNC": "on", "KVSTORE_WRITE_THROUGH": "0", "KVSTORE_PROMOTE_ON_HIT": "yes"})
    assert cfg.disk.path == Path("~/somewhere").expanduser() and not cfg.disk.path.as_posix().startswith("~")
    assert cfg.disk.fsync and not cfg.write_through and cfg.promote_on_hit


@pytest.mark.parametrize(
    "text,expected",
    [("2GiB", 2 << 30), ("512MB", 512 * 10**6), ("512 MiB", 512 << 20), ("1.5GiB", 3 << 29), ("100", 100), ("7b", 7),
     ("1k", 1024), ("1kb", 1000), ("2TiB", 2 << 40), ("3 gb", 3 * 10**9), (1048576, 1 << 20), (0, 0)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "-1GiB", "1 parsec", "1e9", "12 34", -1, True, "1.2.3MB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"overrides": {"bogus": "1"}},
        {"overrides": {"bogus.field": "1"}},
        {"overrides": {"memory.bogus": "1"}},
        {"overrides": {"disk.colour": "blue"}},
        {"env": {"KVSTORE_BOGUS": "1"}},
        {"env": {"KVSTORE_DISK_BOGUS": "1"}},
        {"overrides": {"memory": "5"}},
        {"env": {"KVSTORE_MEMORY": "5"}},
    ],
    ids=lambda k: repr(k)[:50],
)
def test_unknown_settings(kwargs):
    with pytest.raises(ConfigError):
        load_config(**kwargs)


@pytest.mark.parametrize(
    "text",
    ["[bogus]\nx = 1\n", "[memory]\nbogus = 1\n", "bogus = 1\n", "memory = 5\n", "disk = false\n", "[disk]\npath = \n", "chunk_tokens = ["],
    ids=["section", "key-in-section", "top-key", "section-as-int", "section-as-bool", "bad-toml", "broken-toml"],
)
def test_bad_file(tmp_path, text):
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, text), env={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(
    "overrides",
    [
        {"chunk_tokens": "0"},
        {"chunk_tokens": "65537"},
        {"chunk_tokens": "many"},
        {"memory.capacity": "0"},
        {"memory.capacity": "lots"},
        {"memory.device": "tpu"},
        {"disk.codec": "nope"},
        {"disk.codec_level": "high"},
        {"disk.capacity": "0"},
        {"disk.fsync": "maybe"},
        {"write_through": "perhaps"},
        {"memory.enabled": "false", "disk.enabled": "false"},
    ],
    ids=lambda o: repr(o)[:40],
)
def test_bad_values(overrides):
    with pytest.raises(ConfigError):
        load_config(env={}, overrides=overrides)


def test_bad_namespace_is_a_typed_error():
    with pytest.raises(KVStoreError):
        load_config(env={}, overrides={"namespace": "../etc"})


def test_memory_enabled_false_removes_the_tier(tmp_path):
    cfg = load_config(env={}, overrides={"memory.enabled": "false", "memory.capacity": "1GiB", "disk.path": str(tmp_path)})
    assert cfg.memory is None and cfg.disk is not None
    p = write(tmp_path, "[memory]\nenabled = false\ncapacity = \"1GiB\"\n")
    assert load_config(p, env={}).memory is None
    assert load_config(env={"KVSTORE_MEMORY_ENABLED": "0"}).memory is None
    # Enabled explicitly: defaults plus what was given.
    assert load_config(env={}, overrides={"memory.enabled": "true"}).memory == MemoryConfig()
    store = build_store(cfg)
    try:
        assert len(store.tiers) == 1 and isinstance(store.tiers[0], DiskTier)
    finally:
        store.close()


def test_gpu_section_defaults_to_cuda():
    cfg = load_config(env={}, overrides={"gpu.capacity": "1GiB"})
    assert cfg.gpu == MemoryConfig(capacity=1 << 30, device="cuda")
    assert load_config(env={}, overrides={"gpu.capacity": "1GiB", "gpu.device": "cuda:1"}).gpu.device == "cuda:1"


def test_build_store(tmp_path):
    cfg = load_config(env={}, overrides={"chunk_tokens": "64", "memory.capacity": "1MiB", "disk.path": str(tmp_path / "d"),
                                         "disk.capacity": "10MiB", "disk.codec_level": "5", "disk.fsync": "false",
                                         "write_through": "false", "max_pending_bytes": "2MiB"})
    store = build_store(cfg)
    try:
        mem, disk = store.tiers
        assert isinstance(mem, MemoryTier) and mem.name == "cpu" and mem.usage().capacity_bytes == 1 << 20
        assert isinstance(disk, DiskTier) and disk.root == tmp_path / "d" and disk.capacity == 10 << 20
        assert isinstance(disk.codec, ZstdCodec) and disk.codec.level == 5 and not disk.fsync
        assert (tmp_path / "d" / "records").is_dir()
        assert store.chunk_tokens == 64 and not store.write_through and store.max_pending_bytes == 2 << 20
    finally:
        store.close()
    raw = build_store(load_config(env={}, overrides={"memory.enabled": "false", "disk.path": str(tmp_path / "r"), "disk.codec": "raw"}))
    try:
        assert isinstance(raw.tiers[0].codec, RawCodec)
    finally:
        raw.close()
    mem_only = build_store(load_config(env={}, overrides={"disk.enabled": "false", "memory.capacity": "1MiB"}))
    try:
        assert len(mem_only.tiers) == 1 and isinstance(mem_only.tiers[0], MemoryTier)
    finally:
        mem_only.close()


def test_configs_are_frozen():
    cfg = StoreConfig()
    with pytest.raises(Exception):
        cfg.chunk_tokens = 5  # type: ignore[misc]


def test_redis_section_adds_the_remote_tier_last(tmp_path):
    from kvstore.config import build_store

    cfg = load_config(overrides={"redis.url": "redis://127.0.0.1:1/0", "redis.timeout": "0.3", "redis.ttl_seconds": "60",
                                 "disk.path": str(tmp_path)})
    assert cfg.redis.url == "redis://127.0.0.1:1/0" and cfg.redis.timeout == 0.3 and cfg.redis.ttl_seconds == 60
    store = build_store(cfg)
    try:
        assert [t.name for t in store.tiers] == ["cpu", "disk", "redis"]
    finally:
        store.close()


@pytest.mark.parametrize("overrides, message", [
    ({"redis.cluster": "true"}, "needs a url"),
    ({"redis.url": "http://x"}, "redis:// "),
    ({"redis.url": "redis://h:1/0", "redis.timeout": "soon"}, "must be a number"),
    ({"redis.url": "redis://h:1/0", "redis.codec": "gzip"}, "redis.codec"),
])
def test_bad_redis_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_sidecar_section_adds_the_http_tier_last(tmp_path):
    from kvstore.tiers import SidecarTier

    cfg = load_config(env={"KVSTORE_SIDECAR_TOKEN": "s3cret"},
                      overrides={"sidecar.url": "http://127.0.0.1:1", "sidecar.timeout": "0.3", "sidecar.codec": "raw",
                                 "disk.path": str(tmp_path), "memory.capacity": "1MiB"})
    assert cfg.sidecar.url == "http://127.0.0.1:1" and cfg.sidecar.timeout == 0.3 and cfg.sidecar.token == "s3cret"
    assert "s3cret" not in repr(cfg)
    store = build_store(cfg)
    try:
        assert [t.name for t in store.tiers] == ["cpu", "disk", "sidecar"]
        assert isinstance(store.tiers[2], SidecarTier) and isinstance(store.tiers[2].codec, RawCodec)
    finally:
        store.close()


def test_server_section(tmp_path):
    from kvstore.config import ServerConfig

    assert load_config(env={}).server == ServerConfig()
    p = write(tmp_path, f'[server]\nhost = "0.0.0.0"\nport = 9000\ntokens_file = "{tmp_path / "t.toml"}"\n'
                        'max_body_bytes = "1MiB"\nmax_batch_keys = 16\nrequest_timeout_s = 2.5\n')
    cfg = load_config(p, env={"KVSTORE_SERVER_PORT": "9001"})
    assert cfg.server == ServerConfig("0.0.0.0", 9001, tmp_path / "t.toml", 1 << 20, max_batch_keys=16,
                                      request_timeout_s=2.5)
    assert cfg.server.kv_limit == 1 << 20  # tied to the body limit unless set
    assert load_config(env={}, overrides={"server.max_kv_bytes": "4MiB"}).server.kv_limit == 4 << 20


@pytest.mark.parametrize("overrides, message", [
    ({"sidecar.token": "x"}, "needs a url"),
    ({"sidecar.url": "redis://h:1"}, "http:// or https://"),
    ({"sidecar.url": "http://h:1", "sidecar.timeout": "0"}, "sidecar.timeout"),
    ({"server.port": "70000"}, "server.port"),
    ({"server.max_body_bytes": "0"}, "max_body_bytes"),
    ({"server.enabled": "false"}, "cannot be disabled"),
    ({"server.nope": "1"}, "nope"),
])
def test_bad_server_and_sidecar_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=overrides)
