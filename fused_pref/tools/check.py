"""``python -m fused_pref check``: every case of ``fused_pref.testing.CASES`` (every public function and
DPO loss type), fused against the fp64 reference, in fp32 and bf16 (or the dtypes asked for, fp16
among them); in a tile plan, or with the gradients computed in the forward
(``backward="in_forward"``: the cases that mode runs).

Runs the real Triton kernels (through the interpreter on a CPU-only machine) and prints a line per
case as it finishes: ``||out - ref|| / ||ref||`` for the value and each gradient, and whether all are
within tolerance; then one verdict line.
"""

import time

import torch

from fused_pref.kernels import tile_plan
from fused_pref.kernels.tiles import DEFAULT_PLAN
from fused_pref.testing import CASES, TOLERANCE, run_case

DTYPES = (torch.float32, torch.bfloat16)
OUTPUTS = ("value", "d_hidden", "d_weight", "d_bias")
NAME_WIDTH = max(map(len, CASES)) + 1


def header() -> str:
    return f"{'case':<{NAME_WIDTH}} {'dtype':<9}" + "".join(f" {name:>9}" for name in OUTPUTS) + "  within tolerance"


def run_check(device, dtypes=DTYPES, cases=None, out=print, plan: str = DEFAULT_PLAN, backward: str = "auto") -> int:
    """Print one line per (case, dtype) as it runs, then the verdict; return the number that failed
    (1 when no case was left to run: a check of nothing is not a pass).
    ``cases``: names of ``CASES`` to run (default all); ``plan``: the tile plan the kernels run
    (``kernels.tile_plan``), for a user about to opt in to one; ``backward``: the ``backward``
    option of every call, for one about to opt in to ``"in_forward"`` (a line names the cases
    that mode does not run, which are left out)."""
    names = list(CASES) if cases is None else list(dict.fromkeys(cases))
    if backward == "in_forward":
        left_out = [name for name in names if not CASES[name].runs_in_forward()]
        names = [name for name in names if name not in left_out]
        if left_out:
            out(f"not run: backward='in_forward' does not run {', '.join(left_out)}")
    out(header())
    failed, start = 0, time.perf_counter()
    for dtype in dtypes:
        for name in names:
            case = CASES[name] if backward == "auto" else CASES[name].with_kwargs(backward=backward)
            try:
                with tile_plan(plan):
                    comparison = run_case(case, dtype, device, seed=list(CASES).index(name))
                problems, errors = comparison.failures(dtype), comparison.errors
            except Exception as error:  # one broken case is a failed line, not the end of the check
                problems, errors = [f"{type(error).__name__}: {error}"], {}
            failed += bool(problems)
            errors = "".join(f" {errors[key]:>9.1e}" if key in errors else f" {'-':>9}" for key in OUTPUTS)
            verdict = "yes" if not problems else "NO: " + "; ".join(problems)
            out(f"{name:<{NAME_WIDTH}} {str(dtype).removeprefix('torch.'):<9}{errors}  {verdict}")
    total = len(dtypes) * len(names)
    tolerances = ", ".join(f"{str(d).removeprefix('torch.')} {TOLERANCE[d]:.0e}" for d in dtypes)
    out(f"{total - failed} of {total} cases within tolerance ({tolerances}; log-probs, rewards and "
        f"z-loss at fp32's), {failed} failed, in {time.perf_counter() - start:.0f} s")
    return failed if total else 1
