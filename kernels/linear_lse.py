"""Forward: per-token log-sum-exp over the vocabulary, the target logit and the sum of logits.

The grid is (row tile x vocabulary split), in grouped order (``tiles.grouped_tile``).  A program
owns BLOCK_N valid rows and one vocabulary split of one or more BLOCK_V tiles; each tile is a full
reduction over D, after which its max and sum of exponentials are taken once (``tiles.TileConfig``
says how many tiles a split holds; with one, ``ONE_TILE``, the program has no loop and no running
state to rescale).  The program writes one partial log-sum-exp per row; the
partials of a row's splits are merged after by ``merge_splits_kernel`` in a fixed order, so the
result does not depend on which program finished first, and no [N, V] tensor is ever stored.  The
partials' buffer is bounded by ``workspace_bytes``: past that, rows go through in several launches.

The target logit is picked from the same tiles as the lse, with the same rounding, so ``logp =
target - lse <= 0`` (a compare-and-sum over each tile of a looped split, a gather by index from a
one-tile split); the one split holding a row's label stores it, and the backward reads it back
for the label's column (``linear_grad``).

The sum of a token's logits (for the preference losses' ``logits/*`` metrics) is linear without a
softcap, ``h . sum_v w_v + sum_v b_v``: ``logit_sum_kernel`` computes it as one dot product per
token.  As a third row reduction per logits tile it cost the forward 40% on an H200
(benchmarks/NOTES.md), so the tiles sum logits only under a softcap (``LOGIT_SUM``), as one more
partial per split.

In the "cublas" tile plan (``tiles.PLANS``) no logits kernel runs: cuBLAS computes each block of
rows' fp32 logits against the whole vocabulary and ``cross_entropy_block`` reduces them
(``_forward_by_cublas``).
"""

import torch
import triton
import triton.language as tl

from .cross_entropy_block import block_lse_and_target, new_stats
from .linear_grad import MAX_CHUNK_FRACTION
from .products import fp32_logits, whole_row_tiles
from .tiles import (DEFAULT_PLAN, DTYPE_NAMES, STATS_PLANS, WORKSPACE_BYTES, AotSpec, TileConfig, aot_logits_variants,
                    check_unit_stride_bias, group_rows, grouped_tile, labelled_rows, launch_tiles,
                    logits_input_pointers, logits_launch_args, logits_tile, row_tile_start, valid_rows)


