"""Vocabulary parallelism over ``torch.distributed``: each rank holds a contiguous shard of the
lm_head (rows ``vocab_start .. vocab_start + V_local``), as Megatron-LM's tensor parallelism does.

The fused path exchanges only O(N) per-token numbers: the forward all-reduces the partial
log-sum-exp (MAX, then SUM of rescaled exponentials), the target logit (only its owner has it),
the logit sums and, for the per-token statistics, each shard's entropy, max logit and
argmax; the backward all-reduces the partial ``d_hidden``.  ``d_weight`` and
``d_bias`` stay on their shard.  The reference gathers the whole weight instead (for checking).
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import validation

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:   # pragma: no cover - a torch built without distributed
    DTensor = Shard = None


@dataclass(frozen=True)
class VocabShard:
    group: object        # the torch.distributed process group
    start: object        # first vocabulary id of this rank's shard: an int, or a 0-d device tensor
    size: int            # rows of this rank's weight
    total: object        # the whole vocabulary: an int, or a 0-d device tensor (reading it is a host sync)
    widest: object       # the largest shard's rows, likewise


def resolve_shard(weight, options) -> VocabShard | None:
    """This rank's shard, from one all-reduce of every rank's (vocab_start, rows).

    Without ``vocab_start`` the shards are taken in rank order (rank r starts after the rows of
    ranks 0..r-1: ``rank * V_local`` for equal shards, and right for torch.chunk and
    torch.tensor_split alike), computed on the device.  Only ``validate`` reads the table back to
    check that the shards tile ``[0, V)``, none without rows: that is the one host synchronisation."""
    group = options.process_group
    if group is None:
        return None
    vocab_start = -1 if options.vocab_start is None else options.vocab_start
    spans = _shard_spans(weight.device, group, vocab_start, weight.shape[0])
    rows = spans[:, 1]
    starts = torch.where(spans[:, 0] < 0, rows.cumsum(0) - rows, spans[:, 0])
    start, total, widest = starts[dist.get_rank(group)], rows.sum(), rows.max()
    if validation.reads_back(options.validate):
        table = torch.stack([starts, rows], dim=1).tolist()
        validation.check_shards(table)
        start, total = table[dist.get_rank(group)][0], sum(size for _, size in table)
        widest = max(size for _, size in table)
    elif weight.shape[0] == 0:
        # Without the table this rank alone knows: the others will wait at the next collective.
        raise ValueError("this rank's weight shard has no vocabulary rows (every rank needs at least one; "
                         "with validate=True every rank refuses, from the table of shards)")
    return VocabShard(group, start, weight.shape[0], total, widest)


def _shard_spans(device, group, start, size):
    """[world, 2] (vocab_start, rows) of every rank, by one all-reduce; ``start`` may be a 0-d tensor."""
    spans = torch.zeros(dist.get_world_size(group), 2, dtype=torch.int64, device=device)
    spans[dist.get_rank(group), 0] = start
    spans[dist.get_rank(group), 1] = size
    dist.all_reduce(spans, group=group)
    return spans


def combine_partials(lse, target, logit_sum, group, stats=None, start=0):
    """Global per-token ``(lse, target, logit_sum, stats)`` from the partials of every rank of
    ``group``; ``lse`` must be finite.  ``stats``: None, or this rank's ``(entropy, argmax,
    max_logit)`` over its shard (the argmax a column of the shard, whose first vocabulary id is
    ``start``; every value finite), which come back as the global ``(entropy,
    argmax)``: the entropy is ``sum_r exp(l_r - lse) (lse - l_r + H_r)`` over the ranks' partial lse
    ``l_r`` and entropies ``H_r`` (terms >= 0, without ``lse - E[z]``'s cancellation), and the argmax
    the lowest vocabulary id holding the max logit, as ``torch.argmax`` takes the first.  Two all-reduces, four with ``stats``."""
    # Copies reduced in place, read after beside the originals.  Not one stacked tensor: Inductor
    # (torch 2.13) wrote the stack's inputs into the stack's own buffer, so the in-place reduce
    # changed them too and a compiled call gave wrong log-probs.
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    if stats is not None:
        best = stats[2].clone()
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    weight = torch.exp(lse - top)
    parts = [weight, target] + ([logit_sum] if logit_sum.numel() else [])
    if stats is not None:
        # Every term >= 0 (lse - E[z] would cancel to the rounding of the largest logit).
        parts.append(weight * (top - lse + stats[0]))
    summed = torch.stack(parts)
    dist.all_reduce(summed, group=group)
    total_lse = top + torch.log(summed[0])
    total_sum = summed[2] if logit_sum.numel() else logit_sum
    if stats is None:
        return total_lse, summed[1], total_sum, None
    entropy = torch.log(summed[0]) + summed[-1] / summed[0]
    none = torch.iinfo(torch.int64).max
    argmax = torch.where(stats[2] == best, stats[1] + start, none)
    dist.all_reduce(argmax, op=dist.ReduceOp.MIN, group=group)
    # A NaN max logit equals nothing on any rank: -1, as at an ignored row, not an id past V.
    return total_lse, summed[1], total_sum, (entropy, torch.where(argmax == none, -1, argmax))


def shard_start(shard: VocabShard, device) -> torch.Tensor:
    """The shard's first vocabulary id as a 0-d int64 tensor on ``device``: the shard's own when it is
    one, else a fill (no copy from the host)."""
    if torch.is_tensor(shard.start):
        return shard.start
    return torch.full((), shard.start, dtype=torch.int64, device=device)


def shard_rows(tensor, shard: VocabShard):
    """This rank's rows of a whole-vocabulary ``tensor`` (``[V, ...]``), without a host read when
    the shard's start is a device tensor."""
    if isinstance(shard.start, int):
        return tensor[shard.start: shard.start + shard.size]
    return tensor.index_select(0, shard.start + torch.arange(shard.size, device=tensor.device))


def all_reduce_sum(tensor, group):
    dist.all_reduce(tensor, group=group)
    return tensor


def group_name(group) -> str | None:
    """``group``'s name (None for None), under which ``group_named`` finds it again: a custom op's
    schema takes strings, not groups (``fused_pref.ops``)."""
    return None if group is None else group.group_name


def group_named(name: str | None):
    # torch's own registry of live groups, as its functional collectives resolve theirs (a dict of
    # our own, filled where the op is called, is not filled by a torch.compile'd caller).
    return None if name is None else dist.distributed_c10d._resolve_process_group(name)


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


# The public functions' positional parameters, and the arguments that hold vocabulary rows.
POSITIONAL = ("hidden", "weight", "labels", "bias")
_VOCABULARY_ROWS = ("weight", "bias", "ref_weight", "ref_bias")


def from_dtensors(args, kwargs, options):
    """``(args, kwargs, options)`` with DTensor arguments replaced by the call they describe.

    A ``weight`` (and ``bias``, ``ref_weight``, ``ref_bias``) sharded on the vocabulary, ``Shard(0)``
    on a 1-D mesh as ``ColwiseParallel`` leaves an lm_head, becomes this rank's local shard under
    the mesh's process group (the shards of ``torch.chunk``, in rank order: the default
    ``vocab_start``); every other DTensor must be replicated and becomes its local tensor.
    ``to_local`` is differentiable, so the gradients come back as DTensors with the inputs'
    placements (``d_hidden`` replicated, ``d_weight`` sharded like the weight)."""
    if DTensor is None or len(args) > len(POSITIONAL):
        return args, kwargs, options    # (more positional arguments than any function takes: its TypeError)
    named = {**dict(zip(POSITIONAL, args)), **kwargs}
    given = {name: value for name, value in named.items() if isinstance(value, DTensor)}
    if not given:
        return args, kwargs, options
    meshes = {value.device_mesh for value in given.values()}
    sharded = []
    for name, value in given.items():
        if value.device_mesh.ndim != 1 or len(meshes) != 1:
            raise ValueError("DTensor arguments must share one 1-D device mesh (the tensor-parallel group); "
                             f"{name} is on {value.device_mesh}")
        placement = value.placements[0]
        if name in _VOCABULARY_ROWS and placement == Shard(0):
            sharded.append(name)
        elif not placement.is_replicate():
            raise ValueError(f"{name} is a DTensor with placements {value.placements}: fused_pref takes weight and "
                             "bias sharded on the vocabulary (Shard(0), as ColwiseParallel leaves an lm_head) and "
                             "every other DTensor replicated")
        named[name] = value.to_local()
    if sharded:
        unsharded = [name for name in _VOCABULARY_ROWS if named.get(name) is not None and name not in sharded]
        if unsharded:
            raise ValueError(f"{', '.join(sharded)} sharded on the vocabulary (DTensor Shard(0)) but "
                             f"{', '.join(unsharded)} not: shard every lm_head weight and bias of the call alike")
        if options.process_group is not None or options.vocab_start is not None:
            raise ValueError("a DTensor weight sharded on the vocabulary brings its own process group and shard "
                             "offsets: leave process_group and vocab_start unset")
        mesh = next(iter(meshes))
        _check_every_rank_has_rows(given[sharded[0]], mesh)
        options = dataclasses.replace(options, process_group=mesh.get_group())
        if validation.reads_back(options.validate):
            _check_replicated(named, given, options.process_group)
    positional = [named.pop(name) for name in POSITIONAL[:len(args)]]
    return tuple(positional), named, options


def _check_every_rank_has_rows(value, mesh):
    """Refused on every rank alike, from the global shape, where ``torch.chunk``'s pieces leave a
    rank without vocabulary rows (few rows on many ranks): refused by that rank alone, at its own
    shard, the others would wait in the shards' first collective."""
    rows, world = value.shape[0], mesh.size()
    chunk = -(-rows // world)
    if chunk * (world - 1) >= rows:
        raise ValueError(f"a Shard(0) DTensor of {rows} vocabulary rows on {world} ranks leaves a rank without rows "
                         f"(torch.chunk's pieces of {chunk}): use fewer ranks for the lm_head")


def _check_replicated(named, given, group):
    """The tokens of a vocabulary-sharded call must be the same on every rank of the group.  A
    weight that FSDP's ``fully_shard`` left sharded is also a ``Shard(0)`` DTensor, but each rank
    holds its own batch: refused here rather than computed as a silently wrong vocabulary-parallel
    loss.  Two all-reduces of two numbers per tensor (its size and sum) and a host read (``validate``
    has one anyway); under ``validate=False`` nothing is checked."""
    local = [named[name] for name in ("hidden", "labels") if isinstance(named.get(name), torch.Tensor)
             and name not in given]   # a replicated DTensor is the same everywhere by construction
    if not local:
        return
    device = local[0].device
    # nansum accumulates in fp64 without an fp64 copy of hidden; NaNs count as 0 (the loss shows them).
    stats = torch.cat([torch.stack([torch.tensor(float(t.numel()), device=device), t.nansum(dtype=torch.float64)])
                       for t in local])
    low, high = stats.clone(), stats.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise ValueError("weight is a DTensor sharded on the vocabulary, but hidden or labels differ across its "
                         "mesh's ranks: a vocabulary-parallel loss needs every rank's tokens.  A weight that FSDP "
                         "(fully_shard) keeps sharded is such a DTensor too: call the loss inside the model's "
                         "forward, where FSDP has gathered it (fused_pref.integrations.hf.add_fused_forward), or "
                         "pass weight.full_tensor()")
