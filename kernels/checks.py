"""Input validation shared by the ops (every check raises `KernelInputError` with what was expected),
and the dtype sets they accept.

Index checks (`check_index`) read the index's min and max, which waits for the device; callers on a hot
path that build their indices themselves can pass `check_indices=False` to the ops to skip that wait.
"""

from __future__ import annotations

import torch

from kernels.dispatch import KernelInputError

# dtypes the pure moves accept (bit patterns are copied, never converted).
MOVE_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint8,
    torch.int8,
)
# dtypes the rotations accept (computed in fp32, written back in the key's dtype).
ROTATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory seen as integers of the same size (same shape and strides): moves on it copy bit
    patterns exactly (NaN payloads kept), and work for dtypes without copy kernels (float8)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise KernelInputError(msg)


def check_tensor(name: str, t: object, ndim: int, dims: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise KernelInputError(f"{name} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")
    return t


def check_writable(name: str, t: torch.Tensor) -> None:
    """A destination whose elements are distinct memory (no zero or overlapping broadcast strides)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1)
    span = 1
    for stride, size in dims:
        if stride < span:
            raise KernelInputError(f"{name} must not have overlapping elements (zero or interleaved strides "
                                   f"{t.stride()}, shape {tuple(t.shape)})")
        span = stride * size


def check_index(name: str, idx: torch.Tensor, length: int, device: torch.device, *,
                check_range: bool, unique: bool = False) -> None:
    """`idx` is 1-D int64 on `device` with entries in [-1, length) (-1 = skip); with `unique`, no
    entry >= 0 appears twice (a scatter with repeated destinations has no defined result)."""
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 1):
        raise KernelInputError(f"{name} must be a 1-D tensor")
    if idx.dtype != torch.int64:
        raise KernelInputError(f"{name} must be int64, got {idx.dtype}")
    if idx.device != device:
        raise KernelInputError(f"{name} is on {idx.device}, expected {device}")
    if not check_range or idx.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.stack([idx.min(), idx.max()]).tolist())
    require(lo >= -1, f"{name} has entry {lo} < -1 (-1 means skip)")
    require(hi < length, f"{name} has entry {hi}, out of range for {length} destinations/sources")
    if unique:
        valid = idx[idx >= 0]
        require(torch.unique(valid).numel() == valid.numel(), f"{name} repeats a destination")
