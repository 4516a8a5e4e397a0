"""Storage tiers behind one batch-first protocol: memory (GPU or CPU) and disk; remote tiers join later."""

from kvstore.tiers.base import Tier, TierStats, TierUsage
from kvstore.tiers.disk import DiskTier, VerifyReport
from kvstore.tiers.memory import MemoryTier

__all__ = ["DiskTier", "MemoryTier", "Tier", "TierStats", "TierUsage", "VerifyReport"]
