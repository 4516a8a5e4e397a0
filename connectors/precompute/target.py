"""The target of a precompute job: the one tier it writes to, chosen from a `StoreConfig`.

The job writes straight into the shared, persistent tier, never through a `TieredStore` (whose remote
tiers drop writes when behind, and whose memory tiers end with the process). The target is the slowest
configured persistent tier in the store's order (`kvstore.config.TIER_KINDS`): the sidecar (`[sidecar]`,
a `kvstore serve` URL and its token) if configured, else Redis / Redis Cluster (`[redis]`), else the
local disk tier (`[disk]`). The section builds and describes its tier, with its `codec` / `codec_level`
(the command line's `--codec/--level` set them).
"""

from __future__ import annotations

from connectors.precompute.errors import PrecomputeError
from kvstore.config import TIER_KINDS, StoreConfig
from kvstore.tiers.base import Tier


def target_section(config: StoreConfig) -> str:
    """The section of the tier the job writes to: the last configured persistent one."""
    for name in reversed(TIER_KINDS):
        if TIER_KINDS[name].persistent and getattr(config, name) is not None:
            return name
    raise PrecomputeError("precompute needs a persistent target: configure [disk], [redis] or [sidecar] "
                          "(e.g. --set disk.path=DIR, or --to redis://host:6379/0)")


def build_target(config: StoreConfig, section: str | None = None) -> Tier:
    """The tier of `section` (default: `target_section(config)`), built as `build_store` builds it."""
    section = section or target_section(config)
    return getattr(config, section).build(section)


def describe_target(config: StoreConfig, section: str | None = None) -> str:
    return getattr(config, section or target_section(config)).describe()
