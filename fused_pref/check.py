"""``python -m fused_pref check``: every public function, fused against the fp64 reference.

Runs the real Triton kernels (through the interpreter on a CPU-only machine) on small, awkward
shapes and reports ``||out - ref|| / ||ref||`` for the value and for each gradient.
"""

from dataclasses import dataclass

import torch

from . import functional, reference
from .testing import TOLERANCE, as_reference, make_inputs, relative_error

# V not a multiple of any block, D not a power of two and larger than BLOCK_D, odd T.
SHAPE = dict(R=4, T=23, D=97, V=1003)


@dataclass(frozen=True)
class CheckRow:
    function: str
    dtype: torch.dtype
    output: str
    error: float

    @property
    def ok(self) -> bool:
        return self.error <= TOLERANCE[self.dtype]


def _value(result):
    return result.loss if hasattr(result, "loss") else result


def _cases():
    """(name, callable(module, inputs) -> result) for every public function."""
    yield "linear_logprobs", lambda m, x: m.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"])
    yield "sequence_logprobs[mean]", lambda m, x: m.sequence_logprobs(
        x["hidden"], x["weight"], x["labels"], x["bias"], reduction="mean")
    yield "linear_cross_entropy", lambda m, x: m.linear_cross_entropy(
        x["hidden"].flatten(0, 1), x["weight"], x["labels"].flatten(), x["bias"], softcap=30.0)
    yield "simpo_loss", lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"])
    yield "dpo_loss", lambda m, x: m.dpo_loss(
        x["hidden"], x["weight"], x["labels"], x["bias"], ref_hidden=x["hidden"].detach().flip(0))


def run_check(device, dtypes=(torch.float32, torch.bfloat16)) -> list[CheckRow]:
    rows = []
    for dtype in dtypes:
        for seed, (name, call) in enumerate(_cases()):
            inputs = make_inputs(**SHAPE, dtype=dtype, device=device, seed=seed)
            ref_inputs = as_reference(inputs)
            out, ref = _value(call(functional, inputs)), _value(call(reference, ref_inputs))
            # A fixed random weighting makes the gradient of a vector output non-trivial.
            weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            (out * weights.to(out.device, out.dtype)).sum().backward()
            (ref * weights).sum().backward()
            rows.append(CheckRow(name, dtype, "value", relative_error(out, ref)))
            for arg in ("hidden", "weight", "bias"):
                rows.append(CheckRow(name, dtype, f"d_{arg}", relative_error(inputs[arg].grad, ref_inputs[arg].grad)))
    return rows


def format_rows(rows) -> str:
    lines = [f"{'function':<24} {'dtype':<9} {'output':<9} {'rel. error':>11} {'tolerance':>10}  ok"]
    for r in rows:
        dtype = str(r.dtype).removeprefix("torch.")
        lines.append(f"{r.function:<24} {dtype:<9} {r.output:<9} {r.error:>11.2e} {TOLERANCE[r.dtype]:>10.0e}  "
                     f"{'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
