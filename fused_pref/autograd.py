"""Thin autograd Functions over the kernels: save the inputs and the O(N) lse, recompute in backward."""

from dataclasses import dataclass

import torch

from .kernels import linear_lse_forward, preference_head_forward
from .kernels.linear_grad import WORKSPACE_BYTES, linear_grad_backward


@dataclass(frozen=True)
class LogprobParams:
    softcap: float | None = None
    logit_sum: bool = False               # also return the per-token sum of logits (metrics only)
    workspace_bytes: int = WORKSPACE_BYTES


class LinearLogprobs(torch.autograd.Function):
    """``logp[i] = z[i, label_i] - logsumexp(z[i])`` for valid rows, 0 elsewhere; ``z = hidden @ W.T + b``.

    Inputs: ``hidden`` ``[R, T, D]`` (any strides), ``weight`` ``[V, D]``, ``bias`` ``[V]`` or None,
    ``labels`` ``[R*T]`` int64, ``valid`` ``[R*T]`` bool, ``rows`` the int32 valid-first row index and
    ``n_valid`` its device-side valid count.  Outputs fp32 ``logp`` ``[R*T]`` and the per-token sum
    of logits over the vocabulary (empty unless ``params.logit_sum``; not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, rows, n_valid, params: LogprobParams):
        lse, target, logit_sum = linear_lse_forward(hidden, weight, bias, labels, rows, n_valid,
                                                    softcap=params.softcap, logit_sum=params.logit_sum)
        logp = torch.where(valid, target - lse, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, n_valid, lse)
        ctx.params = params
        logit_sum = torch.where(valid, logit_sum, 0.0) if params.logit_sum else logp.new_empty(0)
        ctx.mark_non_differentiable(logit_sum)
        return logp, logit_sum

    @staticmethod
    def backward(ctx, grad_logp, _grad_logit_sum):
        hidden, weight, bias, labels, rows, n_valid, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        d_hidden, d_weight, d_bias = linear_grad_backward(
            grad_logp, hidden, weight, bias, labels, rows, n_valid, lse,
            softcap=ctx.params.softcap, needs=needs, workspace_bytes=ctx.params.workspace_bytes)
        return d_hidden, d_weight, d_bias, None, None, None, None, None


class PreferenceHead(torch.autograd.Function):
    """Per-pair losses ``[B]`` from sequence log-probs ``[2B]`` (see ``kernels/pref_head.py``)."""

    @staticmethod
    def forward(ctx, logps, ref_logps, beta, gamma, label_smoothing):
        losses, dlogps = preference_head_forward(logps.contiguous(), ref_logps, beta=beta, gamma=gamma,
                                                 label_smoothing=label_smoothing)
        ctx.save_for_backward(dlogps)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (dlogps,) = ctx.saved_tensors
        return dlogps * grad_losses.repeat(2), None, None, None, None
