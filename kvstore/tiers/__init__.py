"""Storage tiers behind one batch-first protocol (`base.Tier`).

- `MemoryTier`: decoded KV in an arena on a torch device (GPU, or CPU host memory), where an engine reads;
- byte tiers (`byte_tier.ByteTier`: encode on put, verify on get, records moved as bytes with
  `get_bytes`/`put_bytes`): `DiskTier` (local files), `RedisTier` (Redis or Redis Cluster), `SidecarTier`
  (another `kvstore serve`, over HTTP), `RecordMemoryTier` (records in memory: a record server's);
- `lru.PinnedLRU`: the index that the memory and disk tiers share (LRU order, pins, deferred frees).
"""

from kvstore.tiers.base import Prepared, Tier, TierStats, TierUsage
from kvstore.tiers.byte_tier import ByteTier, RecordBytes, RemoteTier
from kvstore.tiers.disk import DiskTier, VerifyReport
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.record_memory import RecordMemoryTier
from kvstore.tiers.redis import RedisTier
from kvstore.tiers.sidecar import SidecarTier

__all__ = ["ByteTier", "DiskTier", "MemoryTier", "Prepared", "RecordBytes", "RecordMemoryTier", "RedisTier",
           "RemoteTier", "SidecarTier", "Tier", "TierStats", "TierUsage", "VerifyReport"]
