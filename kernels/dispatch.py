"""The one dispatch point of the kernels: which implementation of an op runs, and the errors they raise.

Every op has two implementations registered under its name: `"torch"` (the reference, any device) and
`"triton"` (the kernel, CUDA tensors; CPU tensors too when Triton runs its interpreter,
`TRITON_INTERPRET=1`, which is how the kernels are tested without a GPU). Callers pick with
`backend="auto" | "torch" | "triton"`:

- `"auto"`: Triton for CUDA tensors when the `triton` package imports, the torch reference otherwise;
- `"torch"` / `"triton"`: that implementation, or `BackendUnavailableError` saying why it cannot run.

Triton is imported lazily, on first use of the Triton path, so that the package works without it.
Nothing here reads the environment; Triton itself reads `TRITON_INTERPRET`.
"""

from __future__ import annotations

import importlib
from typing import Callable, Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

# Ops and what each implementation computes (signatures in the modules that register them).
OPS: tuple[str, ...] = ("gather_paged", "scatter_paged", "move_rows")


class KernelError(Exception):
    """Base of every error this package raises on purpose."""


class KernelInputError(KernelError, ValueError):
    """Bad input to a kernel: dtype, device, shape, stride or index out of range."""


class BackendUnavailableError(KernelError, RuntimeError):
    """The requested backend cannot run here (Triton missing, or CPU tensors outside the interpreter)."""


_IMPLS: dict[tuple[str, str], Callable] = {}
_TRITON_MODULE = "kernels.triton_kernels"


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as the `backend` implementation of `op`."""
    if op not in OPS or backend not in ("torch", "triton"):
        raise ValueError(f"unknown op/backend {op!r}/{backend!r}")

    def deco(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def triton_status(device: torch.device) -> str | None:
    """None when the Triton path can run on `device`, otherwise the reason why not."""
    try:
        triton = importlib.import_module("triton")
    except ImportError:
        return "the triton package is not installed (pip install triton; Linux only)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and bool(triton.knobs.runtime.interpret):
        return None
    return (
        f"Triton kernels run on CUDA tensors, or on CPU tensors under its interpreter "
        f"(TRITON_INTERPRET=1 set before triton is imported); got device {device}"
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("torch" or "triton") that `backend` means for tensors on `device`."""
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_status(device) is None else "torch"
    if backend == "triton":
        reason = triton_status(device)
        if reason is not None:
            raise BackendUnavailableError(f"backend='triton' cannot run: {reason}")
    return backend


def implementation(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of `op` to run for tensors on `device` under the `backend` choice."""
    chosen = resolve_backend(backend, device)
    if chosen == "triton" and (op, "triton") not in _IMPLS:
        importlib.import_module(_TRITON_MODULE)  # registers the Triton implementations
    return _IMPLS[(op, chosen)]
