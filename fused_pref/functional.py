"""The public functions.  Each validates its inputs, picks the path (Triton or reference) and, on the
Triton path, never materializes the ``[tokens, vocab]`` logits, forward or backward.

Device policy (``backend="auto"``): CUDA tensors take the Triton kernels; CPU tensors take them when
``TRITON_INTERPRET=1`` was set before ``fused_pref`` was imported (Triton's interpreter), otherwise
the reference path, with a one-time warning.  ``backend="triton"`` or ``"reference"`` forces a path.
"""

import warnings
from dataclasses import dataclass

import torch

from . import reference
from . import validation as check
from .autograd import LinearLogprobs, LogprobParams, PreferenceHead
from .kernels import KERNELS_INTERPRETED
from .outputs import PreferenceOutput, preference_output

BACKENDS = ("auto", "triton", "reference")
_warned_cpu_fallback = False


def _use_triton(device: torch.device, backend: str) -> bool:
    global _warned_cpu_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    runnable = device.type == "cuda" or (device.type == "cpu" and KERNELS_INTERPRETED)
    if backend == "triton" and not runnable:
        raise ValueError(f"backend='triton' cannot run on {device} tensors: use CUDA tensors, or set "
                         "TRITON_INTERPRET=1 before importing fused_pref to run the kernels on the CPU")
    if backend == "auto" and not runnable and not _warned_cpu_fallback:
        _warned_cpu_fallback = True
        warnings.warn(f"fused_pref: no Triton backend for {device} tensors (no CUDA and "
                      "TRITON_INTERPRET is not set); using the PyTorch reference, which materializes "
                      "the logits", stacklevel=3)
    return backend == "triton" or (backend == "auto" and runnable)


@dataclass
class _TokenLogprobs:
    logp: torch.Tensor          # fp32, shape of labels, 0 where ignored
    valid: torch.Tensor         # bool, shape of labels
    logit_sum: torch.Tensor     # fp32 per-token sum of logits over the vocabulary (or empty)


def _token_logprobs(hidden, weight, labels, bias, *, ignore_index, softcap, validate,
                    mean_over_sequences=False, logit_sum=False) -> _TokenLogprobs:
    checked = check.check_labels(labels, weight.shape[0], ignore_index=ignore_index, validate=validate,
                                 mean_over_sequences=mean_over_sequences)
    hidden3 = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    labels_flat = labels.reshape(-1).long()
    valid_flat = checked.valid.reshape(-1)
    # Valid rows first, in order: kernels read only the first n_valid and skip the rest on the
    # device.  When validation synchronised anyway, the index is cut to the exact count.
    rows = torch.argsort(~valid_flat, stable=True).to(torch.int32)
    if checked.n_valid is not None:
        rows = rows[: checked.n_valid]
    n_valid = valid_flat.sum(dtype=torch.int32).reshape(1)
    params = LogprobParams(softcap=None if softcap is None else float(softcap), logit_sum=logit_sum)
    logp, sums = LinearLogprobs.apply(hidden3, weight, bias, labels_flat, valid_flat, rows, n_valid, params)
    shape = labels.shape
    return _TokenLogprobs(logp.view(shape), checked.valid, sums.view(shape) if logit_sum else sums)


def linear_logprobs(hidden, weight, labels, bias=None, *, ignore_index=-100, softcap=None,
                    validate=True, backend="auto"):
    """Per-token log-probabilities of ``labels`` under ``softmax(hidden @ weight.T + bias)``.

    ``hidden`` ``[N, D]`` or ``[R, T, D]`` (fp32, bf16 or fp16; strided views are read in place),
    ``weight`` ``[V, D]`` and ``bias`` ``[V]`` of the same dtype, ``labels`` of shape
    ``hidden.shape[:-1]`` with values in ``[0, V)`` or ``ignore_index``.  Returns fp32 of the shape
    of ``labels``, 0 at ignored positions::

        z = hidden @ weight.T + bias;  z = softcap * tanh(z / softcap) if softcap
        logp[i] = z[i, labels[i]] - logsumexp(z[i])

    ``validate=False`` skips the value checks that need a host sync (label range).

    >>> logp = fused_pref.linear_logprobs(h, lm_head.weight, labels)   # [B, T]
    """
    check.check_tensors(hidden, weight, labels, bias)
    check.check_options(softcap=softcap, ignore_index=ignore_index)
    if not _use_triton(hidden.device, backend):
        return reference.linear_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index,
                                         softcap=softcap, validate=validate)
    return _token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap,
                           validate=validate).logp


