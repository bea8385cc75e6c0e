"""No tensor of N x V elements, at any dtype, in the fused forward + backward (DESIGN.md section 4)."""

import pytest
import torch

import fused_pref
from fused_pref.memory import AllocationRecorder
from fused_pref.testing import make_inputs

# The bound counts every allocation, the gradients too, so d_weight [V, D] must stay under it:
# D < N/8.  V is large enough that the backward's vocabulary chunk (a multiple of BLOCK_V=128, at
# most V/16) stays under it too.
R, T, D, V = 8, 65, 48, 4099


def _step(module, loss_name, device, **options):
    x = make_inputs(R, T, D, V, device=device, dtype=torch.float32)
    with AllocationRecorder() as recorder:
        if loss_name == "simpo":
            loss = module.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], **options).loss
        elif loss_name == "dpo":
            loss = module.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"],
                                   ref_hidden=x["hidden"].detach().flip(0), **options).loss
        else:
            loss = module.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], **options)
        loss.backward()
    return recorder


@pytest.mark.parametrize("backward", ["chunked", "fused"])
@pytest.mark.parametrize("loss_name", ["simpo", "dpo", "cross_entropy"])
def test_fused_never_allocates_tokens_by_vocab(loss_name, backward, device):
    recorder = _step(fused_pref, loss_name, device, backward=backward)
    largest = recorder.largest()
    assert len(recorder.allocations) > 10, "the recorder saw no allocations: it is not recording"
    assert largest.numel < R * T * V / 8, f"fused path allocated {largest}"


@pytest.mark.parametrize("loss_name", ["simpo", "cross_entropy"])
def test_the_check_catches_the_reference(loss_name, device):
    # The same measurement on the materializing reference must see the logits.
    largest = _step(fused_pref.reference, loss_name, device).largest()
    assert largest.numel >= R * T * V, f"reference's largest allocation was {largest}"
