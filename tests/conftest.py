"""Runs the real Triton kernels on the GPU when one is visible, else on CPU tensors through Triton's
interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before fused_pref is
imported, so it is set here, at conftest import, ahead of every test module.  Tests run their kernels
on ``DEVICE`` (the ``device`` fixture); those marked ``cpu_interpreter`` measure something only the
interpreter shows (the CPU memory accounting) and are skipped where CUDA is visible.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fused_pref.kernels import interpreter_problem  # noqa: E402
from fused_pref.testing import kernel_device  # noqa: E402

DEVICE = kernel_device()


def pytest_sessionstart(session):
    if DEVICE == "cpu" and (problem := interpreter_problem()):
        pytest.exit(f"the tests run the kernels through Triton's interpreter, but {problem}", returncode=4)


def pytest_collection_modifyitems(config, items):
    if DEVICE != "cuda":
        return
    skip = pytest.mark.skip(reason="runs the kernels on CPU tensors through Triton's interpreter, and CUDA is "
                                   "visible (CUDA_VISIBLE_DEVICES= pytest runs it)")
    for item in items:
        if "cpu_interpreter" in item.keywords:
            item.add_marker(skip)


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
