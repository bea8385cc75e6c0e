"""Forward: per-token log-sum-exp over the vocabulary, the target logit and the sum of logits.

Each program owns BLOCK_N valid rows and one contiguous vocabulary range (the vocabulary is split
across programs when there are too few row tiles to fill the GPU).  It walks its range in
BLOCK_V tiles with an online max / sum-exp, so no [N, V] tensor is ever stored.  The target logit is
picked from the same tiles as the lse, with the same rounding, so ``logp = target - lse <= 0``.
"""

import torch
import triton
import triton.language as tl

from .tiles import TileConfig, dot_flags, load_labels, logits_tile, tiles_for, valid_rows


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
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # The row index is ordered valid-first and the valid count lives on the device: tiles past it
    # return at once, so ignored tokens cost nothing and the host never synchronises.
    n_valid = tl.load(n_valid_ptr)
    p0 = pid_n * BLOCK_N
    if p0 >= n_valid:
        return
    offs_p, row, p_mask, h_offset = valid_rows(rows_ptr, n_valid, p0, T, stride_h_r, stride_h_t, BLOCK_N)
    label = load_labels(labels_ptr, row, p_mask, V)

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


def linear_lse_forward(hidden, weight, bias, labels, rows, n_valid, *, softcap=None,
                       logit_sum=False, tiles: TileConfig | None = None):
    """Per-token ``lse``, ``target`` logit and (optionally) sum of logits over the vocabulary.

    ``hidden`` is ``[R, T, D]`` (any strides), ``weight`` ``[V, D]``, ``bias`` ``[V]`` or None,
    ``labels`` ``[R*T]`` int64, ``rows`` the int32 valid-first row index (its length bounds the
    number of valid rows), ``n_valid`` a one-element int32 device tensor.  Returns fp32 ``[R*T]``
    tensors whose entries at rows not among the first ``n_valid`` of ``rows`` are undefined.
    """
    R, T, D = hidden.shape
    N, V = R * T, weight.shape[0]
    tiles = tiles or tiles_for(hidden.dtype)
    splits, v_per_split = vocab_splits(rows.numel(), V, hidden.device, tiles)
    partial = torch.empty((4 if logit_sum else 3, splits, N), device=hidden.device, dtype=torch.float32)
    if rows.numel() > 0:
        grid = (triton.cdiv(rows.numel(), tiles.block_n), splits)
        linear_lse_kernel[grid](
            hidden, weight, bias, labels, rows, n_valid,
            partial[0], partial[1], partial[2], partial[3] if logit_sum else partial[0],
            N, V, D, T, v_per_split,
            hidden.stride(0), hidden.stride(1), hidden.stride(2), weight.stride(0), weight.stride(1),
            1.0 if softcap is None else float(softcap),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, LOGIT_SUM=logit_sum,
            **dot_flags(hidden.dtype),
            BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    run_max, run_sum, target = partial[0], partial[1], partial[2]
    if splits == 1:
        lse = run_max[0] + torch.log(run_sum[0])
    else:
        top = run_max.max(dim=0).values
        lse = top + torch.log((run_sum * torch.exp(run_max - top)).sum(dim=0))
    return lse, target.sum(dim=0), partial[3].sum(dim=0) if logit_sum else None


__all__ = ["linear_lse_forward", "linear_lse_kernel", "vocab_splits"]
