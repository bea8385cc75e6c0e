"""Losses with their gradients computed inside the forward (``backward="in_forward"``).

Where ``dLoss/dlogits`` is known during the forward, the logits need not be computed twice: a mean
or summed cross-entropy's is ``s (softmax - onehot)`` per valid token, ``s`` its weight; a pair
loss's (SimPO, CPO, ORPO, DPO) is the same with ``s = -dLoss/dlogp``, one value per sequence, known
once the pair's log-probs are (blocks of whole pairs, ``preference_and_gradients``).  Per block of
valid rows this path runs three cuBLAS products and one Triton pass over an fp32 block of logits::

    z    = h_b @ W.T                        fp32 output, cuBLAS
    -logp = lse - z[label],  dz = softmax - onehot   kernels/cross_entropy_block.py
                                            (bias, softcap, temperature there; dz in the input dtype)
    s    = the rows' weights                cross-entropy: given; a pair loss: from the head
    dH_b = s * (dz @ W)                     cuBLAS (fp32 out), the rows' d_hidden, final
    dW  += dz.T @ (s * h_b)                 cuBLAS into an fp32 accumulator

6NDV of products where the default path (forward, then the backward's recompute) does 8NDV; the
backward only multiplies the stored gradients by ``grad_output``.  The price is memory: the fp32
``d_weight`` accumulator (4VD bytes: 2.1 GB at Llama-3-8B's head) lives for the whole forward, and
the gradients are held from the forward to the backward: at the forward's end the fp32
accumulator and its cast to the input dtype coexist (6VD bytes for bf16), and the backward makes
the scaled gradients beside the stored ones.  Logits and ``d_weight``'s accumulation
stay fp32, the gradient is exact (no filtering) and every sum runs in a fixed order.

The block holds ``rows x V`` of ``dz`` in the input dtype and half as many rows of fp32 logits at a
time: at most ``workspace_bytes``; a cross-entropy's never more than 1/16 of the rows, as the
chunked backward bounds its workspace.  A pair loss's block holds whole pairs; a pair larger than
the block costs one more pass of logits (8NDV for its tokens, the default path's), so its
``workspace_bytes`` should hold a pair: 4 bytes per logit of its valid tokens in bf16 (about
0.8 GB for a pair of 1024-token sequences with a quarter prompt at Llama-3's vocabulary).  The ``[N, V]`` logits never
exist.  A DPO's reference model, given as hidden states, and ``sequence_logprobs`` where no
gradient is needed run the same products without the gradients (``logprobs_by_blocks``): one
cuBLAS product where the default path runs its Triton forward.

Asked for per-token statistics (a pair loss's ``token_metrics``, cross-entropy's token accuracy and
predicted tokens), the block kernel's first pass also gives each row's entropy and argmax: no
further pass over the logits.

Host reads: a cross-entropy makes none (without validation its blocks then span every token, the
ignored ones adding nothing); a pair loss reads its valid rows per pair once (its blocks' layout),
and in fp16 each block's largest weight.

Under vocabulary parallelism each rank's block holds its shard's fp32 logits whole, the shard's
lse and target logit merged across the ranks before ``dz`` (``_block_over_shards``: two
all-reduces of the block's rows), and ``d_hidden`` summed across the ranks in fp32 at the end.

Products with fp32 outputs from bf16/fp16 operands are ``torch.mm(..., out_dtype=torch.float32)``
on CUDA.  torch has no such kernel on the CPU, where the same math runs on fp32 copies (the
interpreter's tests; the copies cost 4VD more there).
"""

import torch

from .distributed import all_reduce_sum, combine_partials
from .kernels.cross_entropy_block import (block_dz_from_lse, block_lse_and_target, cross_entropy_block, new_stats,
                                          new_workspace)
from .kernels.pref_head import preference_head_forward
from .kernels.products import add_product, fp32_logits, has_out_dtype_mm, whole_row_tiles
from .segments import sequence_sums


