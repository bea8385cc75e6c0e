"""``temperature``: every function divides its logits by it (after the softcap) before the softmax, as
GRPO and PPO score sampled completions, in the kernels (a scalar; ``hidden`` is never scaled) and in
the reference twin; the gradients follow, through every backward."""

import math
import re

import pytest
import torch

import fused_pref
from fused_pref.testing import compare, make_inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CALLS = {
    "linear_logprobs": lambda m, x, **kw: m.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], **kw),
    "sequence_logprobs": lambda m, x, **kw: m.sequence_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"],
                                                                reduction="mean", **kw),
    "linear_cross_entropy": lambda m, x, **kw: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"],
                                                                      x["bias"], **kw),
    "linear_cross_entropy[in_forward]": lambda m, x, **kw: m.linear_cross_entropy(
        x["hidden"], x["weight"], x["labels"], x["bias"], backward="in_forward", **kw),
    "simpo_loss": lambda m, x, **kw: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], **kw),
    "dpo_loss": lambda m, x, **kw: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"],
                                              ref_hidden=x["hidden"].detach().flip(0), **kw),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("name", CALLS)
def test_parity(name, softcap, dtype, device):
    x = make_inputs(4, 23, 97, 1003, dtype=dtype, device=device, seed=41)
    compare(lambda m, x: CALLS[name](m, x, softcap=softcap, temperature=0.7), x).check(dtype)


@pytest.mark.parametrize("plan", ["narrow", "wide"])
def test_wide_plan_and_many_chunks(plan, device):
    # The wide plan's tiles, and a backward of many vocabulary chunks (a small workspace).
    x = make_inputs(6, 101, 33, 2053, dtype=torch.bfloat16, device=device, seed=43)
    with fused_pref.kernels.tile_plan(plan):
        compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], temperature=1.3,
                                          workspace_bytes=4096), x).check(torch.bfloat16)


def test_temperature_is_the_logits_divided(device):
    # T = 0.5 on weight W is T = 1 on weight 2W (no bias, no softcap): the same log-probs, and the
    # gradient with respect to hidden the same; a temperature of 1 changes nothing at all.
    x = make_inputs(2, 9, 40, 257, device=device, seed=47, bias=False)
    halved = fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"], temperature=0.5)
    doubled = fused_pref.linear_logprobs(x["hidden"], 2 * x["weight"].detach(), x["labels"])
    torch.testing.assert_close(halved, doubled, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(halved, fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"]))
    assert torch.equal(fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"], temperature=1),
                       fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"]))


def test_metrics_see_the_tempered_logits(device):
    # The logits/* metrics of a preference loss are means of the logits the loss saw.
    x = make_inputs(2, 9, 40, 257, device=device, seed=53)
    plain = fused_pref.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"]).metrics()
    tempered = fused_pref.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], temperature=2.0).metrics()
    for key in ("logits/chosen", "logits/rejected"):
        assert math.isclose(tempered[key], plain[key] / 2, rel_tol=1e-4), key


@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
@pytest.mark.parametrize("temperature", [0, -1.0, math.nan, math.inf, True, "0.7", None],
                         ids=["0", "negative", "nan", "inf", "bool", "str", "None"])
def test_bad_temperature(module, temperature, device):
    x = make_inputs(2, 9, 40, 257, device=device, seed=5)
    pattern = rf"^temperature must be a positive number, got {re.escape(repr(temperature))}$"
    with pytest.raises(ValueError, match=pattern):
        module.linear_logprobs(x["hidden"], x["weight"], x["labels"], temperature=temperature)
