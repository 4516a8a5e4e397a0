"""Shared set-up of the kernel tests: which (device, backend) targets run here (fixture `target`), and
bit-level helpers handed out as session fixtures (`random_bits`, `poison`, `same_bits_as`).

Triton's interpreter is switched on before anything imports triton, so that the Triton kernels run on
CPU tensors and are tested on machines without a GPU. On a CUDA machine it stays off (one process
cannot have both), the CPU Triton twins are skipped and the `gpu` targets run the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.dispatch import triton_status  # noqa: E402  (after the interpreter switch)

CUDA = torch.cuda.is_available()
_CPU_TRITON = triton_status(torch.device("cpu"))

# (device, backend) targets; every GPU target has its CPU twin (same backend on CPU, interpreted).
TARGETS = [
    pytest.param(("cpu", "torch"), id="cpu-torch"),
    pytest.param(("cpu", "triton"), id="cpu-triton",
                 marks=pytest.mark.skipif(_CPU_TRITON is not None, reason=f"Triton on CPU: {_CPU_TRITON}")),
    pytest.param(("cuda", "torch"), id="cuda-torch",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]),
    pytest.param(("cuda", "triton"), id="cuda-triton",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]),
]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@pytest.fixture(params=TARGETS)
def target(request) -> tuple[torch.device, str]:
    device, backend = request.param
    return torch.device(device), backend


def _random_bits(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of `dtype` (NaNs, infs and subnormals included): moves must copy bits."""
    n = 8 * dtype.itemsize
    ints = torch.randint(-(2 ** (n - 1)), 2 ** (n - 1), shape, generator=gen, dtype=torch.int64)
    return ints.to(_INT_VIEW[dtype.itemsize]).view(dtype)


def _poison(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor every element of which holds one sentinel bit pattern (a NaN where the dtype has NaN)."""
    sentinel = {1: 0x7F, 2: 0x7E5A, 4: 0x7FC0_5A5A}[dtype.itemsize]
    return torch.full(shape, sentinel, dtype=_INT_VIEW[dtype.itemsize]).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(_INT_VIEW[t.element_size()])


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = (_bits(got) != _bits(want)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} elements differ, first at {diff[0].tolist()}"


@pytest.fixture(scope="session")
def random_bits():
    return _random_bits


@pytest.fixture(scope="session")
def poison():
    return _poison


@pytest.fixture(scope="session")
def same_bits_as():
    return _assert_same_bits
