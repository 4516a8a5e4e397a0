"""The GPU benchmarks on a machine without CUDA: a clear message and a non-zero exit, no traceback (their
measurements run on a GPU: benchmarks/device_check.sh)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def test_codec_gpu_bench_says_it_needs_cuda(capsys):
    from benchmarks import codec_gpu_bench

    assert codec_gpu_bench.main(["--quick"]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err


def test_kernels_bench_refuses_cuda_without_it(capsys):
    from benchmarks import kernels_bench

    with pytest.raises(SystemExit) as e:
        kernels_bench.main(["--device", "cuda"])
    assert e.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
