"""torch.compile(fullgraph=True) over the losses: no graph break, same result as eager.

The kernels are torch.library custom ops (fused_pref/ops.py), opaque nodes to Inductor; value
checks that need a host sync are skipped while compiling, as with validate=False.
"""

import pytest
import torch

import fused_pref
from fused_pref.testing import make_inputs, relative_error

def _entropy_bonus(out):
    return -out.logp.sum() - 0.1 * out.entropy.sum()


def _with_metrics(out):
    return out.loss + out.entropy + out.mean_token_accuracy


CASES = {
    "simpo": lambda h, w, lab, b: fused_pref.simpo_loss(h, w, lab, b, sft_weight=0.1).loss,
    "dpo": lambda h, w, lab, b: fused_pref.dpo_loss(h, w, lab, b, ref_hidden=h.detach().flip(0),
                                                    loss_type="ipo").loss,
    "cross_entropy": lambda h, w, lab, b: fused_pref.linear_cross_entropy(h, w, lab, b, shift=True),
    # Per-token statistics, the entropy in the loss (its gradient through the backward kernel).
    "logprobs[entropy]": lambda h, w, lab, b: _entropy_bonus(fused_pref.linear_logprobs(h, w, lab, b,
                                                                                         return_entropy=True)),
    # Label smoothing and the z-loss: the lse and the logit sum differentiable, per-row weights.
    "cross_entropy[smoothing+z_loss]": lambda h, w, lab, b: fused_pref.linear_cross_entropy(
        h, w, lab, b, label_smoothing=0.1, lse_square_scale=1e-3),
    # The gradient-in-forward mode: cuBLAS products and a Triton pass per block, one custom op.
    "cross_entropy[in_forward]": lambda h, w, lab, b: fused_pref.linear_cross_entropy(h, w, lab, b, shift=True,
                                                                                      backward="in_forward"),
    # A pair loss's: blocks of whole pairs and the head per block, inside the one custom op; the
    # reference model's log-probs by the same products, another.
    "dpo[in_forward]": lambda h, w, lab, b: fused_pref.dpo_loss(h, w, lab, b, ref_hidden=h.detach().flip(0),
                                                                sft_weight=0.1, backward="in_forward").loss,
    # With the token metrics (the statistics' outputs of the op): compared through the value.
    "simpo[in_forward+token_metrics]": lambda h, w, lab, b: _with_metrics(fused_pref.simpo_loss(
        h, w, lab, b, backward="in_forward", token_metrics=True)),
}


@pytest.mark.parametrize("name", CASES)
def test_compiled_equals_eager(name, device):
    torch._dynamo.reset()
    x = make_inputs(4, 23, 97, 1003, device=device, seed=83)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    eager = CASES[name](*args)
    eager_grads = torch.autograd.grad(eager, args[:2])
    compiled = torch.compile(CASES[name], fullgraph=True)(*args)
    compiled_grads = torch.autograd.grad(compiled, args[:2])
    assert relative_error(compiled, eager) < 1e-5
    for ours, theirs in zip(compiled_grads, eager_grads):
        assert relative_error(ours, theirs) < 1e-5


# Hyper-parameters as the compiled step's arguments: with dynamic=True (and once a value changes
# between calls) torch.compile traces them as symbolic floats, which the checks must trace too.
TRACED = {
    "simpo": lambda h, w, lab, b, beta, gamma: fused_pref.simpo_loss(h, w, lab, b, beta=beta, gamma=gamma).loss,
    "dpo": lambda h, w, lab, b, beta, gamma: fused_pref.dpo_loss(h, w, lab, b, ref_logps=torch.zeros(4),
                                                                 beta=beta, label_smoothing=gamma / 10).loss,
    "cpo": lambda h, w, lab, b, beta, gamma: fused_pref.cpo_loss(h, w, lab, b, beta=beta, sft_weight=gamma).loss,
    "kto": lambda h, w, lab, b, beta, gamma: fused_pref.kto_loss(
        h, w, lab, b, desirable=torch.tensor([True, False, True, False]), ref_logps=torch.zeros(4), beta=beta,
        kl=gamma).loss,
}


@pytest.mark.parametrize("name", TRACED)
def test_traced_hyper_parameters(name):
    torch._dynamo.reset()
    x = make_inputs(4, 7, 40, 257, seed=1)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    step = torch.compile(TRACED[name], fullgraph=True, dynamic=True)
    for beta, gamma in ((2.0, 1.0), (2.5, 1.0), (2.5, 1.2)):
        assert relative_error(step(*args, beta, gamma), TRACED[name](*args, beta, gamma)) < 1e-5