def _sequence_sums(tokens: _TokenLogprobs, reduction):
    sums = tokens.logp.sum(dim=-1)
    if reduction == "mean":
        # Validation rejects empty sequences; with validate=False an empty one gives 0, not NaN.
        sums = sums / tokens.valid.sum(dim=-1).clamp(min=1)
    return sums


def sequence_logprobs(hidden, weight, labels, bias=None, *, reduction="sum", ignore_index=-100,
                      softcap=None, validate=True, backend="auto"):
    """Per-sequence log-probabilities ``[R]`` (fp32) of ``labels`` ``[R, T]`` given ``hidden`` ``[R, T, D]``.

    ``reduction="sum"`` adds the token log-probs (DPO); ``"mean"`` divides by the number of valid
    tokens of each sequence (SimPO's length normalisation; a sequence with no valid token is an
    error under validation).  Other arguments as :func:`linear_logprobs`.

    >>> logps = fused_pref.sequence_logprobs(h, lm_head.weight, labels, reduction="mean")   # [R]
    """
    check.check_tensors(hidden, weight, labels, bias, sequence_level=True)
    check.check_options(softcap=softcap, reduction=reduction, kind="sequence", ignore_index=ignore_index)
    if not _use_triton(hidden.device, backend):
        return reference.sequence_logprobs(hidden, weight, labels, bias, reduction=reduction,
                                           ignore_index=ignore_index, softcap=softcap, validate=validate)
    tokens = _token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap,
                             validate=validate, mean_over_sequences=reduction == "mean")
    return _sequence_sums(tokens, reduction)


