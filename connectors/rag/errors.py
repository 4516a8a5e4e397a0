"""The RAG API's error: bad input (unknown passage ids, an empty question, a manifest that cannot serve this
model or store) raises `RagError`, a `ValueError`."""

from __future__ import annotations


class RagError(ValueError):
    """Bad input to the RAG API."""
