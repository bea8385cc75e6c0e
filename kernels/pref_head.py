"""The per-pair preference head: loss and d loss / d logps for each pair.

With ``c``, ``r`` the chosen and rejected sequence log-probs (rows ``j`` and ``j + B``), and
``c_ref``, ``r_ref`` the reference model's when ``HAS_REF``:

    x    = beta * ((c - c_ref) - (r - r_ref)) - gamma
    loss = -(1 - eps) * log sigmoid(x) - eps * log sigmoid(-x)        (eps: label smoothing)

SimPO is ``HAS_REF=False`` with length-averaged logps; DPO (sigmoid, cDPO smoothing) is
``HAS_REF=True, gamma=0`` with summed logps.  The head is O(B); it is a kernel so the whole step
stays on the device with no host round trip.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def log_sigmoid(x):
    # Stable for |x| up to fp32's range: exp(-|x|) never overflows.
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def preference_head_kernel(
    # pointers
    logps_ptr, ref_ptr, loss_ptr, dlogps_ptr,
    # sizes
    B,
    # scalars
    beta, gamma, label_smoothing,
    # variants
    HAS_REF: tl.constexpr,
    # tiles
    BLOCK_B: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = offs < B
    chosen = tl.load(logps_ptr + offs, mask=mask, other=0.0)
    rejected = tl.load(logps_ptr + B + offs, mask=mask, other=0.0)
    margin = chosen - rejected
    if HAS_REF:
        margin -= tl.load(ref_ptr + offs, mask=mask, other=0.0) - tl.load(ref_ptr + B + offs, mask=mask, other=0.0)
    x = beta * margin - gamma
    loss = -(1.0 - label_smoothing) * log_sigmoid(x) - label_smoothing * log_sigmoid(-x)
    dloss_dx = -(1.0 - label_smoothing) * tl.sigmoid(-x) + label_smoothing * tl.sigmoid(x)
    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(dlogps_ptr + offs, beta * dloss_dx, mask=mask)
    tl.store(dlogps_ptr + B + offs, -beta * dloss_dx, mask=mask)


BLOCK_B = 128


def preference_head_forward(logps, ref_logps, *, beta, gamma, label_smoothing):
    """Per-pair losses ``[B]`` and ``d loss_j / d logps`` ``[2B]`` (fp32) for ``logps`` ``[2B]``."""
    B = logps.numel() // 2
    losses = torch.empty(B, device=logps.device, dtype=torch.float32)
    dlogps = torch.empty(2 * B, device=logps.device, dtype=torch.float32)
    preference_head_kernel[(triton.cdiv(B, BLOCK_B),)](
        logps, logps if ref_logps is None else ref_logps, losses, dlogps,
        B,
        float(beta), float(gamma), float(label_smoothing),
        HAS_REF=ref_logps is not None,
        BLOCK_B=BLOCK_B,
    )
    return losses, dlogps


__all__ = ["preference_head_forward", "preference_head_kernel", "BLOCK_B"]
