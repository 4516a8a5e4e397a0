"""Storage tiers behind one batch-first protocol (`base.Tier`).

- `MemoryTier`: decoded KV in an arena on a torch device (GPU, or CPU host memory);
- byte tiers (`byte_tier.ByteTier`: encode on put, verify on get): `DiskTier` (local files),
  `RedisTier` (Redis or Redis Cluster), `SidecarTier` (another `kvstore serve`, over HTTP);
- `lru.PinnedLRU`: the index that the memory and disk tiers share (LRU order, pins, deferred frees).
"""

from kvstore.tiers.base import Prepared, Tier, TierStats, TierUsage
from kvstore.tiers.byte_tier import ByteTier, RemoteTier
from kvstore.tiers.disk import DiskTier, VerifyReport
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.redis import RedisTier
from kvstore.tiers.sidecar import SidecarTier

__all__ = ["ByteTier", "DiskTier", "MemoryTier", "Prepared", "RedisTier", "RemoteTier", "SidecarTier", "Tier",
           "TierStats", "TierUsage", "VerifyReport"]