@triton.jit
def linear_lse_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, labels_ptr, rows_ptr, n_valid_ptr,
    lse_part_ptr, sum_part_ptr, stat_part_ptr, target_ptr,
    # sizes
    V, D, T, p_start, n_row_tiles, n_splits, n_group_rows, v_per_split,
    # strides
    stride_h_r, stride_h_t, stride_h_d, stride_w_v, stride_w_d, stride_part_s, stride_part_k,
    # scalars
    softcap, inv_temperature,
    # variants
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, LOGIT_SUM: tl.constexpr,
    TOKEN_STATS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """One program: BLOCK_N valid rows from position ``p_start`` of the row index against one
    vocabulary split.  Writes their partial log-sum-exp (and, with ``LOGIT_SUM``, sum of logits) at
    ``[split, position - p_start]`` of the partials, and the target logit of the rows whose label
    lies in the split.  With ``TOKEN_STATS`` also the split's entropy, its max and the
    first column holding it, at ``[k, split, position - p_start]`` of ``stat_part`` (k = 0, 1, 2)."""
    row_tile, split = grouped_tile(n_row_tiles, n_splits, n_group_rows)
    p0, n_valid = row_tile_start(n_valid_ptr, row_tile, BLOCK_N)
    p0 += p_start
    if p0 >= n_valid:
        return
    offs_p, row, p_mask, h_offset, label = labelled_rows(rows_ptr, labels_ptr, n_valid, p0, V, T,
                                                         stride_h_r, stride_h_t, BLOCK_N)
    # A finite floor, not -inf: a split whose logits are all -inf (a bias masking a vocabulary range)
    # would otherwise compute exp(-inf - -inf) = NaN; with it, its sum is 0 and its partial lse -inf.
    run_max = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # sum of exp(z - run_max) * (run_max - z): each term >= 0, so the split's entropy
    # log(run_sum) + spread / run_sum has no cancellation (lse - E[z] loses what |z| rounds away).
    spread = tl.zeros((BLOCK_N,), dtype=tl.float32)
    argmax = tl.zeros((BLOCK_N,), dtype=tl.int32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    if ONE_TILE:
        # A split is one tile (the wide plans): its max and sum taken once, nothing to rescale, and
        # the target gathered by index.  The compare-and-sum the loop picks it with took the
        # 128x256 build past 255 registers (ptxas, sm_90, triton 3.9: 188 bytes of spills; 0 and
        # 241 registers with the gather); the loop's running state cost the rest.
        tl.static_assert(not TOKEN_STATS, "the token statistics run in the looped tiles (tiles.STATS_PLANS)")
        z, offs_v, v_mask = logits_tile(
            h_ptr, w_ptr, b_ptr, h_offset, p_mask, v_start, V, D,
            stride_h_d, stride_w_v, stride_w_d, softcap, inv_temperature,
            HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, DOT_IN_FP32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        z = tl.where(v_mask[None, :], z, float("-inf"))
        run_max = tl.maximum(tl.max(z, axis=1), -1e30)       # the floor, as in the loop below
        run_sum = tl.sum(tl.exp(z - run_max[:, None]), axis=1)
        # A label outside the tile gathers some column; the store below keeps only the split's.
        column = tl.minimum(tl.maximum(label - v_start, 0), BLOCK_V - 1).to(tl.int32)
        target = tl.reshape(tl.gather(z, column[:, None], axis=1), (BLOCK_N,))
        if LOGIT_SUM:
            logit_sum = tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
    else:
        for v0 in range(v_start, v_end, BLOCK_V):
            z, offs_v, v_mask = logits_tile(
                h_ptr, w_ptr, b_ptr, h_offset, p_mask, v0, V, D,
                stride_h_d, stride_w_v, stride_w_d, softcap, inv_temperature,
                HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, DOT_IN_FP32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            # Padded vocabulary columns must never win the max nor match a label.
            z = tl.where(v_mask[None, :], z, float("-inf"))
            tile_max = tl.max(z, axis=1)
            new_max = tl.maximum(run_max, tile_max)
            rescale = tl.exp(run_max - new_max)
            e = tl.exp(z - new_max[:, None])
            if TOKEN_STATS:
                # The terms so far move by the max's rise (0 before the first tile, run_sum being 0
                # and the floor finite); e is 0 at padded columns, where new_max - z is inf: inf * 0
                # would be NaN.  (A logit of -inf gives NaN, as in the reference's p log p.)  One
                # subtraction per logit more than E[z]'s sum, which cancelled.
                rise = (new_max - run_max) * run_sum
                gap = tl.where(v_mask[None, :], new_max[:, None] - z, 0.0)
                spread = (spread + rise) * rescale + tl.sum(e * gap, axis=1)
                # Strictly greater: a later tile never takes a tie, so the first column wins (torch.argmax).
                argmax = tl.where(tile_max > run_max, v0 + tl.argmax(z, axis=1).to(tl.int32), argmax)
            run_sum = run_sum * rescale + tl.sum(e, axis=1)
            run_max = new_max
            target += tl.sum(tl.where(offs_v[None, :] == label[:, None], z, 0.0), axis=1)
            if LOGIT_SUM:
                logit_sum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)

    part = split.to(tl.int64) * stride_part_s + (offs_p - p_start)
    tl.store(lse_part_ptr + part, run_max + tl.log(run_sum), mask=p_mask)
    if LOGIT_SUM:
        tl.store(sum_part_ptr + part, logit_sum, mask=p_mask)
    if TOKEN_STATS:
        tl.store(stat_part_ptr + part, tl.log(run_sum) + spread / run_sum, mask=p_mask)
        tl.store(stat_part_ptr + stride_part_k + part, run_max, mask=p_mask)
        # A column index below 2^24 is exact in fp32.
        tl.store(stat_part_ptr + 2 * stride_part_k + part, argmax.to(tl.float32), mask=p_mask)
    # Exactly one split holds a label in [0, V); a label outside it (validate=False) keeps the zero
    # the launcher filled in.
    tl.store(target_ptr + row, target, mask=p_mask & (label >= v_start) & (label < v_end))


@triton.jit
def merge_splits_kernel(
    lse_part_ptr, sum_part_ptr, stat_part_ptr, rows_ptr, n_valid_ptr, lse_ptr, logit_sum_ptr, entropy_ptr,
    argmax_ptr, max_logit_ptr,
    p_start, n_positions, n_splits, stride_part_s, stride_part_k,
    LOGIT_SUM: tl.constexpr, TOKEN_STATS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Each row's log-sum-exp over the whole vocabulary from its splits' partials ``l_s``, in split
    order:  ``lse = M + log(sum_s exp(l_s - M))``, ``M`` the running max (the online-softmax merge:
    rescaling to the largest cannot overflow); and, with ``LOGIT_SUM``, the sum of its partial sums;
    with ``TOKEN_STATS``, the entropy from the splits' ``H_s``: ``H = sum_s p_s (lse - l_s + H_s)``,
    ``p_s = exp(l_s - lse)``, every term >= 0, merged as the sum is (``lse - E[z]`` would cancel
    to the rounding of the largest logit), the argmax (the first split's on a tie) and the max logit (which vocabulary
    shards compare to find the global argmax).  Stored at the row's token, for
    positions ``p_start .. p_start + n_positions`` of the row index."""
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (offs < n_positions) & (p_start + offs < tl.load(n_valid_ptr))
    run_max = tl.full((BLOCK_P,), -1e30, dtype=tl.float32)     # the split kernel's floor: -inf partials add 0
    run_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    spread = tl.zeros((BLOCK_P,), dtype=tl.float32)       # sum of exp(l_s - run_max) (run_max - l_s + H_s)
    best = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    argmax = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for s in range(0, n_splits):
        part = s * stride_part_s + offs
        partial = tl.load(lse_part_ptr + part, mask=mask, other=0.0)
        new_max = tl.maximum(run_max, partial)
        rescale = tl.exp(run_max - new_max)
        weight = tl.exp(partial - new_max)
        if TOKEN_STATS:
            # As in the split kernel: the terms so far move by the max's rise (0 before the first).
            rise = (new_max - run_max) * run_sum
            split_entropy = tl.load(stat_part_ptr + part, mask=mask, other=0.0)
            spread = (spread + rise) * rescale + weight * (new_max - partial + split_entropy)
        run_sum = run_sum * rescale + weight
        run_max = new_max
        if LOGIT_SUM:
            logit_sum += tl.load(sum_part_ptr + part, mask=mask, other=0.0)
        if TOKEN_STATS:
            split_max = tl.load(stat_part_ptr + stride_part_k + part, mask=mask, other=0.0)
            split_arg = tl.load(stat_part_ptr + 2 * stride_part_k + part, mask=mask, other=0.0)
            argmax = tl.where(split_max > best, split_arg, argmax)
            best = tl.maximum(best, split_max)
    row = tl.load(rows_ptr + p_start + offs, mask=mask, other=0).to(tl.int64)
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + row, lse, mask=mask)
    if LOGIT_SUM:
        tl.store(logit_sum_ptr + row, logit_sum, mask=mask)
    if TOKEN_STATS:
        tl.store(entropy_ptr + row, tl.log(run_sum) + spread / run_sum, mask=mask)
        tl.store(argmax_ptr + row, argmax.to(tl.int64), mask=mask)
        tl.store(max_logit_ptr + row, best, mask=mask)


# 1024 rows per program, 4 warps: 8 rows per thread, each split's partials a coalesced 4 KiB read.
MERGE_BLOCK_P = 1024
MERGE_NUM_WARPS = 4


@triton.jit
def logit_sum_kernel(
    h_ptr, w_sum_ptr, b_sum_ptr, rows_ptr, n_valid_ptr, out_ptr,
    D, T,
    stride_h_r, stride_h_t, stride_h_d,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[row] = h[row] . w_sum + b_sum`` for BLOCK_N valid rows, accumulated in fp64: ``w_sum`` is
    a column sum over the whole vocabulary, so its terms are large and the dot product cancels."""
    p0, n_valid = row_tile_start(n_valid_ptr, tl.program_id(0), BLOCK_N)
    if p0 >= n_valid:
        return
    offs_p, row, p_mask, h_offset = valid_rows(rows_ptr, n_valid, p0, T, stride_h_r, stride_h_t, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_ptr + h_offset[:, None] + offs_d[None, :] * stride_h_d,
                    mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        w_sum = tl.load(w_sum_ptr + offs_d, mask=d_mask, other=0.0)
        acc += tl.sum(h.to(tl.float64) * w_sum[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_sum_ptr)
    tl.store(out_ptr + row, acc.to(tl.float32), mask=p_mask)


# 32 rows x 64 columns per step, 4 warps: the fp64 product tile is 2048 values, 16 fp64 (32
# registers) per thread; a row's 64 elements are 128 bytes in bf16 (one cache line); each fp64 block
# of w_sum is loaded once per 32 rows.  It keeps the strided build (no unit-stride hint: an address
# per element) clear of the 255-register limit, which doubling either side does not.  ptxas (python
# -m fused_pref kernels): 168 registers strided and 48-56 aligned on sm_80, 128 and 48-55 on sm_90;
# 64x64 or 32x128 take the strided build to 244-254 registers, 64x128 and 128x64 spill 444-1312
# bytes.  Not timed on a GPU.
LOGIT_SUM_BLOCK_N, LOGIT_SUM_BLOCK_D = 32, 64
LOGIT_SUM_NUM_WARPS = 4


@triton.jit
def column_sum_kernel(
    w_ptr, class_weight_ptr, out_ptr,
    V, D, v_per_split,
    stride_w_v, stride_w_d,
    CLASS_WEIGHTS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[split, d]``: the sum of ``w[v, d]`` (times ``class_weight[v]`` with ``CLASS_WEIGHTS``)
    over this program's vocabulary range, in fp64.  The weight is read once in its own dtype;
    torch's ``sum(dtype=torch.float64)`` would first copy it to fp64 whole (V x D x 8 bytes, 4.2 GB
    at Llama-3-8B's head, seen on an H200)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float64)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_w_v + offs_d[None, :] * stride_w_d,
                    mask=v_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float64)
        if CLASS_WEIGHTS:
            w = w * tl.load(class_weight_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float64)[:, None]
        acc += w
    tl.store(out_ptr + pid_s.to(tl.int64) * D + offs_d, tl.sum(acc, axis=0), mask=d_mask)


# 32 vocabulary rows x 64 columns per step, 4 warps: the [32, 64] fp64 accumulator is 16 fp64 (32
# registers) per thread, added to element-wise, reduced over rows once at the end; each row's 64
# columns are 128 contiguous bytes in bf16 (one cache line).  The fp64 accumulator is what bounds
# the tile: ptxas 48-72 registers (strided or aligned, sm_80 and sm_90); 64x64 doubles it to 96-128
# registers, 64x128 and 128x64 take 165-255.  32x128 would also fit (79-96); not timed on a GPU.
COLUMN_SUM_BLOCK_V, COLUMN_SUM_BLOCK_D = 32, 64
COLUMN_SUM_NUM_WARPS = 4


def vocabulary_column_sum(weight: torch.Tensor, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``weight.sum(dim=0)`` in fp64, ``[D]`` (``(class_weight[:, None] * weight).sum(dim=0)`` with
    per-class weights ``[V]``), with O(D) extra memory: per-range partial sums, then their
    (deterministic) sum."""
    V, D = weight.shape
    d_blocks = triton.cdiv(D, COLUMN_SUM_BLOCK_D)
    v_tiles = triton.cdiv(V, COLUMN_SUM_BLOCK_V)
    splits = min(v_tiles, max(1, triton.cdiv(_programs_wanted(weight.device), d_blocks)))
    v_per_split = triton.cdiv(v_tiles, splits) * COLUMN_SUM_BLOCK_V
    partial = torch.empty((triton.cdiv(V, v_per_split), D), device=weight.device, dtype=torch.float64)
    column_sum_kernel[(d_blocks, partial.shape[0])](
        weight, partial if class_weight is None else class_weight, partial, V, D, v_per_split, weight.stride(0),
        weight.stride(1), CLASS_WEIGHTS=class_weight is not None,
        BLOCK_V=COLUMN_SUM_BLOCK_V, BLOCK_D=COLUMN_SUM_BLOCK_D, num_warps=COLUMN_SUM_NUM_WARPS,
    )
    return partial.sum(dim=0)


def linear_logit_sums(hidden, weight, bias, rows, n_valid, class_weight=None) -> torch.Tensor:
    """Per-token sum of ``hidden @ weight.T + bias`` over the vocabulary (each class times
    ``class_weight`` when given), fp32 ``[R*T]``, undefined at rows not among the first ``n_valid`` of
    ``rows`` (``linear_lse_forward`` zeroes them)."""
    R, T, D = hidden.shape
    out = torch.empty(R * T, device=hidden.device, dtype=torch.float32)
    w_sum = vocabulary_column_sum(weight, class_weight)
    if bias is None:
        b_sum = w_sum  # unread without a bias
    elif class_weight is None:
        b_sum = bias.sum(dtype=torch.float64).reshape(1)
    else:
        b_sum = (bias.double() * class_weight.double()).sum().reshape(1)
    if rows.numel() > 0:
        logit_sum_kernel[(triton.cdiv(rows.numel(), LOGIT_SUM_BLOCK_N),)](
            hidden, w_sum, b_sum, rows, n_valid, out, D, T,
            hidden.stride(0), hidden.stride(1), hidden.stride(2),
            HAS_BIAS=bias is not None, BLOCK_N=LOGIT_SUM_BLOCK_N, BLOCK_D=LOGIT_SUM_BLOCK_D,
            num_warps=LOGIT_SUM_NUM_WARPS,
        )
    return out


def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    # Under the interpreter there is no SM count; a small virtual one makes the small shapes of
    # the CPU tests take the split-vocabulary path, so CI exercises it.
    return 8


def vocab_splits(n_rows: int, V: int, device: torch.device, tiles: TileConfig):
    """(number of vocabulary splits, vocabulary entries per split) for ``n_rows`` valid rows."""
    v_tiles = triton.cdiv(V, tiles.block_v)
    if tiles.vocab_tiles_per_program is not None:
        splits = triton.cdiv(v_tiles, tiles.vocab_tiles_per_program)
    else:
        row_tiles = max(1, triton.cdiv(n_rows, tiles.block_n))
        splits = min(v_tiles, max(1, triton.cdiv(_programs_wanted(device), row_tiles)))
    v_per_split = triton.cdiv(v_tiles, splits) * tiles.block_v
    return triton.cdiv(V, v_per_split), v_per_split


def rows_per_launch(n_rows: int, splits: int, partials: int, block_n: int, workspace_bytes: int) -> int:
    """Positions of the row index one forward launch covers: all of them if their ``partials``
    fp32 values per split fit in ``workspace_bytes``, else the most whole row tiles that do (one
    at least)."""
    per_row = 4 * splits * partials
    fitting = workspace_bytes // per_row // block_n * block_n
    return max(1, min(n_rows, max(block_n, fitting)))


def linear_lse_forward(hidden, weight, bias, labels, rows, n_valid, *, softcap=None, temperature=1.0,
                       logit_sum=False, token_stats=False, workspace_bytes=WORKSPACE_BYTES,
                       plan: str = DEFAULT_PLAN, class_weight=None):
    """Per-token ``lse``, ``target`` logit, (optionally) sum of logits over the vocabulary (in
    the logits tiles under a softcap, else by ``linear_logit_sums``) and (``token_stats``) the
    entropy of the softmax, the argmax column (int64) and the max logit, each None when not asked
    for.

    ``hidden`` is ``[R, T, D]`` (any strides), ``weight`` ``[V, D]``, ``bias`` ``[V]`` or None,
    ``labels`` ``[R*T]`` int64, ``rows`` the int32 valid-first row index (its length bounds the
    number of valid rows), ``n_valid`` a one-element int32 device tensor.  Returns fp32 ``[R*T]``
    tensors (the argmax int64) whose entries at rows not computed are 0: rows not among the first
    ``n_valid`` of ``rows`` (the "cublas" plan computes every row of ``rows``).  Defined, so that a
    traced call (``torch.compile``, ``torch.library.opcheck``) returns what an eager one does; the
    fills cost a few passes over O(tokens) bytes.
    ``class_weight`` (fp32 ``[V]``, not under a softcap): the logit sum weighs each class by it.  The
    per-split partials hold at most ``workspace_bytes`` (and one row tile's worth at least); ``plan``
    names the tiles (``tiles.PLANS``); the logits are ``softcap(hidden @ weight.T + bias) / temperature``.
    """
    N = hidden.shape[0] * hidden.shape[1]
    check_unit_stride_bias(bias)
    tiles = launch_tiles(plan, hidden, weight, bias, softcap)
    tile_sum = logit_sum and softcap is not None
    if tile_sum and class_weight is not None:
        raise ValueError("a class-weighted sum of soft-capped logits is not computed (the tiles sum unweighted)")
    lse = torch.empty(N, device=hidden.device, dtype=torch.float32)
    target = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    sums = torch.empty(N, device=hidden.device, dtype=torch.float32) if tile_sum else None
    entropy = torch.empty(N, device=hidden.device, dtype=torch.float32) if token_stats else None
    argmax = torch.empty(N, device=hidden.device, dtype=torch.int64) if token_stats else None
    max_logit = torch.empty(N, device=hidden.device, dtype=torch.float32) if token_stats else None
    if token_stats and plan not in STATS_PLANS:
        raise ValueError(f"the token statistics run in the plans {STATS_PLANS} (tiles.stats_plan), not {plan!r}")
    if tiles.cublas_logits:
        _forward_by_cublas(hidden, weight, bias, labels, rows, lse, target, sums, entropy, argmax, max_logit,
                           softcap=softcap, temperature=temperature, workspace_bytes=workspace_bytes)
    else:
        _forward_by_tiles(hidden, weight, bias, labels, rows, n_valid, lse, target, sums, entropy, argmax,
                          max_logit, tiles, softcap=softcap, temperature=temperature, workspace_bytes=workspace_bytes)
    if logit_sum and not tile_sum:
        sums = linear_logit_sums(hidden, weight, bias, rows, n_valid, class_weight)
        if temperature != 1.0:
            sums = sums / temperature  # linear: the sum of z / T is the sum of z over T
    _zero_unwritten((lse, sums, entropy, argmax, max_logit), rows, n_valid, every_row=tiles.cublas_logits)
    return lse, target, sums, entropy, argmax, max_logit


def _zero_unwritten(outputs, rows, n_valid, *, every_row: bool):
    """Zero ``outputs`` (None skipped) at the rows no kernel wrote: those not among the first
    ``n_valid`` of ``rows``, or not in ``rows`` at all (``every_row``: the "cublas" plan writes each).
    The buffers start empty, so that a kernel that misses a row it should write leaves the NaN of
    a NaN-filled buffer there (``testing.nan_filled``), not a plausible 0."""
    listed = torch.arange(rows.numel(), device=rows.device)
    written_position = torch.ones_like(listed, dtype=torch.bool) if every_row else listed < n_valid
    written = torch.zeros(outputs[0].numel(), dtype=torch.bool, device=rows.device)
    written[rows.long()] = written_position
    for out in outputs:
        if out is not None:
            out.masked_fill_(~written, 0)


def _forward_by_tiles(hidden, weight, bias, labels, rows, n_valid, lse, target, sums, entropy, argmax, max_logit,
                      tiles, *, softcap, temperature, workspace_bytes):
    """``linear_lse_forward``'s tiles: the logits kernel over (row tile x vocabulary split), then the
    merge of the splits, in launches whose partials fit ``workspace_bytes``."""
    _, T, D = hidden.shape
    V = weight.shape[0]
    n_rows = rows.numel()
    splits, v_per_split = vocab_splits(n_rows, V, hidden.device, tiles)
    tile_sum, token_stats = sums is not None, entropy is not None
    # Partials, one [splits, rows] plane each: the lse, the logit sums, the three token statistics.
    kinds = 1 + tile_sum + 3 * token_stats
    per_launch = rows_per_launch(n_rows, splits, kinds, tiles.block_n, workspace_bytes)
    partials = torch.empty((kinds, splits, per_launch), device=hidden.device, dtype=torch.float32)
    lse_part, sum_part, stat_part = partials[0], partials[min(1, kinds - 1)], partials[kinds - 3 if token_stats else 0]
    launch = logits_launch_args(hidden.dtype, bias, softcap, temperature, tiles)
    if token_stats:
        launch.update(stats_launch_options(hidden.dtype, launch))
    for p_start in range(0, n_rows, per_launch):
        n_positions = min(per_launch, n_rows - p_start)
        row_tiles = triton.cdiv(n_positions, tiles.block_n)
        linear_lse_kernel[(row_tiles * splits,)](
            hidden, weight, bias, labels, rows, n_valid, lse_part, sum_part, stat_part, target,
            V, D, T, p_start, row_tiles, splits, group_rows(tiles, row_tiles), v_per_split,
            hidden.stride(0), hidden.stride(1), hidden.stride(2), weight.stride(0), weight.stride(1),
            lse_part.stride(0), partials.stride(0), LOGIT_SUM=tile_sum, TOKEN_STATS=token_stats,
            ONE_TILE=tiles.vocab_tiles_per_program == 1, **launch,
        )
        merge_splits_kernel[(triton.cdiv(n_positions, MERGE_BLOCK_P),)](
            lse_part, sum_part, stat_part, rows, n_valid, lse, lse if sums is None else sums,
            lse if entropy is None else entropy, target if argmax is None else argmax,
            lse if max_logit is None else max_logit, p_start, n_positions, splits, lse_part.stride(0),
            partials.stride(0),
            LOGIT_SUM=tile_sum, TOKEN_STATS=token_stats, BLOCK_P=MERGE_BLOCK_P, num_warps=MERGE_NUM_WARPS,
        )


def _forward_by_cublas(hidden, weight, bias, labels, rows, lse, target, sums, entropy, argmax, max_logit, *,
                       softcap, temperature, workspace_bytes):
    """``linear_lse_forward`` in the "cublas" plan: blocks of the listed rows, as many as
    ``workspace_bytes`` holds of their fp32 logits against the whole vocabulary (and no more bytes
    than the backward's chunk may hold, a 16th of the logits in the input dtype), each block's logits from cuBLAS
    (``fp32_logits``) and its lse, target logit (and sum of logits, and token statistics) from one
    pass of ``block_lse_and_target``.  Every row of ``rows`` is computed: without validation's host
    sync, the ignored ones too."""
    T, V = hidden.shape[1], weight.shape[0]
    most = -(-rows.numel() * hidden.element_size() // (4 * MAX_CHUNK_FRACTION))
    block = min(whole_row_tiles(workspace_bytes // (4 * V)), max(1, most))
    for start in range(0, rows.numel(), block):
        index = rows[start:start + block].long()
        logits = fp32_logits(hidden[index // T, index % T], weight)
        block_sums = None if sums is None else torch.empty(index.numel(), device=hidden.device, dtype=torch.float32)
        stats = None if entropy is None else new_stats(index.numel(), hidden.device)
        lse[index], target[index] = block_lse_and_target(logits, bias, labels[index], softcap=softcap,
                                                         temperature=temperature, logit_sum=block_sums, stats=stats)
        del logits
        if sums is not None:
            sums[index] = block_sums
        if stats is not None:
            entropy[index], argmax[index], max_logit[index] = stats


def stats_launch_options(dtype: torch.dtype, options: dict) -> dict:
    """The launch options of a forward with the token statistics: fp32 inputs take one stage, since
    with two the strided, soft-capped build at ieee precision spilled 8 bytes on sm_90 (triton 3.9's
    ptxas); stages pipeline the loads and leave every sum's order, so the rounding, unchanged."""
    return {**options, "num_stages": 1} if dtype == torch.float32 else options


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """This module's ahead-of-time builds at input ``dtype`` (``tiles.AotSpec``): the logits kernel
    in ``aot_logits_variants``, the merge, the logit-sum kernel with and without a bias, the column
    sum."""
    partials = {"lse_part_ptr": torch.float32, "sum_part_ptr": torch.float32, "stat_part_ptr": torch.float32,
                "target_ptr": torch.float32}
    logit_sum_pointers = {"h_ptr": dtype, "w_sum_ptr": torch.float64, "b_sum_ptr": torch.float64,
                          "rows_ptr": torch.int32, "n_valid_ptr": torch.int32, "out_ptr": torch.float32}
    specs = []
    for build in aot_logits_variants(dtype):
        if build.cublas_logits:
            continue  # that plan's forward runs cuBLAS and cross_entropy_block
        # The tiles sum logits only under a softcap (linear_lse_forward); the token statistics ride
        # in the default plan's larger variant (the only tiles they run in: tiles.STATS_PLANS).
        stats = build.constexprs["HAS_BIAS"] and build.plan == DEFAULT_PLAN
        constexprs = {**build.constexprs, "LOGIT_SUM": build.constexprs["HAS_SOFTCAP"], "TOKEN_STATS": stats,
                      "ONE_TILE": build.one_tile}
        specs.append(AotSpec("linear_lse", build.variant + ("+stats" if stats else ""), linear_lse_kernel,
                             {**logits_input_pointers(dtype), **partials}, constexprs,
                             stats_launch_options(dtype, build.options) if stats else build.options, build.layouts,
                             build.archs))
    for has_bias in (False, True):
        specs.append(AotSpec("logit_sum", DTYPE_NAMES[dtype] + ("+bias" if has_bias else ""), logit_sum_kernel,
                             logit_sum_pointers,
                             {"HAS_BIAS": has_bias, "BLOCK_N": LOGIT_SUM_BLOCK_N, "BLOCK_D": LOGIT_SUM_BLOCK_D},
                             {"num_warps": LOGIT_SUM_NUM_WARPS}))
    for class_weights in (False, True):
        specs.append(AotSpec("column_sum", DTYPE_NAMES[dtype] + ("+classes" if class_weights else ""),
                             column_sum_kernel, {"w_ptr": dtype, "class_weight_ptr": torch.float32,
                                                 "out_ptr": torch.float64},
                             {"CLASS_WEIGHTS": class_weights, "BLOCK_V": COLUMN_SUM_BLOCK_V,
                              "BLOCK_D": COLUMN_SUM_BLOCK_D}, {"num_warps": COLUMN_SUM_NUM_WARPS}))
    return specs


def merge_aot_specs() -> list[AotSpec]:
    """The merge's builds: fp32 partials whatever the inputs, with and without partial sums."""
    pointers = {"lse_part_ptr": torch.float32, "sum_part_ptr": torch.float32, "stat_part_ptr": torch.float32,
                "rows_ptr": torch.int32, "n_valid_ptr": torch.int32, "lse_ptr": torch.float32,
                "logit_sum_ptr": torch.float32, "entropy_ptr": torch.float32, "argmax_ptr": torch.int64,
                "max_logit_ptr": torch.float32}
    return [AotSpec("merge_splits", "fp32" + ("+sum+stats" if more else ""), merge_splits_kernel, pointers,
                    {"LOGIT_SUM": more, "TOKEN_STATS": more, "BLOCK_P": MERGE_BLOCK_P}, {"num_warps": MERGE_NUM_WARPS})
            for more in (False, True)]


__all__ = ["aot_specs", "column_sum_kernel", "linear_logit_sums", "linear_lse_forward", "linear_lse_kernel",
           "logit_sum_kernel", "merge_aot_specs", "merge_splits_kernel", "rows_per_launch", "vocab_splits",
           "vocabulary_column_sum"]