def linear_cross_entropy(hidden, weight, labels, bias=None, *, reduction="mean", ignore_index=-100,
                         softcap=None, validate=True, backend="auto"):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, without the logits.

    Equals ``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=..., reduction=...)``
    in fp32, except that a batch with no valid label gives 0 (not NaN) under ``"mean"``.
    ``reduction``: ``"mean"`` over valid tokens (default), ``"sum"``, or ``"none"`` (fp32, shape of
    ``labels``, 0 at ignored positions).  Other arguments as :func:`linear_logprobs`.

    >>> loss = fused_pref.linear_cross_entropy(h, lm_head.weight, labels)
    """
    check.check_tensors(hidden, weight, labels, bias)
    check.check_options(softcap=softcap, reduction=reduction, kind="cross_entropy", ignore_index=ignore_index)
    if not _use_triton(hidden.device, backend):
        return reference.linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction,
                                              ignore_index=ignore_index, softcap=softcap, validate=validate)
    tokens = _token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap,
                             validate=validate)
    if reduction == "none":
        return -tokens.logp
    total = -tokens.logp.sum()
    return total / tokens.valid.sum().clamp(min=1) if reduction == "mean" else total


def _preference(tokens: _TokenLogprobs, reduction, ref_logps, vocab_size, *, beta, gamma, label_smoothing):
    logps = _sequence_sums(tokens, reduction)
    losses = PreferenceHead.apply(logps, ref_logps, beta, gamma, label_smoothing)
    margin = logps.detach() - (0.0 if ref_logps is None else ref_logps)
    return preference_output(losses.mean(), logps, beta * margin, tokens.logit_sum.sum(dim=-1),
                             tokens.valid, vocab_size)


def simpo_loss(hidden, weight, labels, bias=None, *, beta=2.0, gamma=1.0, label_smoothing=0.0,
               ignore_index=-100, softcap=None, validate=True, backend="auto") -> PreferenceOutput:
    """SimPO (Meng et al., 2024): reference-free, length-normalised preference loss.

    ``hidden`` ``[2B, T, D]`` and ``labels`` ``[2B, T]`` hold B chosen sequences then their B
    rejected ones (pair j is rows j and j+B).  With ``S`` the mean token log-prob of a sequence::

        x_j  = beta * (S[j] - S[j+B]) - gamma
        loss = mean_j  -(1 - eps) * log sigmoid(x_j) - eps * log sigmoid(-x_j)     (eps = label_smoothing)

    Defaults ``beta=2.0``, ``gamma=1.0`` (the reward margin), ``label_smoothing=0.0``.  Rewards are
    ``beta * S``.  Returns a :class:`PreferenceOutput`; ``.metrics()`` gives TRL's names.

    >>> out = fused_pref.simpo_loss(h, lm_head.weight, labels, beta=2.5, gamma=1.4)
    >>> out.loss.backward()
    """
    check.check_tensors(hidden, weight, labels, bias, sequence_level=True)
    check.check_pairs(hidden)
    check.check_options(softcap=softcap, ignore_index=ignore_index)
    check.check_hyper(beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    if not _use_triton(hidden.device, backend):
        return reference.simpo_loss(hidden, weight, labels, bias, beta=beta, gamma=gamma,
                                    label_smoothing=label_smoothing, ignore_index=ignore_index,
                                    softcap=softcap, validate=validate)
    tokens = _token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap,
                             validate=validate, mean_over_sequences=True, logit_sum=True)
    return _preference(tokens, "mean", None, weight.shape[0], beta=beta, gamma=gamma,
                       label_smoothing=label_smoothing)


def dpo_loss(hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None,
             ref_bias=None, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, ignore_index=-100,
             softcap=None, validate=True, backend="auto") -> PreferenceOutput:
    """DPO (Rafailov et al., 2023) on summed sequence log-probs, with cDPO label smoothing.

    Layout as :func:`simpo_loss`.  The reference model enters either as ``ref_logps`` ``[2B]``
    (precomputed summed log-probs) or as ``ref_hidden`` ``[2B, T, D_ref]`` with ``ref_weight``
    ``[V, D_ref]`` / ``ref_bias`` (default: the policy's ``weight`` and ``bias``), from which the
    library computes the log-probs with the fused forward under ``no_grad``.  With ``S``, ``Ref``
    the summed log-probs::

        x_j  = beta * ((S[j] - Ref[j]) - (S[j+B] - Ref[j+B]))
        loss = mean_j  -(1 - eps) * log sigmoid(x_j) - eps * log sigmoid(-x_j)     (loss_type="sigmoid")

    Defaults ``beta=0.1``, ``label_smoothing=0.0``.  Rewards are ``beta * (S - Ref)``.

    >>> out = fused_pref.dpo_loss(h, lm_head.weight, labels, ref_hidden=h_ref)
    """
    check.check_tensors(hidden, weight, labels, bias, sequence_level=True)
    check.check_pairs(hidden)
    check.check_options(softcap=softcap, ignore_index=ignore_index)
    check.check_hyper(beta=beta, label_smoothing=label_smoothing)
    ref_weight, ref_bias = check.check_dpo_reference(
        hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
        ref_bias=ref_bias, loss_type=loss_type)
    if not _use_triton(hidden.device, backend):
        return reference.dpo_loss(hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden,
                                  ref_weight=ref_weight, ref_bias=ref_bias, beta=beta, loss_type=loss_type,
                                  label_smoothing=label_smoothing, ignore_index=ignore_index,
                                  softcap=softcap, validate=validate)
    tokens = _token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap,
                             validate=validate, logit_sum=True)
    if ref_logps is None:
        with torch.no_grad():
            ref_tokens = _token_logprobs(ref_hidden, ref_weight, labels, ref_bias, ignore_index=ignore_index,
                                         softcap=softcap, validate=False)
        ref_logps = _sequence_sums(ref_tokens, "sum")
    return _preference(tokens, "sum", ref_logps.detach().float().contiguous(), weight.shape[0],
                       beta=beta, gamma=0.0, label_smoothing=label_smoothing)
