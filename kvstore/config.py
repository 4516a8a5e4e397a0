"""Configuration: frozen dataclasses, built once at the edge (CLI, TOML file, environment).

Precedence, lowest first: defaults < TOML file < environment (`KVSTORE_<SECTION>_<FIELD>`, e.g.
`KVSTORE_DISK_PATH`, `KVSTORE_MEMORY_CAPACITY`; top-level fields as `KVSTORE_<FIELD>`) < CLI
`--set section.field=value`. The embedded default is a CPU memory tier and a disk tier under the
user's cache directory: no server, no GPU.

File format:
    chunk_tokens = 256
    [memory]
    capacity = "2GiB"
    [disk]
    path = "~/.cache/kvstore"
    capacity = "20GiB"
    codec = "zstd"
    [redis]                     # optional remote tier, last in the order
    url = "redis://127.0.0.1:6379/0"
    [sidecar]                   # optional remote tier: another `kvstore serve` over HTTP, after [redis]
    url = "http://10.0.0.5:8420"
    token = "..."
    [server]                    # `kvstore serve` (see docs/SERVICE.md)
    port = 8420
    tokens_file = "/etc/kvstore/tokens.toml"

Nothing below the edge reads the environment; `build_store(config)` turns a config into tiers.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import platformdirs

from kvstore.errors import ConfigError
from kvstore.keys import validate_namespace

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_size(value: int | str) -> int:
    """`"2GiB"`, `"512 MB"`, `1048576` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"size must be >= 0, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a size: {value!r} (use e.g. 512MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("kvstore"))


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    capacity: int = 2 << 30
    device: str = "cpu"  # "cpu" (host memory, pinned where CUDA exists) or "cuda[:N]" (GPU tier)

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ConfigError("memory.capacity must be positive (remove the [memory] section to disable)")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"memory.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass(frozen=True, slots=True)
class DiskConfig:
    path: Path = field(default_factory=default_cache_dir)
    capacity: int = 20 << 30
    codec: str = "zstd"
    codec_level: int | None = None
    fsync: bool = True

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ConfigError("disk.capacity must be positive")
        from codec import codec_names

        if self.codec not in codec_names():
            raise ConfigError(f"disk.codec {self.codec!r} is not one of {', '.join(codec_names())}")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = ""  # redis://host:port/db (a cluster: any node's URL with cluster = true)
    cluster: bool = False
    prefix: str = "kvs:"
    ttl_seconds: int = 0  # 0: no expiry (Redis's maxmemory-policy evicts)
    codec: str = "zstd"
    codec_level: int | None = None
    timeout: float = 1.0  # seconds per call before the tier counts as down
    retry_after: float = 2.0  # seconds a down tier answers misses before trying again

    def __post_init__(self) -> None:
        if not re.match(r"^(redis|rediss|unix)://", self.url):
            raise ConfigError(f"redis.url must be a redis:// (or rediss://, unix://) URL, got {self.url!r}")
        if self.timeout <= 0 or self.retry_after < 0 or self.ttl_seconds < 0:
            raise ConfigError("redis.timeout must be > 0, redis.retry_after and redis.ttl_seconds >= 0")
        from codec import codec_names

        if self.codec not in codec_names():
            raise ConfigError(f"redis.codec {self.codec!r} is not one of {', '.join(codec_names())}")


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    url: str = ""  # http(s)://host:port of a `kvstore serve`
    token: str = field(default="", repr=False)  # bearer token; KVSTORE_SIDECAR_TOKEN keeps it out of files
    codec: str = "zstd"  # how puts travel; the sidecar stores them with its own disk codec
    codec_level: int | None = None
    timeout: float = 1.0  # seconds per request before the tier counts as down
    retry_after: float = 2.0  # seconds a down tier answers misses before trying again
    max_batch_keys: int = 256  # keys per request; keep <= the server's max_batch_keys

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url):
            raise ConfigError(f"sidecar.url must be an http:// or https:// URL, got {self.url!r}")
        if self.timeout <= 0 or self.retry_after < 0 or self.max_batch_keys <= 0:
            raise ConfigError("sidecar.timeout and sidecar.max_batch_keys must be > 0, sidecar.retry_after >= 0")
        from codec import codec_names

        if self.codec not in codec_names():
            raise ConfigError(f"sidecar.codec {self.codec!r} is not one of {', '.join(codec_names())}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """`kvstore serve`: where it listens, who may call it, and the bounds on every request."""

    host: str = "127.0.0.1"
    port: int = 8420
    tokens_file: Path | None = None  # TOML or JSON: bearer token -> namespaces (see docs/SERVICE.md)
    max_body_bytes: int = 256 << 20  # one record, or one JSON body
    max_batch_keys: int = 1024  # keys (or records) in one batch request
    request_timeout_s: float = 30.0  # a request still running after this answers 503

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes <= 0 or self.max_batch_keys <= 0 or self.request_timeout_s <= 0:
            raise ConfigError("server.max_body_bytes, server.max_batch_keys and server.request_timeout_s must be > 0")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    chunk_tokens: int = 256
    namespace: str = "default"
    write_through: bool = True
    promote_on_hit: bool = True
    max_pending_bytes: int = 1 << 30
    memory: MemoryConfig | None = field(default_factory=MemoryConfig)
    gpu: MemoryConfig | None = None
    disk: DiskConfig | None = field(default_factory=DiskConfig)
    redis: RedisConfig | None = None
    sidecar: SidecarConfig | None = None
    server: ServerConfig = field(default_factory=ServerConfig)  # used by `kvstore serve` only

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_tokens <= 1 << 16:
            raise ConfigError(f"chunk_tokens must be in [1, 65536], got {self.chunk_tokens}")
        validate_namespace(self.namespace)
        if self.memory is None and self.gpu is None and self.disk is None:
            raise ConfigError("at least one tier must be configured")


_SECTIONS = {"memory": MemoryConfig, "gpu": MemoryConfig, "disk": DiskConfig, "redis": RedisConfig,
             "sidecar": SidecarConfig, "server": ServerConfig}
_SIZE_FIELDS = {"capacity", "max_pending_bytes", "max_body_bytes"}
_PATH_FIELDS = {"path", "tokens_file"}


def _coerce(name: str, value: Any, default: Any) -> Any:
    if name in _SIZE_FIELDS:
        return parse_size(value)
    if name in _PATH_FIELDS:
        if name == "tokens_file" and value in (None, ""):
            return None
        return Path(str(value)).expanduser()
    if name == "codec_level":
        if value in (None, "", "none"):
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"codec_level must be an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if isinstance(default, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    return str(value)


def _build(cls, values: Mapping[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(sorted(unknown))}")
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default for f in known.values()}
    kwargs = {k: _coerce(k, v, defaults[k]) for k, v in values.items()}
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None) -> StoreConfig:
    """Defaults < TOML file at `path` (or `$KVSTORE_CONFIG`) < `env` < `overrides` ("section.field")."""
    env = {} if env is None else env
    tree: dict[str, Any] = {}
    path = path or env.get("KVSTORE_CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                tree = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            if k not in _SECTIONS:
                raise ConfigError(f"unknown section [{k}] in {path}")
            for kk, vv in v.items():
                flat[f"{k}.{kk}"] = vv
        else:
            flat[k] = v
    for k, v in env.items():
        if not k.startswith("KVSTORE_") or k == "KVSTORE_CONFIG":
            continue
        rest = k[len("KVSTORE_"):].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        flat[f"{section}.{rest[len(section) + 1:]}" if section else rest] = v
    for k, v in (overrides or {}).items():
        flat[k] = v
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any] | None] = {}
    for k, v in flat.items():
        if "." in k:
            s, name = k.split(".", 1)
            if s not in _SECTIONS:
                raise ConfigError(f"unknown section {s!r} in setting {k!r}")
            if name == "enabled":
                if not _coerce("enabled", v, True):
                    sections[s] = None
                else:
                    sections.setdefault(s, {})
                continue
            if sections.get(s, {}) is None:
                continue
            sections.setdefault(s, {})[name] = v
        elif k in _SECTIONS:  # e.g. `memory = 5` or KVSTORE_MEMORY=5: would become a non-config tier value
            raise ConfigError(f"{k!r} is a section: set {k}.<field>, or {k}.enabled = false to remove it")
        else:
            top[k] = v
    defaults = StoreConfig()
    for s, values in sections.items():
        if values is None and s == "server":
            raise ConfigError("[server] cannot be disabled (it only applies to `kvstore serve`)")
        if values is None:
            top[s] = None
        elif s == "redis" and "url" not in values:
            raise ConfigError("[redis] needs a url (e.g. redis://127.0.0.1:6379/0)")
        elif s == "sidecar" and "url" not in values:
            raise ConfigError("[sidecar] needs a url (e.g. http://127.0.0.1:8420)")
        elif s == "gpu" and "device" not in values:
            top[s] = _build(MemoryConfig, {"device": "cuda", **values}, f"[{s}]")
        else:
            top[s] = _build(_SECTIONS[s], values, f"[{s}]")
    known = {f.name for f in dataclasses.fields(StoreConfig)}
    unknown = set(top) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    kwargs = {k: (v if k in _SECTIONS else _coerce(k, v, getattr(defaults, k))) for k, v in top.items()}
    return StoreConfig(**kwargs)


def build_store(config: StoreConfig):
    """The `TieredStore` a config describes: GPU tier, then CPU memory, disk, Redis, sidecar, where configured."""
    from codec import make_codec
    from kvstore.store import TieredStore
    from kvstore.tiers import DiskTier, SidecarTier, MemoryTier, RedisTier

    tiers = []
    if config.gpu is not None:
        tiers.append(MemoryTier(config.gpu.capacity, config.gpu.device, name="gpu"))
    if config.memory is not None:
        tiers.append(MemoryTier(config.memory.capacity, config.memory.device, name="cpu" if config.memory.device == "cpu" else "device"))
    if config.disk is not None:
        d = config.disk
        tiers.append(DiskTier(d.path, d.capacity, make_codec(d.codec, d.codec_level), fsync=d.fsync))
    if config.redis is not None:
        r = config.redis
        tiers.append(RedisTier(r.url, make_codec(r.codec, r.codec_level), cluster=r.cluster, prefix=r.prefix,
                               ttl_seconds=r.ttl_seconds or None, timeout=r.timeout, retry_after=r.retry_after))
    if config.sidecar is not None:
        c = config.sidecar
        tiers.append(SidecarTier(c.url, c.token, make_codec(c.codec, c.codec_level), timeout=c.timeout,
                              retry_after=c.retry_after, max_batch_keys=c.max_batch_keys))
    return TieredStore(
        tiers,
        chunk_tokens=config.chunk_tokens,
        write_through=config.write_through,
        promote_on_hit=config.promote_on_hit,
        max_pending_bytes=config.max_pending_bytes,
    )
