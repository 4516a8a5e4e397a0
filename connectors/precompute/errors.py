"""Typed errors of the precompute job (all `KVStoreError`s, so the command line maps them to exit 2)."""

from __future__ import annotations

from kvstore.errors import KVStoreError


class PrecomputeError(KVStoreError):
    """A job that cannot start: bad options, a model without a usable context length."""


class CorpusError(PrecomputeError):
    """The corpus as a whole cannot be read (missing path, unreadable file). Bad single entries are not
    errors: they are reported and skipped."""


class ManifestError(PrecomputeError):
    """A manifest that is corrupt, of another format version, written for other job parameters, or in
    use by another running job."""
