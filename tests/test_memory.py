"""No tensor of N x V elements, at any dtype, in the fused forward + backward (DESIGN.md section 4),
and no temporary inside a PyTorch op larger than a gradient."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fused_pref
from fused_pref.compat import liger
from fused_pref.kernels.tiles import DEFAULT_PLAN, distinct_plans, gpu_arch, tile_plan
from fused_pref.tools.memory import AllocationRecorder
from fused_pref.testing import make_inputs


# "widest" runs "wide"'s tiles off Hopper: the same launches, so the same allocations.
DISTINCT_PLANS = distinct_plans(arch=gpu_arch(torch.device("cuda")) if torch.cuda.is_available() else None)

# The bound counts every allocation, the gradients too, so d_weight [V, D] must stay under it:
# D < N/8.  V is large enough that the backward's vocabulary chunk (a multiple of BLOCK_V=128, at
# most V/16) stays under it too.
R, T, D, V = 8, 65, 48, 4099


def _forward_backward(module, loss_name, x, **options):
    if loss_name.startswith("liger-"):
        # The Liger-compatible classes (fused_pref.compat.liger), weight first.
        cls = {"liger-simpo": liger.LigerFusedLinearSimPOLoss, "liger-dpo": liger.LigerFusedLinearDPOLoss}[loss_name]
        extra = {"ref_input": x["hidden"].detach().flip(0), "ref_weight": x["weight"].detach()} if "dpo" in loss_name \
            else {}
        loss, _ = cls(**options)(x["weight"], x["hidden"], x["labels"], x["bias"], **extra)
    elif loss_name == "simpo":
        loss = module.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], **options).loss
    elif loss_name == "dpo":
        loss = module.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"],
                               ref_hidden=x["hidden"].detach().flip(0), **options).loss
    else:
        loss = module.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], **options)
    loss.backward()


def _step(module, loss_name, device, **options):
    x = make_inputs(R, T, D, V, device=device, dtype=torch.float32)
    with AllocationRecorder() as recorder:
        _forward_backward(module, loss_name, x, **options)
    return recorder


@pytest.mark.parametrize("plan", DISTINCT_PLANS)
@pytest.mark.parametrize("loss_name", ["simpo", "dpo", "cross_entropy"])
def test_fused_never_allocates_tokens_by_vocab(loss_name, plan, device):
    with tile_plan(plan):
        recorder = _step(fused_pref, loss_name, device)
    largest = recorder.largest()
    assert len(recorder.allocations) > 10, "the recorder saw no allocations: it is not recording"
    assert largest.numel < R * T * V / 8, f"fused path allocated {largest}"


@pytest.mark.parametrize("loss_name", ["simpo", "cross_entropy"])
def test_the_check_catches_the_reference(loss_name, device):
    # The same measurement on the materializing reference must see the logits.
    largest = _step(fused_pref.reference, loss_name, device).largest()
    assert largest.numel >= R * T * V, f"reference's largest allocation was {largest}"


@pytest.mark.parametrize("loss_name, plan", [
    *[(loss, plan) for loss in ("simpo", "dpo", "cross_entropy") for plan in DISTINCT_PLANS],
    ("liger-simpo", DEFAULT_PLAN), ("liger-dpo", DEFAULT_PLAN),
])
def test_no_temporary_inside_an_op_outgrows_a_gradient(loss_name, plan, device):
    # The recorders above see each op's outputs, not the buffers an op allocates inside itself
    # (torch's weight.sum(dtype=float64) once copied a bf16 weight to fp64 whole: 4.2 GB at
    # Llama-3-8B, found by an H200's peak memory).  The profiler sees every allocation.  In bf16 no
    # allocation may exceed the largest gradient buffer, d_weight in bf16.  So a copy of the weight
    # in a wider dtype, or anything [N, V], fails.  D is a multiple of 16: the wide plan's tiles run.
    x = make_inputs(R, T, D, V, device=device, dtype=torch.bfloat16)
    if device == "cuda":
        # cuBLAS takes its workspace from the caching allocator on a stream's first product.
        with tile_plan(plan):
            _forward_backward(fused_pref, loss_name, x)
        x = make_inputs(R, T, D, V, device=device, dtype=torch.bfloat16)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with tile_plan(plan), profile(activities=activities, profile_memory=True) as profiler:
        _forward_backward(fused_pref, loss_name, x)
    usage = "self_device_memory_usage" if device == "cuda" else "self_cpu_memory_usage"
    largest = max(getattr(event, usage) for event in profiler.events())
    d_weight = V * D * 2
    if device == "cuda":
        d_weight = -(-d_weight // 512) * 512  # the caching allocator rounds blocks up to 512 bytes
    assert largest >= V * D * 2, "the profiler did not see d_weight: it is not recording allocations"
    assert largest <= d_weight, f"an allocation of {largest} bytes, more than d_weight's {d_weight}"
