"""``python -m fused_pref demo``: SimPO on a tiny Llama, fused against the reference, a few steps."""

import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from fused_pref.tools.demo import DemoResult, run_demo  # noqa: E402

STEP_LINE = re.compile(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$")


def test_demo_curves_match_and_memory_is_reported():
    lines = []
    result = run_demo(steps=3, pairs=4, out=lines.append)
    steps = [m.groups() for m in map(STEP_LINE.match, lines) if m]
    assert [int(s[0]) for s in steps] == [1, 2, 3]
    for _, fused, reference, accuracy, _ in steps:
        assert float(fused) == pytest.approx(float(reference), rel=1e-4)
        assert 0.0 <= float(accuracy) <= 1.0
    assert result.curves_match and len(result.fused_losses) == 3
    text = "\n".join(lines)
    assert "Loss curves match" in text
    assert result.memory["reference"] > result.memory["fused"] > 0
    assert re.search(r"this demo \(\d+ tokens.*measured: reference .*, fused .*: saves", text)
    assert re.search(r"Llama-3-8B head .* reference [\d.]+ GB, fused [\d.]+ [MG]B: saves", text), text


def test_demo_command():
    # The command re-executes itself under the interpreter when there is no GPU, as `check` does.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fused_pref", "demo", "--steps", "2", "--pairs", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Loss curves match" in done.stdout


def test_demo_gives_the_analytic_llama_figures():
    # The demo states Llama-3-8B's figures by the formula `python -m fused_pref memory` checks against
    # a measurement (tests/test_memory_accounting.py), on any machine.
    import fused_pref.tools.demo as demo
    from fused_pref.tools.accounting import analytic_bytes, analytic_terms, human_bytes

    analytic = {name: analytic_bytes(name, analytic_terms(name, "simpo", None), 16384, 4096, 128256)
                for name in ("reference", "fused-vchunk")}
    [line] = demo._llama3_8b_lines()
    assert (f"analytic: reference {human_bytes(analytic['reference'])}, fused {human_bytes(analytic['fused-vchunk'])}"
            in line), line


@pytest.mark.parametrize("step", [0, 1, 2])
def test_a_loss_not_finite_at_any_step_is_no_match(step):
    fused = [1.3, 1.25, 1.2]
    fused[step] = math.nan
    result = DemoResult(fused_losses=fused, reference_losses=[1.3, 1.25, 1.2])
    assert math.isnan(result.max_relative_gap) and not result.curves_match
    assert DemoResult(fused_losses=[1.3, 1.25], reference_losses=[1.3, 1.25]).curves_match
