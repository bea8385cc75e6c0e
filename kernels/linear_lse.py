"""Forward: per-token log-sum-exp over the vocabulary, the target logit and the sum of logits.

Each program owns BLOCK_N valid rows and one contiguous vocabulary range (the vocabulary is split
across programs when there are too few row tiles to fill the GPU).  It walks its range in
BLOCK_V tiles with an online max / sum-exp, so no [N, V] tensor is ever stored.  The target logit is
picked from the same tiles as the lse, with the same rounding, so ``logp = target - lse <= 0``.

The sum of a token's logits (for the preference losses' ``logits/*`` metrics) is linear without a
softcap, ``h . sum_v w_v + sum_v b_v``: ``logit_sum_kernel`` computes it as one dot product per
token.  As a third row reduction per logits tile it cost the forward 40% on an H200
(benchmarks/NOTES.md), so the tiles sum logits only under a softcap (``LOGIT_SUM``).
"""

import torch
import triton
import triton.language as tl

from .tiles import (DTYPE_NAMES, AotSpec, TileConfig, aot_logits_variants, labelled_rows, logits_input_pointers,
                    logits_launch_args, logits_tile, row_tile_start, tiles_for, valid_rows)


@triton.jit
def linear_lse_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, labels_ptr, rows_ptr, n_valid_ptr,
    max_ptr, sumexp_ptr, target_ptr, logit_sum_ptr,
    # sizes
    N, V, D, T, v_per_split,
    # strides
    stride_h_r, stride_h_t, stride_h_d, stride_w_v, stride_w_d,
    # scalars
    softcap,
    # variants
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, LOGIT_SUM: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_N valid rows (program id 0) against vocabulary split ``pid_s`` (program
    id 1).  Writes their running max, sum of exponentials, target logit (and, with ``LOGIT_SUM``,
    sum of logits) at ``pid_s * N + row`` of each partial output; ``combine_vocab_splits`` merges
    the splits."""
    p0, n_valid = row_tile_start(n_valid_ptr, BLOCK_N)
    if p0 >= n_valid:
        return
    offs_p, row, p_mask, h_offset, label = labelled_rows(rows_ptr, labels_ptr, n_valid, p0, V, T,
                                                         stride_h_r, stride_h_t, BLOCK_N)
    pid_s = tl.program_id(1)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        z, offs_v, v_mask = logits_tile(
            h_ptr, w_ptr, b_ptr, h_offset, p_mask, v0, V, D,
            stride_h_d, stride_w_v, stride_w_d, softcap,
            HAS_BIAS, HAS_SOFTCAP, DOT_IN_FP32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        # Padded vocabulary columns must never win the max nor match a label.
        z = tl.where(v_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        target += tl.sum(tl.where(offs_v[None, :] == label[:, None], z, 0.0), axis=1)
        if LOGIT_SUM:
            logit_sum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)

    out = pid_s.to(tl.int64) * N + row
    tl.store(max_ptr + out, run_max, mask=p_mask)
    tl.store(sumexp_ptr + out, run_sum, mask=p_mask)
    tl.store(target_ptr + out, target, mask=p_mask)
    if LOGIT_SUM:
        tl.store(logit_sum_ptr + out, logit_sum, mask=p_mask)


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
    p0, n_valid = row_tile_start(n_valid_ptr, BLOCK_N)
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
    w_ptr, out_ptr,
    V, D, v_per_split,
    stride_w_v, stride_w_d,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[split, d]``: the sum of ``w[v, d]`` over this program's vocabulary range, in fp64.  The
    weight is read once in its own dtype; torch's ``sum(dtype=torch.float64)`` would first copy it
    to fp64 whole (V x D x 8 bytes, 4.2 GB at Llama-3-8B's head, seen on an H200)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float64)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_w_v + offs_d[None, :] * stride_w_d,
                    mask=(offs_v < v_end)[:, None] & d_mask[None, :], other=0.0)
        acc += w.to(tl.float64)
    tl.store(out_ptr + pid_s.to(tl.int64) * D + offs_d, tl.sum(acc, axis=0), mask=d_mask)


# 32 vocabulary rows x 64 columns per step, 4 warps: the [32, 64] fp64 accumulator is 16 fp64 (32
# registers) per thread, added to element-wise, reduced over rows once at the end; each row's 64
# columns are 128 contiguous bytes in bf16 (one cache line).  The fp64 accumulator is what bounds
# the tile: ptxas 48-72 registers (strided or aligned, sm_80 and sm_90); 64x64 doubles it to 96-128
# registers, 64x128 and 128x64 take 165-255.  32x128 would also fit (79-96); not timed on a GPU.
COLUMN_SUM_BLOCK_V, COLUMN_SUM_BLOCK_D = 32, 64
COLUMN_SUM_NUM_WARPS = 4


def vocabulary_column_sum(weight: torch.Tensor) -> torch.Tensor:
    """``weight.sum(dim=0)`` in fp64, ``[D]``, with O(D) extra memory: per-range partial sums, then
    their (deterministic) sum."""
    V, D = weight.shape
    d_blocks = triton.cdiv(D, COLUMN_SUM_BLOCK_D)
    v_tiles = triton.cdiv(V, COLUMN_SUM_BLOCK_V)
    splits = min(v_tiles, max(1, triton.cdiv(_programs_wanted(weight.device), d_blocks)))
    v_per_split = triton.cdiv(v_tiles, splits) * COLUMN_SUM_BLOCK_V
    partial = torch.empty((triton.cdiv(V, v_per_split), D), device=weight.device, dtype=torch.float64)
    column_sum_kernel[(d_blocks, partial.shape[0])](
        weight, partial, V, D, v_per_split, weight.stride(0), weight.stride(1),
        BLOCK_V=COLUMN_SUM_BLOCK_V, BLOCK_D=COLUMN_SUM_BLOCK_D, num_warps=COLUMN_SUM_NUM_WARPS,
    )
    return partial.sum(dim=0)


def linear_logit_sums(hidden, weight, bias, rows, n_valid) -> torch.Tensor:
    """Per-token sum of ``hidden @ weight.T + bias`` over the vocabulary, fp32 ``[R*T]``, undefined at
    rows not among the first ``n_valid`` of ``rows`` (as ``linear_lse_forward``'s outputs)."""
    R, T, D = hidden.shape
    out = torch.empty(R * T, device=hidden.device, dtype=torch.float32)
    w_sum = vocabulary_column_sum(weight)
    b_sum = w_sum if bias is None else bias.sum(dtype=torch.float64).reshape(1)  # unread without a bias
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
    row_tiles = max(1, triton.cdiv(n_rows, tiles.block_n))
    v_tiles = triton.cdiv(V, tiles.block_v)
    splits = min(v_tiles, max(1, triton.cdiv(_programs_wanted(device), row_tiles)))
    v_per_split = triton.cdiv(v_tiles, splits) * tiles.block_v
    return triton.cdiv(V, v_per_split), v_per_split


def combine_vocab_splits(partial: torch.Tensor):
    """Per-token ``(lse, target, logit_sum)`` over the whole vocabulary from ``linear_lse_kernel``'s
    per-split partials ``partial`` ``[3 or 4, S, N]``: running max ``m_s``, sum of exponentials
    ``s_s`` (relative to ``m_s``), target logit and, with a fourth row, sum of logits, for each of
    the ``S`` vocabulary splits.

        lse = M + log(sum_s s_s * exp(m_s - M)),  M = max_s m_s

    (the online-softmax merge: rescaling each split to the largest max cannot overflow).  Each
    label lies in one split and the others add 0, so ``target`` (and ``logit_sum``) are sums over
    splits.  ``logit_sum`` is None without a fourth row.  One split needs no rescaling.
    """
    run_max, run_sum, target = partial[0], partial[1], partial[2]
    if run_max.shape[0] == 1:
        lse = run_max[0] + torch.log(run_sum[0])
    else:
        top = run_max.max(dim=0).values
        lse = top + torch.log((run_sum * torch.exp(run_max - top)).sum(dim=0))
    return lse, target.sum(dim=0), partial[3].sum(dim=0) if partial.shape[0] == 4 else None


def linear_lse_forward(hidden, weight, bias, labels, rows, n_valid, *, softcap=None,
                       logit_sum=False, tiles: TileConfig | None = None):
    """Per-token ``lse``, ``target`` logit and (optionally) sum of logits over the vocabulary (in
    the logits tiles under a softcap, else by ``linear_logit_sums``).

    ``hidden`` is ``[R, T, D]`` (any strides), ``weight`` ``[V, D]``, ``bias`` ``[V]`` or None,
    ``labels`` ``[R*T]`` int64, ``rows`` the int32 valid-first row index (its length bounds the
    number of valid rows), ``n_valid`` a one-element int32 device tensor.  Returns fp32 ``[R*T]``
    tensors whose entries at rows not among the first ``n_valid`` of ``rows`` are undefined.
    """
    R, T, D = hidden.shape
    N, V = R * T, weight.shape[0]
    tiles = tiles or tiles_for(hidden.dtype)
    splits, v_per_split = vocab_splits(rows.numel(), V, hidden.device, tiles)
    tile_sum = logit_sum and softcap is not None
    partial = torch.empty((4 if tile_sum else 3, splits, N), device=hidden.device, dtype=torch.float32)
    if rows.numel() > 0:
        grid = (triton.cdiv(rows.numel(), tiles.block_n), splits)
        linear_lse_kernel[grid](
            hidden, weight, bias, labels, rows, n_valid,
            partial[0], partial[1], partial[2], partial[3] if tile_sum else partial[0],
            N, V, D, T, v_per_split,
            hidden.stride(0), hidden.stride(1), hidden.stride(2), weight.stride(0), weight.stride(1),
            LOGIT_SUM=tile_sum, **logits_launch_args(hidden.dtype, bias, softcap, tiles),
        )
    lse, target, sums = combine_vocab_splits(partial)
    if logit_sum and not tile_sum:
        sums = linear_logit_sums(hidden, weight, bias, rows, n_valid)
    return lse, target, sums


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """This module's ahead-of-time builds at input ``dtype`` (``tiles.AotSpec``): the logits kernel
    in ``aot_logits_variants``, the logit-sum kernel with and without a bias, the column sum."""
    partials = dict.fromkeys(("max_ptr", "sumexp_ptr", "target_ptr", "logit_sum_ptr"), torch.float32)
    logit_sum_pointers = {"h_ptr": dtype, "w_sum_ptr": torch.float64, "b_sum_ptr": torch.float64,
                          "rows_ptr": torch.int32, "n_valid_ptr": torch.int32, "out_ptr": torch.float32}
    specs = []
    for variant, constexprs, options in aot_logits_variants(dtype):
        has_bias = constexprs["HAS_BIAS"]
        # The tiles sum logits only under a softcap (linear_lse_forward): that is the larger variant.
        specs.append(AotSpec("linear_lse", variant, linear_lse_kernel,
                             {**logits_input_pointers(dtype), **partials},
                             {**constexprs, "LOGIT_SUM": constexprs["HAS_SOFTCAP"]}, options))
        specs.append(AotSpec("logit_sum", DTYPE_NAMES[dtype] + ("+bias" if has_bias else ""), logit_sum_kernel,
                             logit_sum_pointers,
                             {"HAS_BIAS": has_bias, "BLOCK_N": LOGIT_SUM_BLOCK_N, "BLOCK_D": LOGIT_SUM_BLOCK_D},
                             {"num_warps": LOGIT_SUM_NUM_WARPS}))
    specs.append(AotSpec("column_sum", DTYPE_NAMES[dtype], column_sum_kernel,
                         {"w_ptr": dtype, "out_ptr": torch.float64},
                         {"BLOCK_V": COLUMN_SUM_BLOCK_V, "BLOCK_D": COLUMN_SUM_BLOCK_D},
                         {"num_warps": COLUMN_SUM_NUM_WARPS}))
    return specs


__all__ = ["aot_specs", "column_sum_kernel", "combine_vocab_splits", "linear_logit_sums", "linear_lse_forward",
           "linear_lse_kernel", "logit_sum_kernel", "vocab_splits", "vocabulary_column_sum"]
