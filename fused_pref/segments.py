"""Sequence layouts: padded ``[R, T]`` or packed ``[N]`` with ``cu_seqlens`` ``[R + 1]``.

O(N) index work only; nothing here touches ``hidden``.
"""

import torch


def shift_labels(labels, ignore_index, cu_seqlens=None):
    """Hugging Face's shift as a relabelling: position t is trained on ``labels[t + 1]`` of its own
    sequence, and the last position of each sequence on nothing (``ignore_index``).  ``hidden``
    keeps its layout, so ``hidden[t]`` predicts the returned ``labels[t]``."""
    if cu_seqlens is None:
        pad = torch.full_like(labels[..., :1], ignore_index)
        return torch.cat([labels[..., 1:], pad], dim=-1)
    last = torch.zeros_like(labels, dtype=torch.bool)
    # cu_seqlens[1:] - 1 is each sequence's last position; an empty first sequence gives -1,
    # which wraps to N - 1, the last position of the batch, last anyway.  Clamped: values past N
    # are refused by validation, which reads them after this runs (and an index past the end
    # would be an IndexError here, a device-side assert on a GPU).
    last[(cu_seqlens[1:].long() - 1).clamp(-1, labels.numel() - 1)] = True
    last[-1] = True
    return torch.where(last, ignore_index, labels.roll(-1))


def sequence_sums(values, cu_seqlens=None):
    """Per-sequence sums ``[R]`` of per-token ``values`` (``[R, T]``, or ``[N]`` with ``cu_seqlens``).

    Packed sums difference an fp64 prefix sum: deterministic on every device (no atomics) and
    exact to fp32 for any realistic N."""
    if cu_seqlens is None:
        return values.sum(dim=-1)
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    # Clamped into [0, N] as shift_labels clamps: validation reads cu_seqlens' range after this.
    cu = cu_seqlens.long().clamp(0, values.numel())
    return (prefix[cu[1:]] - prefix[cu[:-1]]).to(values.dtype if values.dtype.is_floating_point else torch.int64)


def token_weights(valid, targets, ce_weight=None):
    """The weight of each token in a cross-entropy, fp32 (fp64 for fp64 ``ce_weight``): 1, or
    ``ce_weight[label]`` (per-class weights, as ``F.cross_entropy``'s ``weight``); 0 where ignored."""
    if ce_weight is None:
        return valid.float()
    per_class = ce_weight.detach().to(torch.promote_types(ce_weight.dtype, torch.float32))
    return torch.where(valid, per_class[torch.where(valid, targets, 0)], 0.0)


def reduce_token_losses(losses, weights, reduction):
    """``F.cross_entropy``'s reductions of per-token ``losses`` under ``weights`` (``token_weights``):
    ``"none"`` weighted per token, ``"sum"``, ``"mean"`` divided by the weights' sum, whatever its
    sign (:func:`weights_divisor`)."""
    return reduce_weighted_losses(losses * weights, weights, reduction)


def reduce_weighted_losses(weighted, weights, reduction):
    """As :func:`reduce_token_losses` for per-token losses already weighted (label smoothing weighs
    its uniform part by every class's weight, not the label's)."""
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    return total / weights_divisor(weights.sum())


def weights_divisor(total):
    """What a mean under weights summing to ``total`` divides by, as ``F.cross_entropy``: ``total``,
    whatever its sign; inf where it is 0, so that the mean is 0 (and its gradient), not NaN, even where
    what it divides is not 0 (label smoothing's uniform part, weights of both signs)."""
    return torch.where(total != 0, total, torch.inf)