def rows_within(vocab: int, dtype: torch.dtype, workspace_bytes: int, sharded: bool = False) -> int:
    """Rows of ``dz`` (input ``dtype``) a block holds within ``workspace_bytes``, its logits computed
    in two halves (fp32): 4 bytes per logit of a row in all for 2-byte inputs (``whole_row_tiles``);
    on a ``sharded`` vocabulary the whole block's fp32 logits at once (6 bytes), since ``dz`` waits
    for the lse merged across the ranks.  The block is the
    depth of ``d_weight``'s product: each adds into the fp32 accumulator, reading and writing its
    8VD bytes, so it stays bound by arithmetic only from ~800 rows up on an H100/H200
    (``workspace_bytes=2**29`` at Llama-3-8B's vocabulary)."""
    return whole_row_tiles(workspace_bytes // (vocab * (dtype.itemsize + (4 if sharded else 2))))


def rows_per_block(n_rows: int, vocab: int, dtype: torch.dtype, workspace_bytes: int, sharded: bool = False) -> int:
    """A cross-entropy's rows per block: ``rows_within`` the workspace and at most a 16th of the
    rows, as the chunked backward bounds its workspace (at least one)."""
    return min(rows_within(vocab, dtype, workspace_bytes, sharded), max(1, -(-n_rows // 16)))


def _block_over_shards(logits, bias, label, dz, logit_sums, stats, group, vocab_start, *, softcap, temperature):
    """A block's ``-logp`` (and logit sums, and with ``stats`` its rows' entropy and argmax) over the
    whole vocabulary when this rank holds a shard of it, the shard's first id ``vocab_start``: the
    shard's lse and target logit (and sums and statistics) merged across ``group``, then ``dz`` from
    the merged lse, the one-hot only where this shard holds the label.  Every row's lse is finite
    here (the block's rows all have their logits), as ``combine_partials`` needs."""
    assert stats is None or vocab_start is not None, "a shard's argmax needs its first vocabulary id"
    sums = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device) if logit_sums else None
    lse, target = block_lse_and_target(logits, bias, label, softcap=softcap, temperature=temperature, logit_sum=sums,
                                       stats=stats)
    lse, target, sums, stats = combine_partials(lse, target, lse.new_empty(0) if sums is None else sums, group, stats,
                                                vocab_start)
    if dz is not None:
        block_dz_from_lse(logits, bias, label, lse, dz, softcap=softcap, temperature=temperature)
    return lse - target, sums if logit_sums else None, stats


class _Fp32Products:
    """``h @ W.T`` and ``acc += alpha * dz.T @ h`` with fp32 outputs for operands of ``weight``'s dtype."""

    def __init__(self, weight: torch.Tensor):
        self.cuda_out_dtype = weight.is_cuda and weight.dtype != torch.float32
        if self.cuda_out_dtype and not has_out_dtype_mm():
            raise RuntimeError(f"backward='in_forward' needs torch.mm's out_dtype on CUDA (torch >= 2.8), "
                               f"this is torch {torch.__version__}: use backward='auto'")
        # CPU with bf16/fp16: an fp32 copy of the weight, made once per call.
        self.weight = weight if self.cuda_out_dtype or weight.dtype == torch.float32 else weight.float()

    def logits(self, h):
        return fp32_logits(h, self.weight)

    def scaled_rows(self, dz, scale):
        """``(dz @ W) * scale`` per row in fp32: the product rounded once, when the caller casts it."""
        if self.cuda_out_dtype:
            return torch.mm(dz, self.weight, out_dtype=torch.float32).mul_(scale[:, None])
        return torch.mm(dz.to(self.weight.dtype), self.weight).mul_(scale[:, None])

    def accumulate(self, acc, dz, h, alpha=1.0):
        """``acc += alpha * dz.T @ h``, in fp32."""
        if self.cuda_out_dtype:
            add_product(acc, dz.t(), h, alpha)
        else:
            acc.addmm_(dz.t().float(), h.float(), alpha=alpha)


def gradients_by_blocks(hidden, weight, bias, labels, valid, blocks, row_scale_of, needs, *, sub_rows, softcap,
                        temperature, logit_sums=False, token_stats=False, weight_bound=None, group=None,
                        vocab_start=None):
    """Per-token log-probs, and the gradients of ``sum_i s_i * (-logp_i)``, one block of rows at a time.

    ``blocks``: int64 indices into the flat ``R * T`` tokens, each block's rows at once in the ``dz``
    workspace; ``row_scale_of(b, index, logp)`` gives block ``b``'s row weights ``s`` (fp32, any
    sign, 0 at ignored rows) once ``logp`` holds its rows' log-probs and every earlier block's.
    The logits are computed ``sub_rows`` rows at a time; with ``group``, ``weight`` and ``bias`` are
    this rank's shard of the vocabulary (``labels`` relative to it) and a block's logits are computed
    at once (``_block_over_shards``), ``d_hidden`` summed across the group in fp32 at the end, and
    ``d_weight`` / ``d_bias`` are the shard's (its first vocabulary id ``vocab_start``, a device
    scalar, for the argmax).  Returns fp32 ``logp`` ``[R*T]`` (0 outside the blocks and at ignored
    rows), the per-token sums of logits likewise (or None), with ``token_stats`` the per-token
    ``(entropy, argmax)`` (fp32 0 and int64 -1 at ignored rows; else None), and ``d_hidden``,
    ``d_weight``, ``d_bias`` (None where ``needs`` says no) in the input dtype, fp32 for fp16 inputs
    (the backward casts them after scaling by ``grad_output``).

    ``dz`` is unscaled (``cross_entropy_block``): each row's weight goes on the other operand, as the
    default backward applies its per-row weight.  In fp16 that operand must keep its normal range
    (a mean's ``1/n`` would sink below it).  With ``weight_bound``, a device scalar no smaller than
    any ``|s|`` when the weights are known before the blocks (a cross-entropy's), every dtype's
    operand is scaled relative to it and the fp32 accumulators multiplied by it at the end, with no
    host sync.  Without one (a pair loss's weights come per block), each fp16 block is scaled
    relative to its own largest weight, read back to the host (one sync per block) and put back
    through the products' ``alpha`` (rows more than ~1e4 below their block's largest then keep
    fewer bits, a negligible share of the sum); bf16 and fp32 have fp32's range and multiply the
    rows by their weights as they are."""
    R, T, D = hidden.shape
    V = weight.shape[0]
    products = _Fp32Products(weight)
    logp = torch.zeros(R * T, dtype=torch.float32, device=hidden.device)
    sums = torch.zeros_like(logp) if logit_sums else None
    stats = (torch.zeros_like(logp), torch.full_like(logp, -1, dtype=torch.int64)) if token_stats else None
    # fp16 gradients stay fp32 until the backward scales them: rounded to fp16 before the loss scale
    # multiplies them, small ones would be lost (loss scaling exists for exactly that).
    fp16 = hidden.dtype == torch.float16
    grad_dtype = torch.float32 if fp16 else hidden.dtype
    # A shard's d_hidden is partial (its own columns): kept fp32 until the ranks' sum.
    hidden_dtype = grad_dtype if group is None else torch.float32
    d_hidden = torch.zeros(hidden.shape, dtype=hidden_dtype, device=hidden.device) if needs[0] else None
    d_weight = torch.zeros(V, D, dtype=torch.float32, device=weight.device) if needs[1] else None
    d_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if needs[2] else None
    for b, index in enumerate(blocks):
        seq, pos = index // T, index % T
        kept = valid[index]
        # An ignored row's hidden state may be NaN or inf (a fully masked row of some attention
        # kernels): zeroed on the gathered copy, its logits are finite and its weight 0 removes it.
        h = hidden[seq, pos].masked_fill_(~kept[:, None], 0)
        # Ignored rows (weight 0) point at label 0: finite, and multiplied away.
        label = torch.where(kept, labels[index], 0)
        n = index.numel()
        dz = new_workspace(n, V, weight.dtype, hidden.device) if any(needs) else None
        # This block's (entropy, argmax, max logit); a shard's are merged into the whole vocabulary's.
        block_stats = new_stats(n, hidden.device) if token_stats else None
        if group is not None:
            nlp, block_sums, block_stats = _block_over_shards(products.logits(h), bias, label, dz, logit_sums,
                                                              block_stats, group, vocab_start, softcap=softcap,
                                                              temperature=temperature)
        else:
            nlp = torch.empty(n, dtype=torch.float32, device=hidden.device)
            block_sums = torch.empty_like(nlp) if logit_sums else None
            for a in range(0, n, sub_rows):
                # sub_rows rows of fp32 logits at a time: the block's dz holds them all.
                part = slice(a, a + sub_rows)
                nlp[part] = cross_entropy_block(products.logits(h[part]), bias, label[part], softcap=softcap,
                                                temperature=temperature, dz=None if dz is None else dz[part],
                                                logit_sum=None if block_sums is None else block_sums[part],
                                                stats=None if block_stats is None else [t[part] for t in block_stats])
        logp[index] = torch.where(kept, -nlp, 0.0)
        if sums is not None:
            sums[index] = torch.where(kept, block_sums, 0.0)
        if stats is not None:
            stats[0][index] = torch.where(kept, block_stats[0], 0.0)
            stats[1][index] = torch.where(kept, block_stats[1], -1)
        if dz is None:
            continue
        dz = dz.to(weight.dtype)  # a no-op on a GPU; the interpreter's workspace is fp32 (tiles.workspace_dtype)
        scale = row_scale_of(b, index, logp)
        alpha = 1.0
        if weight_bound is not None:
            unit = scale / weight_bound
        elif fp16:
            alpha = float(scale.abs().max()) or 1.0
            unit = scale / alpha
        else:
            unit = scale
        if d_bias is not None:
            d_bias.add_(torch.mv(dz.t(), unit.to(dz.dtype)).float(), alpha=alpha)
        if d_hidden is not None:
            d_hidden[seq, pos] = products.scaled_rows(dz, scale).to(hidden_dtype)
        if d_weight is not None:
            products.accumulate(d_weight, dz, (h.float() * unit[:, None]).to(h.dtype), alpha=alpha)
    if weight_bound is not None:
        d_weight = None if d_weight is None else d_weight.mul_(weight_bound)
        d_bias = None if d_bias is None else d_bias.mul_(weight_bound)
    if d_hidden is not None and group is not None:
        d_hidden = all_reduce_sum(d_hidden, group).to(grad_dtype)
    return (logp, sums, stats, d_hidden, None if d_weight is None else d_weight.to(grad_dtype),
            None if d_bias is None else d_bias.to(grad_dtype))


def cross_entropy_and_gradients(hidden, weight, bias, labels, valid, rows, row_scale, needs, *, softcap,
                                temperature, workspace_bytes, token_stats=False, group=None, block_vocab=None,
                                vocab_start=None):
    """``(loss, argmax, d_hidden, d_weight, d_bias)`` of ``sum_i row_scale[i] * (lse_i - z[i, labels_i])``
    over the rows listed in ``rows``, as ``gradients_by_blocks`` gives them, with no host sync; the
    per-token argmax (int64 ``[R*T]``, -1 at ignored rows) with ``token_stats``, else None.

    ``hidden`` ``[R, T, D]`` (any strides; the block's rows are gathered), ``labels``, ``valid`` and
    ``row_scale`` (fp32, 0 at invalid rows) flat over ``R * T``; ``rows`` the int32 valid-first index
    (every row when validation made no host sync: invalid ones then cost products but add nothing);
    ``group``: a sharded vocabulary's process group (``gradients_by_blocks``), and ``block_vocab`` the
    width that sizes the blocks: its largest shard's rows, the same on every rank, so that every rank
    cuts the same blocks and makes the same collectives (``weight``'s rows by default); ``vocab_start``
    as in ``gradients_by_blocks``."""
    block = rows_per_block(rows.numel(), block_vocab or weight.shape[0], weight.dtype, workspace_bytes,
                           sharded=group is not None)
    blocks = [rows[start:start + block].long() for start in range(0, rows.numel(), block)]
    bound = row_scale.abs().max() if row_scale.numel() else row_scale.new_ones(())
    logp, _, stats, *grads = gradients_by_blocks(hidden, weight, bias, labels, valid, blocks,
                                              lambda b, index, logp: row_scale[index], needs,
                                              sub_rows=-(-block // 2), softcap=softcap, temperature=temperature,
                                              token_stats=token_stats, weight_bound=torch.where(bound > 0, bound, 1.0),
                                              group=group, vocab_start=vocab_start)
    return (-(row_scale * logp).sum(), None if stats is None else stats[1], *grads)


def logprobs_by_blocks(hidden, weight, bias, labels, valid, rows, *, softcap, temperature, workspace_bytes,
                       group=None, block_vocab=None):
    """Per-token log-probs, fp32 ``[R*T]`` (0 at ignored positions), with no gradient: the rows
    listed in ``rows`` as ``gradients_by_blocks`` computes them, as many rows at once as
    ``workspace_bytes`` holds of their fp32 logits.  This mode's forward without gradients, for
    a reference model (a DPO's ``ref_hidden``, ``sequence_logprobs`` under ``no_grad``): one cuBLAS
    product (2NDV, ~19 ms at Llama-3-8B / 12k tokens on an H200 as measured) and one read of the
    block, where the default path's Triton forward runs at
    its tiles' speed (58.5 ms measured in the narrow plan).  Layout as
    ``cross_entropy_and_gradients``; no host sync."""
    block = whole_row_tiles(workspace_bytes // (4 * (block_vocab or weight.shape[0])))
    blocks = [rows[start:start + block].long() for start in range(0, rows.numel(), block)]
    logp, *_ = gradients_by_blocks(hidden, weight, bias, labels, valid, blocks, None, (False, False, False),
                                   sub_rows=block, softcap=softcap, temperature=temperature, group=group)
    return logp


def pair_blocks(rows, valid, sequence_of, num_pairs, rows_per_block):
    """The ``valid`` rows among ``rows`` grouped by pair (sequences ``j`` and ``j + B``) into blocks
    of at most ``rows_per_block`` rows: as many consecutive whole pairs as fit, and a pair larger
    than that alone, cut into blocks of its own.  Returns the blocks (int64 indices, none empty),
    each block's pairs as a slice, and the positions of the blocks of cut pairs.  One host sync:
    the rows per pair (which also leaves the ignored rows out when validation made none)."""
    index = rows.long()
    # Ignored rows (every row, without validation) go to a last bucket of their own, left out.
    pair = torch.where(valid[index], sequence_of(index) % num_pairs, num_pairs)
    by_pair = index[torch.argsort(pair, stable=True)]
    # index_add_, not bincount: on CUDA bincount reads its range back to the host first.
    per_pair = torch.zeros(num_pairs + 1, dtype=torch.long, device=rows.device).index_add_(
        0, pair, torch.ones_like(pair))[:num_pairs].tolist()
    blocks, pairs, cut = [], [], []
    start = first = taken = 0

    def close(stop):
        nonlocal start, first, taken
        if taken:
            blocks.append(by_pair[start:start + taken])
            pairs.append(slice(first, stop))
        start, first, taken = start + taken, stop, 0

    for j, count in enumerate(per_pair):
        if taken + count > rows_per_block:
            close(j)
        if count > rows_per_block:
            for offset in range(0, count, rows_per_block):
                cut.append(len(blocks))
                blocks.append(by_pair[start + offset:start + min(offset + rows_per_block, count)])
                pairs.append(slice(j, j + 1))
            start, first = start + count, j + 1
            continue
        taken += count
    close(num_pairs)
    return blocks, pairs, cut


def preference_and_gradients(hidden, weight, bias, labels, valid, rows, cu_seqlens, ref_logps, needs, *, head,
                             reduction, beta, gamma, label_smoothing, tau, sft_weight, softcap, temperature,
                             workspace_bytes, token_stats=False, group=None, block_vocab=None, vocab_start=None):
    """Per-token log-probs and sums of logits (fp32 ``[R*T]``, 0 at ignored positions), with
    ``token_stats`` the per-token entropy and argmax (the token metrics, from the blocks' first
    pass), and the gradients (as ``gradients_by_blocks``) of a pair loss: ``mean_j head(S[j],
    S[j+B], Ref[j], Ref[j+B]) + sft_weight * NLL(chosen)``, ``S`` the per-sequence log-probs under
    ``reduction``.

    The gradient w.r.t. a token's log-prob is its sequence's ``dLoss/dS`` (times ``1/count`` under
    "mean"), known once the pair's every token is: blocks of at most ``workspace_bytes`` hold whole
    pairs (``pair_blocks``), and the head (``kernels/pref_head.py``) runs on a block's pairs once its
    log-probs are in.  A pair too large for one block is cut into several, its log-probs computed
    first in a pass of logits without gradients: 8NDV for its tokens, as the default path spends,
    where whole pairs take 6NDV.  Unlike the blocks of a cross-entropy, a pair loss's are not held
    to 1/16 of the rows, so that a large enough ``workspace_bytes`` holds whole pairs at any batch.

    Layout as ``cross_entropy_and_gradients``; ``cu_seqlens`` for a packed batch (``R = 1``) or None
    for padded sequences ``[2B, T]``; ``ref_logps`` ``[2B]`` fp32 or None; ``group`` and
    ``block_vocab`` as in ``cross_entropy_and_gradients``, ``vocab_start`` as in
    ``gradients_by_blocks``."""
    R, T, _ = hidden.shape
    num_sequences = R if cu_seqlens is None else cu_seqlens.numel() - 1
    B = num_sequences // 2
    if cu_seqlens is None:
        def sequence_of(index):
            return index // T
    else:
        ends = cu_seqlens[1:].long()

        def sequence_of(index):
            return torch.searchsorted(ends, index, right=True)

    def per_sequence(values):
        return sequence_sums(values.view(R, T)) if cu_seqlens is None else sequence_sums(values, cu_seqlens)

    valid_counts = per_sequence(valid).float()
    counts = valid_counts.clamp(min=1)
    n_chosen = valid_counts[:B].sum().clamp(min=1)  # the NLL's denominator: every chosen sequence's tokens
    block = rows_within(block_vocab or weight.shape[0], weight.dtype, workspace_bytes, sharded=group is not None)
    sub_rows = -(-block // 2)
    blocks, pairs, cut = pair_blocks(rows, valid, sequence_of, B, block)
    known = None
    if cut and any(needs):
        # The log-probs of the pairs cut into several blocks, before their blocks need them: the
        # same blocks, so the same products and the same bits as they will give again.
        cut_blocks = [blocks[i] for i in cut]
        known, *_ = gradients_by_blocks(hidden, weight, bias, labels, valid, cut_blocks, None, (False, False, False),
                                        sub_rows=sub_rows, softcap=softcap, temperature=temperature, group=group)
        cut_rows = torch.cat(cut_blocks)

    def row_scale_of(b, index, logp):
        logps = per_sequence(logp if known is None else logp.index_copy(0, cut_rows, known[cut_rows]))
        if reduction == "mean":
            logps = logps / counts
        p = pairs[b]
        ref_chosen, ref_rejected = (None, None) if ref_logps is None else (ref_logps[:B][p], ref_logps[B:][p])
        _, d_chosen, d_rejected = preference_head_forward(
            logps[:B][p].contiguous(), logps[B:][p].contiguous(), ref_chosen, ref_rejected, loss=head, beta=beta,
            gamma=gamma, label_smoothing=label_smoothing, tau=tau)
        d_sequence = torch.zeros(num_sequences, dtype=torch.float32, device=hidden.device)
        d_sequence[p] = d_chosen / B
        d_sequence[B + p.start:B + p.stop] = d_rejected / B
        if reduction == "mean":
            d_sequence /= counts
        seq = sequence_of(index)
        d_logp = d_sequence[seq] - torch.where(seq < B, sft_weight / n_chosen, 0.0)
        # The rows' weights are those of -logp (the block kernel's dz is its gradient).
        return torch.where(valid[index], -d_logp, 0.0)

    return gradients_by_blocks(hidden, weight, bias, labels, valid, blocks, row_scale_of, needs, sub_rows=sub_rows,
                               softcap=softcap, temperature=temperature, logit_sums=True, token_stats=token_stats,
                               group=group, vocab_start=vocab_start)
