"""Bitwise determinism: the same inputs give the same bits, forward and backward, run after run, with
and without ``torch.use_deterministic_algorithms(True)``.

Every default path is deterministic by construction: the default backward is strategy (b) of
DESIGN.md section 4 (a kernel writes ``dz`` for a vocabulary chunk, cuBLAS products accumulate the
gradients, chunks in a fixed order), no kernel uses atomics, tile configs are fixed (no
autotuning), the split-vocabulary forward merges its partials in a kernel, split by split in a
fixed order, and packed sequence sums difference an fp64 prefix sum.  Under the interpreter
programs run one after another, so a race cannot show on CPU: ``test_no_kernel_uses_atomics``
guards the structural
half, and these runs the rest (no state carried between calls, no read of uninitialised memory:
under deterministic algorithms torch fills fresh tensors with NaN).  Where CUDA is visible the runs
are on the GPU, where a race would also show.
"""

import pathlib
import re

import pytest
import torch

import fused_pref
from fused_pref.testing import make_inputs, nan_filled


def _simpo_packed_shift(x):
    R, T, D = x["hidden"].shape
    cu = torch.arange(0, R * T + 1, T, dtype=torch.int32, device=x["labels"].device)
    return fused_pref.simpo_loss(x["hidden"].reshape(R * T, D), x["weight"], x["labels"].reshape(-1), x["bias"],
                                 shift=True, cu_seqlens=cu, deterministic=True)


def _call(name, **kwargs):
    def call(x):
        return getattr(fused_pref, name)(x["hidden"], x["weight"], x["labels"], x["bias"], deterministic=True,
                                         **kwargs)
    return call


# (call, dtype, shape): every function family, each dtype, the split and unsplit forward, packed
# and shifted layouts, a reference model computed by the library, a softcap.
CASES = {
    "cross_entropy-bf16": (_call("linear_cross_entropy"), torch.bfloat16, (4, 23, 97, 1003)),
    "linear_logprobs-fp32-softcap": (_call("linear_logprobs", softcap=20.0), torch.float32, (2, 9, 40, 257)),
    "simpo-packed-shift-fp32": (_simpo_packed_shift, torch.float32, (4, 23, 97, 1003)),
    "dpo-ref_hidden-bf16": (lambda x: _call("dpo_loss", ref_hidden=x["hidden"].detach().flip(0))(x),
                            torch.bfloat16, (4, 23, 97, 1003)),
    "orpo-fp16-unsplit": (_call("orpo_loss"), torch.float16, (6, 101, 33, 520)),
}


def _step(call, dtype, shape, device):
    """Forward and backward on fresh inputs on ``device``: every output and gradient, as a flat tuple."""
    x = make_inputs(*shape, dtype=dtype, seed=3, confident=0.0, device=device)
    out = call(x)
    tensors = [out] if isinstance(out, torch.Tensor) else [out.loss, out.chosen_logps, out.rejected_logps,
                                                           out.chosen_rewards, out.rejected_rewards]
    value = tensors[0]
    weights = torch.linspace(-1, 1, value.numel()).reshape(value.shape).to(device=value.device, dtype=value.dtype)
    (value * weights).sum().backward()
    return tuple(tensors) + tuple(x[k].grad for k in ("hidden", "weight", "bias"))


def _assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape
        # The bits themselves: torch.equal would call -0.0 and 0.0 equal, and NaN unequal to itself.
        assert torch.equal(u.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), \
            f"output {i} differs between runs"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_runs_are_bitwise_identical(case, device):
    first, second = _step(*case, device), _step(*case, device)
    _assert_bitwise_equal(first, second)
    # Under torch.use_deterministic_algorithms(True), strictly: no op of ours is refused, no result
    # depends on uninitialised (now NaN-filled) memory, and no bit changes (every path already is
    # deterministic, so the mode selects nothing different).
    with nan_filled(warn_only=False):
        _assert_bitwise_equal(_step(*case, device), first)


def _settings():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)


@pytest.mark.parametrize("before", [(False, False, False), (True, True, False), (True, False, True)],
                         ids=["off", "on-warn-only-unfilled", "on-filled"])
def test_nan_filled_sets_and_restores_the_global_settings(before):
    # Every comparison of the parity harness runs inside it, so a leak would change every later test.
    saved = _settings()
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]
    try:
        for warn_only in (True, False):
            with pytest.raises(KeyError):                      # restored on the way out of an error too
                with nan_filled(warn_only=warn_only):
                    assert _settings() == (True, warn_only, True)
                    assert torch.empty(5).isnan().all() and torch.empty(2, 3, dtype=torch.bfloat16).isnan().all()
                    raise KeyError
            assert _settings() == before
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


def test_no_kernel_uses_atomics():
    # Float atomics add in whatever order programs finish, so results change run to run.  The atomic
    # backward that used them (strategy (a)) was removed; the forward merges its vocabulary splits in
    # a kernel of its own, in split order.
    kernels = pathlib.Path(fused_pref.kernels.__file__).parent
    sources = {path.name: path.read_text() for path in kernels.glob("*.py")}
    assert sources, f"no kernel sources under {kernels}"
    users = sorted(name for name, text in sources.items() if re.search(r"\btl\.atomic_\w+\(", text))
    assert users == [], f"kernels with atomics: {users}"
