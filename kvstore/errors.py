"""Typed errors of the store. Library callers catch these; the service maps them to 4xx.

Every error a caller can provoke with bad input derives from `KVStoreError`, so one `except` is
enough at an edge. Faults of a tier (a corrupt record, an I/O error) are not raised to the caller
of `TieredStore.get`: they become misses and are counted.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidKeyError(KVStoreError, ValueError):
    """A namespace, model fingerprint or chunk hash that is not well formed."""


class InvalidTokensError(KVStoreError, ValueError):
    """Token ids that are not a 1-D sequence of integers in [0, 2**32)."""


class InvalidChunkError(KVStoreError, ValueError):
    """A chunk whose tensor, tokens or position do not agree with each other."""


class RecordError(KVStoreError):
    """Bytes that are not a valid record: truncated, corrupted, oversized or foreign."""


class RecordTooLargeError(RecordError):
    """A record whose header declares more KV than the reader's `max_kv_bytes` allows (decoding it would
    allocate that much): refused before any of it is decoded (the service answers 413)."""


class ConfigError(KVStoreError, ValueError):
    """A configuration value that is missing, unknown or out of range."""


class TierError(KVStoreError):
    """A tier that cannot serve a request at all (closed, misconfigured)."""
