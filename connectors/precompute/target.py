"""The target of a precompute job: the one tier it writes to, chosen from a `StoreConfig`.

The job writes straight into the shared, persistent tier, never through a `TieredStore` (whose remote
tiers drop writes when behind, and whose memory tiers end with the process). The target is the slowest
configured tier: the sidecar (`[sidecar]`, a `kvstore serve` URL and its token) if configured, else
Redis / Redis Cluster (`[redis]`), else the local disk tier (`[disk]`). Its codec is that section's
`codec` / `codec_level` (the command line's `--codec/--level` set them).
"""

from __future__ import annotations

from codec import CodecError, codec_names, make_codec
from connectors.precompute.errors import PrecomputeError
from kvstore.config import StoreConfig
from kvstore.tiers import DiskTier, SidecarTier, RedisTier
from kvstore.tiers.base import Tier


def target_section(config: StoreConfig) -> str:
    """"sidecar", "redis" or "disk": the section of the tier the job writes to."""
    for section in ("sidecar", "redis", "disk"):
        if getattr(config, section) is not None:
            return section
    raise PrecomputeError("precompute needs a persistent target: configure [disk], [redis] or [sidecar] "
                          "(e.g. --set disk.path=DIR, or --to redis://host:6379/0)")


def check_codec(name: str, level: int | None) -> None:
    """A clear error for a codec name that is not registered or a level it does not take."""
    if name not in codec_names():
        raise PrecomputeError(f"unknown codec {name!r}; registered: {', '.join(codec_names())}")
    try:
        make_codec(name, level)
    except (CodecError, ValueError, TypeError) as e:
        raise PrecomputeError(f"codec {name!r} at level {level}: {e}") from None


def build_target(config: StoreConfig, section: str | None = None) -> Tier:
    """The tier of `section` (default: `target_section(config)`), built the way `build_store` builds it."""
    section = section or target_section(config)
    try:
        if section == "sidecar":
            c = config.sidecar
            check_codec(c.codec, c.codec_level)
            return SidecarTier(c.url, c.token, make_codec(c.codec, c.codec_level), timeout=c.timeout,
                            retry_after=c.retry_after, max_batch_keys=c.max_batch_keys)
        if section == "redis":
            r = config.redis
            check_codec(r.codec, r.codec_level)
            return RedisTier(r.url, make_codec(r.codec, r.codec_level), cluster=r.cluster, prefix=r.prefix,
                             ttl_seconds=r.ttl_seconds or None, timeout=r.timeout, retry_after=r.retry_after)
        d = config.disk
        check_codec(d.codec, d.codec_level)
        return DiskTier(d.path, d.capacity, make_codec(d.codec, d.codec_level), fsync=d.fsync)
    except CodecError as e:
        raise PrecomputeError(str(e)) from None


def describe_target(config: StoreConfig, section: str | None = None) -> str:
    section = section or target_section(config)
    c = getattr(config, section)
    codec = c.codec + (f" level {c.codec_level}" if c.codec_level is not None else "")
    if section == "sidecar":
        return f"sidecar {c.url} (codec {codec})"
    if section == "redis":
        return f"redis{' cluster' if c.cluster else ''} {c.url} (codec {codec})"
    return f"disk {c.path} (codec {codec})"
