"""Thin autograd Functions over the kernels: save the inputs and the O(N) lse, recompute in backward."""

from dataclasses import dataclass

import functools

import torch

from . import ops
from .distributed import VocabShard, all_reduce_sum, combine_partials
from .options import Options

NO_SECOND_DERIVATIVE = ("fused_pref's kernels have no second derivative: a gradient computed with create_graph=True "
                        "cannot be differentiated again.  Where you need one (a gradient penalty, a Hessian-vector "
                        "product), call the loss from fused_pref.reference, which holds the logits")


class _RefuseSecondDerivative(torch.autograd.Function):
    """The identity on a backward's gradients, whose own backward raises ``NO_SECOND_DERIVATIVE``.
    ``anchor`` requires grad so that the gradients do too, even where nothing upstream of them did
    (a mean cross-entropy's constant ``dLoss/dlogp``)."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        # Copies, not the inputs: returned as they are, they would be views that refuse in-place edits.
        return tuple(None if g is None else g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(NO_SECOND_DERIVATIVE)


def first_order(backward):
    """A Function's ``backward`` run without a graph, as the kernels' are.  Under
    ``create_graph=True`` its gradients come through ``_RefuseSecondDerivative``: a second
    derivative then fails with a message, not silently 0 (the kernels' gradients carry no graph,
    and a penalty on gradients that do not require grad is a constant)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        device = next(g.device for g in grads if isinstance(g, torch.Tensor))
        anchor = torch.empty(0, device=device, requires_grad=True)
        return _RefuseSecondDerivative.apply(anchor, *grads)

    return wrapper


@dataclass(frozen=True)
class LogprobParams:
    """What a call fixes for its kernels: the options (``ops`` reads the ones a kernel takes), and
    what this call resolved from them and from its loss."""

    options: Options
    plan: str                             # the tile plan (kernels/tiles.py), the same forward and backward
    shard: VocabShard | None = None       # this rank's vocabulary shard under vocab parallelism
    logit_sum: bool = False               # also return the per-token sum of logits (metrics only)
    token_stats: bool = False             # also return the per-token entropy and argmax
    lse_terms: bool = False               # also return the lse, and the logit sum differentiable (z-loss, smoothing)


