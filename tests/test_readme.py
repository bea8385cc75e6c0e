"""The README's programs run as pasted, on a CPU: the first through the reference (with its one
warning) and through the kernels under Triton's interpreter; the GRPO step and the parity check
through the kernels."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_program() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)


@pytest.mark.parametrize("interpreted", [False, True], ids=["reference", "interpreter"])
def test_the_first_program_runs_as_pasted(interpreted, tmp_path):
    program = _first_program()
    assert "fp.simpo_loss(" in program, "the first snippet is the complete program"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    if interpreted:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'rewards/accuracies'" in done.stdout, done.stdout
    warned = "using the PyTorch reference" in done.stderr
    assert warned != interpreted, done.stderr


def _run_interpreted(marker, cwd):
    """The README's Python block holding ``marker``, run as pasted through the kernels (Triton's
    interpreter, no GPU visible)."""
    program = next(block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
                   if marker in block)
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "CUDA_VISIBLE_DEVICES": "",
           "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", program], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_the_grpo_step_runs_as_pasted(tmp_path):
    # The RL section's training step.
    done = _run_interpreted("fp.grpo_loss(", tmp_path)
    assert "'clip_ratio/high_mean'" in done.stdout and "'entropy'" in done.stdout, done.stdout


def test_the_parity_check_runs_as_pasted(tmp_path):
    # The parity harness as the README shows it to users for their own CI.
    done = _run_interpreted("compare(loss, x)", tmp_path)
    errors = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert {"value", "logps", "rewards", "d_hidden", "d_weight", "d_bias"} <= errors.keys(), errors
    assert "using the PyTorch reference" not in done.stderr, done.stderr
