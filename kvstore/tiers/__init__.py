"""Storage tiers behind one batch-first protocol: memory (GPU or CPU), disk, Redis and a sidecar (remote)."""

from kvstore.tiers.base import Tier, TierStats, TierUsage
from kvstore.tiers.disk import DiskTier, VerifyReport
from kvstore.tiers.http import HttpTier
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.redis import RedisTier

__all__ = ["DiskTier", "HttpTier", "MemoryTier", "RedisTier", "Tier", "TierStats", "TierUsage", "VerifyReport"]