class LinearLogprobs(torch.autograd.Function):
    """``logp[i] = z[i, label_i] - logsumexp(z[i])`` for valid rows, 0 elsewhere; ``z = hidden @ W.T + b``.

    Inputs: ``hidden`` ``[R, T, D]`` (any strides), ``weight`` ``[V, D]``, ``bias`` ``[V]`` or None,
    ``labels`` ``[R*T]`` int64, ``valid`` ``[R*T]`` bool, ``rows`` the int32 valid-first row index,
    ``n_valid`` its device-side valid count, and ``class_weight`` fp32 ``[V]`` or None, the per-class
    weights of the logit sum (a class-weighted label smoothing; a constant).  Outputs fp32 ``logp`` ``[R*T]``, the per-token sum
    of logits over the vocabulary (empty unless ``params.logit_sum``; not differentiable), and the
    per-token entropy (fp32, differentiable) and argmax (int64) of the softmax (empty unless
    ``params.token_stats``; 0 and -1 at ignored rows), and the per-token log-sum-exp (fp32, 0 at
    ignored rows, empty unless ``params.lse_terms``, which also makes the logit sum differentiable:
    the terms of a z-loss and of label smoothing).  Every differentiable output's gradient goes
    into the one backward kernel as a per-row weight.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, rows, n_valid, class_weight, params: LogprobParams):
        lse, target, logit_sum, entropy, argmax, max_logit = ops.forward(hidden, weight, bias, labels, rows, n_valid,
                                                                         params, class_weight)
        # The backward's one-hot term at the label is this rank's target logit, as its tiles round it.
        tile_target = target
        if params.shard is not None:
            # Ignored rows hold 0, or under "cublas" without validation their own values, which a
            # padding position's hidden state may make non-finite: zeroed, so MAX and exp stay finite.
            lse = torch.where(valid, lse, 0.0)
            stats = None
            if params.token_stats:
                stats = (torch.where(valid, entropy, 0.0), torch.where(valid, argmax, 0),
                         torch.where(valid, max_logit, 0.0))
            lse, target, logit_sum, stats = combine_partials(lse, target, logit_sum, params.shard.group, stats,
                                                              params.shard.start)
            if params.token_stats:
                entropy, argmax = stats
        logp = torch.where(valid, target - lse, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, n_valid, lse, tile_target, entropy, class_weight)
        ctx.params = params
        if params.logit_sum:
            logit_sum = torch.where(valid, logit_sum, 0.0)
        if params.token_stats:
            entropy, argmax = torch.where(valid, entropy, 0.0), torch.where(valid, argmax, -1)
        lse_out = torch.where(valid, lse, 0.0) if params.lse_terms else lse.new_empty(0)
        ctx.mark_non_differentiable(*((argmax,) if params.lse_terms else (logit_sum, argmax)))
        # Outputs no loss uses reach the backward as None, not zeros: the entropy's weights go into
        # the backward kernel only when a loss uses it.
        ctx.set_materialize_grads(False)
        return logp, logit_sum, entropy, argmax, lse_out

    @staticmethod
    @first_order
    def backward(ctx, grad_logp, grad_logit_sum, grad_entropy, _grad_argmax, grad_lse):
        hidden, weight, bias, labels, rows, n_valid, lse, target, entropy, class_weight = ctx.saved_tensors
        params = ctx.params
        # torch.compile's traced backward gets zeros, not None, for the (empty) outputs not asked for.
        if not params.token_stats:
            grad_entropy = None
        if not params.lse_terms:
            grad_lse = None
        if not (params.lse_terms and params.logit_sum):
            grad_logit_sum = None
        if grad_logp is None and grad_entropy is None and grad_lse is None and grad_logit_sum is None:
            return None, None, None, None, None, None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        needs = ctx.needs_input_grad[:3]
        mean_z = None if grad_entropy is None else lse - entropy
        grads = ops.backward(grad_logp, hidden, weight, bias, labels, rows, n_valid, lse, target, needs, params,
                             grad_lse, grad_logit_sum, grad_entropy, mean_z, class_weight)
        d_hidden, d_weight, d_bias = (g if need else None for g, need in zip(grads, needs))
        if d_hidden is not None and params.shard is not None:
            d_hidden = all_reduce_sum(d_hidden, params.shard.group)  # each rank saw only its vocabulary
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


class PreferenceHead(torch.autograd.Function):
    """Per-pair losses ``[B]`` from chosen / rejected log-probs ``[B]`` (see ``kernels/pref_head.py``);
    the reference log-probs, when given, are constants."""

    @staticmethod
    def forward(ctx, chosen, rejected, ref_chosen, ref_rejected, spec):
        def fp32(t):
            return None if t is None else t.detach().float().contiguous()

        losses, d_chosen, d_rejected = ops.head(fp32(chosen), fp32(rejected), fp32(ref_chosen), fp32(ref_rejected),
                                                spec)
        ctx.save_for_backward(d_chosen, d_rejected)
        return losses

    @staticmethod
    @first_order
    def backward(ctx, grad_losses):
        d_chosen, d_rejected = ctx.saved_tensors
        return d_chosen * grad_losses, d_rejected * grad_losses, None, None, None


class GradientsInForward(torch.autograd.Function):
    """A loss whose gradients w.r.t. ``hidden``, ``weight`` and ``bias`` were computed with it
    (``fused_pref.gradient_in_forward``; None where not needed); the backward scales them by
    ``grad_output``: one product in fp32 rounded to the gradient's dtype (exact when ``grad_output``
    is a power of two, e.g. 1 or a loss scale)."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, d_hidden, d_weight, d_bias):
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        return loss.clone()

    @staticmethod
    @first_order
    def backward(ctx, grad_loss):
        # A 0-d fp32 factor leaves a bf16 tensor bf16 and multiplies in fp32; fp16 inputs' gradients
        # come fp32 and are cast after the scaling.
        grads = (None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return (None, *grads, None, None, None)
