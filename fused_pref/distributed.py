"""Vocabulary parallelism over ``torch.distributed``: each rank holds a contiguous shard of the
lm_head (rows ``vocab_start .. vocab_start + V_local``), as Megatron-LM's tensor parallelism does.

The fused path exchanges only O(N) per-token numbers: the forward all-reduces the partial
log-sum-exp (MAX, then SUM of rescaled exponentials), the target logit (only its owner has it)
and the logit sums; the backward all-reduces the partial ``d_hidden``.  ``d_weight`` and
``d_bias`` stay on their shard.  The reference gathers the whole weight instead (for checking).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import validation


@dataclass(frozen=True)
class VocabShard:
    group: object        # the torch.distributed process group
    start: object        # first vocabulary id of this rank's shard: an int, or a 0-d device tensor
    size: int            # rows of this rank's weight
    total: object        # the whole vocabulary: an int, or a 0-d device tensor (reading it is a host sync)


def resolve_shard(weight, options) -> VocabShard | None:
    """This rank's shard, from one all-reduce of every rank's (vocab_start, rows).

    Without ``vocab_start`` the shards are taken in rank order (rank r starts after the rows of
    ranks 0..r-1: ``rank * V_local`` for equal shards, and right for torch.chunk and
    torch.tensor_split alike), computed on the device.  Only ``validate`` reads the table back to
    check that the shards tile ``[0, V)``: that is the one host synchronisation."""
    group = options.process_group
    if group is None:
        return None
    vocab_start = -1 if options.vocab_start is None else options.vocab_start
    spans = _shard_spans(weight.device, group, vocab_start, weight.shape[0])
    rows = spans[:, 1]
    starts = torch.where(spans[:, 0] < 0, rows.cumsum(0) - rows, spans[:, 0])
    start, total = starts[dist.get_rank(group)], rows.sum()
    if options.validate:
        table = torch.stack([starts, rows], dim=1).tolist()
        validation.check_shards(table)
        start, total = table[dist.get_rank(group)][0], sum(size for _, size in table)
    return VocabShard(group, start, weight.shape[0], total)


def _shard_spans(device, group, start, size):
    """[world, 2] (vocab_start, rows) of every rank, by one all-reduce; ``start`` may be a 0-d tensor."""
    spans = torch.zeros(dist.get_world_size(group), 2, dtype=torch.int64, device=device)
    spans[dist.get_rank(group), 0] = start
    spans[dist.get_rank(group), 1] = size
    dist.all_reduce(spans, group=group)
    return spans


def combine_partials(lse, target, logit_sum, shard: VocabShard):
    """Global per-token (lse, target, logit_sum) from every rank's partials; ``lse`` must be finite."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=shard.group)
    parts = [torch.exp(lse - top), target] + ([logit_sum] if logit_sum.numel() else [])
    summed = torch.stack(parts)
    dist.all_reduce(summed, group=shard.group)
    return top + torch.log(summed[0]), summed[1], summed[2] if logit_sum.numel() else logit_sum


def all_reduce_sum(tensor, shard: VocabShard):
    dist.all_reduce(tensor, group=shard.group)
    return tensor


class _GatherShards(torch.autograd.Function):
    """All ranks' shards in vocabulary order; backward keeps this rank's rows of the (replicated)
    gradient, since every rank computes the same loss from the same gathered weight."""

    @staticmethod
    def forward(ctx, local, shard: VocabShard):
        world = dist.get_world_size(shard.group)
        spans = _shard_spans(local.device, shard.group, shard.start, shard.size)
        rows = int(spans[:, 1].max())
        padded = local.new_zeros((rows, *local.shape[1:]))
        padded[: shard.size] = local
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous(), group=shard.group)
        order = sorted(range(world), key=lambda r: int(spans[r, 0]))
        # The reference path, which reads sizes back to the host anyway (it materializes the logits).
        ctx.start, ctx.size = int(shard.start), shard.size
        return torch.cat([gathered[r][: int(spans[r, 1])] for r in order])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start: ctx.start + ctx.size], None


def gather_shards(local, shard: VocabShard):
    return None if local is None else _GatherShards.apply(local, shard)
