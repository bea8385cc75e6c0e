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


def _share_the_cores():
    """Under pytest-xdist, each worker's torch takes its share of the cores, and so do the processes
    it starts (OMP_NUM_THREADS), unless OMP_NUM_THREADS is set already.  By default every worker
    would use them all: two parity test files took 20% longer that way on CI's two cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores()


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
