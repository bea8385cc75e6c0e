"""The memory accounting (``python -m fused_pref memory``): the live-bytes recorder, the fused path's
peak extra memory growing with the workspace and not with tokens x vocabulary, the fitted formulas
against the analytic ones, and the command's output."""

import os
import re
import subprocess
import sys

import pytest
import torch

from fused_pref.tools.accounting import WORKSPACES, account, peak_extra
from fused_pref.tools.memory import AllocationRecorder, LiveBytesRecorder
from fused_pref.tools.workload import library_implementations, make_batch


def test_live_bytes_recorder_follows_each_storage_to_its_release():
    with LiveBytesRecorder() as recorder:
        a = torch.ones(1000)            # 4000 B
        view = a[10:]                   # a view: no new storage
        b = torch.ones(2000)            # 8000 B: the peak, 12000 B
        del a, view, b
        c = torch.ones(100)             # 400 B, alive at the end
        grad = torch.ones(10)           # 40 B, to be excluded as a gradient
    assert recorder.peak().nbytes == 12000
    assert recorder.peak(exclude=[c]).nbytes == 12000
    assert [s.nbytes for s in recorder.peak().live] == [8000, 4000]
    del c
    assert recorder.peak(exclude=[grad]).nbytes == 12000


@torch.library.custom_op("fused_pref_test::with_temporary", mutates_args=())
def _with_temporary(x: torch.Tensor) -> torch.Tensor:
    temporary = torch.ones(1000, device=x.device)   # 4000 B, freed before the op returns
    return x + temporary[:1]


def test_recorders_see_inside_custom_ops():
    # The library's kernels are custom ops: a mode sees them as one call unless it enters them.
    x = torch.ones(10)
    with LiveBytesRecorder() as live, AllocationRecorder() as allocations:
        y = _with_temporary(x)
    assert live.peak(exclude=[y]).nbytes == 4000
    assert [a.numel for a in allocations.allocations] == [1000, 10]


def _peak(implementation, loss, T, D, V, R=4):
    step = library_implementations(loss, validate=False)[implementation]
    return peak_extra(step, make_batch(R, T, D, V, seed=V, reference_model=loss == "dpo"))


@pytest.mark.cpu_interpreter  # the accounting runs the kernels on CPU tensors
@pytest.mark.parametrize("loss", ["simpo", "cross_entropy"])
def test_fused_peak_grows_with_the_workspace_not_with_tokens_times_vocabulary(loss):
    # Same tokens and hidden size, 4x the vocabulary: the reference's extra grows by its fp32
    # logits (several bytes per token and vocabulary entry); the fused path's only by its
    # backward workspace, which is bounded by construction (at most 256 MiB and V/16 columns).
    T, D, V1, V2 = 32, 32, 1024, 4096
    N = 4 * T
    workspace = WORKSPACES["fused-vchunk"]
    fused = [_peak("fused-vchunk", loss, T, D, V) for V in (V1, V2)]
    reference = [_peak("reference", loss, T, D, V).nbytes for V in (V1, V2)]
    measured_workspace = [workspace.measured_bytes(peak, N, V) for peak, V in zip(fused, (V1, V2))]
    for V, found in zip((V1, V2), measured_workspace):
        # The workspace in the input dtype, or under the interpreter in fp32 plus a chunk's bf16 cast.
        assert workspace.gpu_bytes(N, V) <= found <= 3 * workspace.gpu_bytes(N, V)
    rest = [peak.nbytes - found for peak, found in zip(fused, measured_workspace)]
    assert rest[0] == rest[1]
    # What is left is O(N): per token, tens of bytes per hidden unit.
    assert rest[1] < 16 * N * D + 64 * N
    assert reference[1] - reference[0] >= 12 * N * (V2 - V1)


@pytest.mark.cpu_interpreter
@pytest.mark.parametrize("model,loss", [("llama3-8b", "dpo"), ("gemma2-2b", "cross_entropy"), ("gemma2-2b", "dpo")])
def test_fitted_formula_matches_the_analytic_one_at_full_shape(model, loss):
    for a in account(model, 16384, loss):
        assert a.fit.max_error < 64, a.fit.points
        assert a.fitted_bytes == pytest.approx(a.analytic_bytes, rel=0.01), a.implementation
        if a.implementation.startswith("fused-"):
            assert abs(a.fit.coefficients["N·V"]) < 0.05, a.implementation  # never tokens x vocabulary
        if a.implementation.startswith("fused-"):
            assert abs(a.fit.coefficients["V·D"]) < 0.05  # no copy of the weight


@pytest.mark.cpu_interpreter
def test_memory_command_prints_each_implementation_measured_and_analytic():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fused_pref", "memory", "--model", "llama3-8b", "--tokens", "16384"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("Llama-3-8B head (D 4096, V 128256), 16384 tokens per step, bf16, simpo"), out
    totals = {}
    for name in ("fused-vchunk", "reference"):
        row = re.search(rf"^  {name}\s+([\d.]+) (GB|MB)\s+([\d.]+) (GB|MB)", out, re.MULTILINE)
        assert row, out
        to_bytes = {"GB": 1e9, "MB": 1e6}
        measured, analytic = float(row[1]) * to_bytes[row[2]], float(row[3]) * to_bytes[row[4]]
        assert measured == pytest.approx(analytic, rel=0.01)
        totals[name] = measured
    # 12 bytes per logit against 14 bytes per hidden unit plus a 256 MiB-bounded workspace.
    assert totals["reference"] > 20 * totals["fused-vchunk"]
    formulas = re.findall(r"^  measured fit  (.*?)\s+\(largest error", out, re.MULTILINE)
    assert len(formulas) == 3 and all("N·V" not in f for f in formulas[:2]), formulas
    assert formulas[2].startswith("12.0·N·V"), formulas
