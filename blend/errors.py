"""Typed errors of blend. Bad input (segments that disagree with the model, a config out of range, a model
blend cannot drive) raises one of these; all derive from `BlendError`, a `ValueError`."""

from __future__ import annotations


class BlendError(ValueError):
    """Base of every error blend raises on purpose."""


class BlendInputError(BlendError):
    """Segments or a configuration that are not well formed, or that do not fit the model."""


class BlendModelError(BlendError):
    """A model blend cannot drive (not a Llama-family causal LM of transformers)."""
