"""The dispatch point: which backend runs, and clear errors when the one asked for cannot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import BackendUnavailableError, KernelInputError, gather_paged
from kernels.dispatch import implementation, resolve_backend

CPU = torch.device("cpu")


def _gather_inputs():
    caches = [torch.randn(2, 3, 4, 2, 8)]
    slots = torch.tensor([0, 5, -1, 11])
    return caches, slots, torch.zeros(1, 2, 4, 2, 8)


def test_auto_is_torch_on_cpu():
    assert resolve_backend("auto", CPU) == "torch"
    assert implementation("gather_paged", "auto", CPU).__module__ == "kernels.paged"


def test_unknown_backend():
    with pytest.raises(KernelInputError, match="backend must be one of"):
        gather_paged(*_gather_inputs(), backend="cuda")  # type: ignore[arg-type]


def test_forced_triton_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    with pytest.raises(BackendUnavailableError, match="not installed"):
        gather_paged(*_gather_inputs(), backend="triton")
    caches, slots, out = _gather_inputs()
    gather_paged(caches, slots, out)  # auto still works, on the torch reference
    assert torch.equal(out[0, :, 1], caches[0][:, 1, 1])


def test_forced_triton_on_cpu_outside_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        gather_paged(*_gather_inputs(), backend="triton")


def test_package_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "c = [torch.randn(2, 3, 4, 2, 8)]; o = torch.zeros(1, 2, 2, 2, 8)\n"
        "kernels.gather_paged(c, torch.tensor([1, 2]), o)\n"
        "assert 'kernels.triton_kernels' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
