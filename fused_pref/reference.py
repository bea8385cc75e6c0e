"""The plain-PyTorch definition of every public function: logits materialized in fp32 (fp64 for
fp64 inputs), ``log_softmax``, ``gather``, masked sums and ``F.logsigmoid``.

Slow and memory-hungry by design, and part of the library: it shares each signature with
``fused_pref.functional`` so users can check parity in their own CI.  ``backend`` is accepted for
that parity and ignored (this module always computes in PyTorch).
"""

import torch
import torch.nn.functional as F

from . import validation as check
from .outputs import PreferenceOutput, preference_output


def _logits(hidden, weight, bias, softcap):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _token_logprobs(hidden, weight, labels, bias, *, ignore_index, softcap, validate, mean_over_sequences=False):
    valid = check.check_labels(labels, weight.shape[0], ignore_index=ignore_index, validate=validate,
                               mean_over_sequences=mean_over_sequences).valid
    z = _logits(hidden, weight, bias, softcap)
    picked = z.log_softmax(dim=-1).gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0), valid, z


def linear_logprobs(hidden, weight, labels, bias=None, *, ignore_index=-100, softcap=None,
                    validate=True, backend="auto"):
    """Reference of :func:`fused_pref.linear_logprobs`."""
    check.check_tensors(hidden, weight, labels, bias, dtypes=check.REFERENCE_DTYPES)
    check.check_options(softcap=softcap, ignore_index=ignore_index)
    logp, _, _ = _token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index,
                                 softcap=softcap, validate=validate)
    return logp


def _sequence_logprobs(hidden, weight, labels, bias, *, reduction, ignore_index, softcap, validate):
    logp, valid, z = _token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index,
                                     softcap=softcap, validate=validate,
                                     mean_over_sequences=reduction == "mean")
    sums = logp.sum(dim=-1)
    if reduction == "mean":
        sums = sums / valid.sum(dim=-1).clamp(min=1)
    logit_sums = torch.where(valid, z.sum(dim=-1), 0.0).sum(dim=-1)
    return sums, valid, logit_sums


def sequence_logprobs(hidden, weight, labels, bias=None, *, reduction="sum", ignore_index=-100,
                      softcap=None, validate=True, backend="auto"):
    """Reference of :func:`fused_pref.sequence_logprobs`."""
    check.check_tensors(hidden, weight, labels, bias, dtypes=check.REFERENCE_DTYPES, sequence_level=True)
    check.check_options(softcap=softcap, reduction=reduction, kind="sequence", ignore_index=ignore_index)
    return _sequence_logprobs(hidden, weight, labels, bias, reduction=reduction,
                              ignore_index=ignore_index, softcap=softcap, validate=validate)[0]


def linear_cross_entropy(hidden, weight, labels, bias=None, *, reduction="mean", ignore_index=-100,
                         softcap=None, validate=True, backend="auto"):
    """Reference of :func:`fused_pref.linear_cross_entropy`."""
    check.check_tensors(hidden, weight, labels, bias, dtypes=check.REFERENCE_DTYPES)
    check.check_options(softcap=softcap, reduction=reduction, kind="cross_entropy", ignore_index=ignore_index)
    logp, valid, _ = _token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index,
                                     softcap=softcap, validate=validate)
    if reduction == "none":
        return -logp
    total = -logp.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total


def _preference(logps, ref, valid, logit_sums, vocab_size, *, beta, gamma, label_smoothing):
    B = logps.shape[0] // 2
    margin = logps - (0.0 if ref is None else ref)
    x = beta * (margin[:B] - margin[B:]) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    return preference_output(losses.mean(), logps, beta * margin, logit_sums, valid, vocab_size)


def simpo_loss(hidden, weight, labels, bias=None, *, beta=2.0, gamma=1.0, label_smoothing=0.0,
               ignore_index=-100, softcap=None, validate=True, backend="auto") -> PreferenceOutput:
    """Reference of :func:`fused_pref.simpo_loss`."""
    check.check_tensors(hidden, weight, labels, bias, dtypes=check.REFERENCE_DTYPES, sequence_level=True)
    check.check_pairs(hidden)
    check.check_options(softcap=softcap, ignore_index=ignore_index)
    check.check_hyper(beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    logps, valid, logit_sums = _sequence_logprobs(hidden, weight, labels, bias, reduction="mean",
                                                  ignore_index=ignore_index, softcap=softcap, validate=validate)
    return _preference(logps, None, valid, logit_sums, weight.shape[0],
                       beta=beta, gamma=gamma, label_smoothing=label_smoothing)


def dpo_loss(hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None,
             ref_bias=None, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, ignore_index=-100,
             softcap=None, validate=True, backend="auto") -> PreferenceOutput:
    """Reference of :func:`fused_pref.dpo_loss`."""
    check.check_tensors(hidden, weight, labels, bias, dtypes=check.REFERENCE_DTYPES, sequence_level=True)
    check.check_pairs(hidden)
    check.check_options(softcap=softcap, ignore_index=ignore_index)
    check.check_hyper(beta=beta, label_smoothing=label_smoothing)
    ref_weight, ref_bias = check.check_dpo_reference(
        hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
        ref_bias=ref_bias, loss_type=loss_type, dtypes=check.REFERENCE_DTYPES)
    logps, valid, logit_sums = _sequence_logprobs(hidden, weight, labels, bias, reduction="sum",
                                                  ignore_index=ignore_index, softcap=softcap, validate=validate)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = _sequence_logprobs(ref_hidden, ref_weight, labels, ref_bias, reduction="sum",
                                           ignore_index=ignore_index, softcap=softcap, validate=False)[0]
    return _preference(logps, ref_logps.detach().to(logps.dtype), valid, logit_sums, weight.shape[0],
                       beta=beta, gamma=0.0, label_smoothing=label_smoothing)
