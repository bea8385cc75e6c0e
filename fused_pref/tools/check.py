"""``python -m fused_pref check``: every public function, fused against the fp64 reference.

Runs the real Triton kernels (through the interpreter on a CPU-only machine) on small, awkward
shapes and reports ``||out - ref|| / ||ref||`` for the value and for each gradient.
"""

from dataclasses import dataclass

import torch

from fused_pref import functional, reference
from fused_pref.preference import DPO_LOSS_TYPES
from fused_pref.testing import TOLERANCE, as_reference, make_inputs, relative_error

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


def _packed(x):
    """The same batch packed: [R*T, D] hidden and cu_seqlens at every T."""
    R, T, _ = x["hidden"].shape
    cu = torch.arange(0, R * T + 1, T, dtype=torch.int32, device=x["labels"].device)
    return x["hidden"].flatten(0, 1), x["labels"].flatten(), cu


def _cases():
    """(name, callable(module, inputs) -> result, make_inputs overrides) for every public function."""
    def args(x):
        return x["hidden"], x["weight"], x["labels"], x["bias"]

    yield "linear_logprobs", lambda m, x: m.linear_logprobs(*args(x)), {}
    yield "sequence_logprobs[mean]", lambda m, x: m.sequence_logprobs(*args(x), reduction="mean"), {}
    yield "linear_cross_entropy", lambda m, x: m.linear_cross_entropy(
        x["hidden"].flatten(0, 1), x["weight"], x["labels"].flatten(), x["bias"], softcap=30.0), {}
    yield "simpo_loss", lambda m, x: m.simpo_loss(*args(x)), {}
    yield "simpo_loss[packed,shift,sft]", lambda m, x: m.simpo_loss(
        _packed(x)[0], x["weight"], _packed(x)[1], x["bias"], cu_seqlens=_packed(x)[2], shift=True,
        sft_weight=0.5), {}
    yield "cpo_loss", lambda m, x: m.cpo_loss(*args(x)), {}
    # ORPO's log(1 - e^S) is ill-conditioned as S -> 0 (TRL's too): no near-certain tokens here.
    yield "orpo_loss", lambda m, x: m.orpo_loss(*args(x)), {"confident": 0.0}
    for loss_type in DPO_LOSS_TYPES:
        yield f"dpo_loss[{loss_type}]", lambda m, x, t=loss_type: m.dpo_loss(
            *args(x), ref_hidden=x["hidden"].detach().flip(0), loss_type=t, label_smoothing=0.1), {}


def run_check(device, dtypes=(torch.float32, torch.bfloat16)) -> list[CheckRow]:
    rows = []
    for dtype in dtypes:
        for seed, (name, call, overrides) in enumerate(_cases()):
            inputs = make_inputs(**SHAPE, dtype=dtype, device=device, seed=seed, **overrides)
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
    lines = [f"{'function':<30} {'dtype':<9} {'output':<9} {'rel. error':>11} {'tolerance':>10}  ok"]
    for r in rows:
        dtype = str(r.dtype).removeprefix("torch.")
        lines.append(f"{r.function:<30} {dtype:<9} {r.output:<9} {r.error:>11.2e} {TOLERANCE[r.dtype]:>10.0e}  "
                     f"{'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
