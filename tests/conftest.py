"""Runs the real Triton kernels on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before fused_pref is
imported, so it is set here, at conftest import, ahead of every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _float32_matmul_highest():
    # GPU parity is checked against fp64 at full fp32 precision (tf32 would be ~1e-3 off).
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
