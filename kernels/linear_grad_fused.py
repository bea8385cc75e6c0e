"""Backward, strategy (a) of DESIGN.md section 4: fully fused, accumulated with atomics.

Each program recomputes one (rows x vocabulary) logits tile with the forward's ``logits_tile``,
forms ``dz = g * (onehot - softmax)`` (times ``1 - tanh^2`` under a softcap) in registers, and adds
``dz @ W_tile`` into an fp32 ``d_hidden`` and ``dz.T @ H_tile`` into an fp32 ``d_weight`` with
atomics, D-block by D-block.  No workspace and no second pass over the logits, but fp32 ``[V, D]``
and ``[N, D]`` accumulators, and atomics make the summation order, hence the last bits, differ
from run to run: it is never chosen under ``deterministic=True`` or
``torch.use_deterministic_algorithms(True)``.  Cut Cross-Entropy found this layout fast only when
gradient filtering skips most tiles; which strategy wins here is for a GPU to measure
(``python -m fused_pref bench``), so the V-chunked backward stays the default.
"""

import torch
import triton
import triton.language as tl

from .tiles import (AotSpec, TileConfig, aot_logits_variants, dot_acc, labelled_rows_lse, logits_input_pointers,
                    logits_launch_args, logits_tile, logp_grad_tile, row_tile_start, tiles_for)


@triton.jit
def linear_grad_fused_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, labels_ptr, rows_ptr, n_valid_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
    # sizes
    V, D, T,
    # strides
    stride_h_r, stride_h_t, stride_h_d, stride_w_v, stride_w_d,
    # scalars
    softcap,
    # variants
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr,
    NEED_B: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: the (BLOCK_N valid rows x BLOCK_V vocabulary entries) tile at program ids
    (0, 1).  Adds its ``g``-weighted ``dz`` products into the fp32 ``dh`` (rows in row-index order),
    ``dw`` and ``db`` accumulators with atomics, D-block by D-block."""
    p0, n_valid = row_tile_start(n_valid_ptr, BLOCK_N)
    if p0 >= n_valid:
        return
    offs_p, row, p_mask, h_offset, label, lse = labelled_rows_lse(rows_ptr, labels_ptr, lse_ptr, n_valid, p0, V, T,
                                                                  stride_h_r, stride_h_t, BLOCK_N)
    g = tl.load(g_ptr + offs_p, mask=p_mask, other=0.0)

    z, offs_v, v_mask = logits_tile(
        h_ptr, w_ptr, b_ptr, h_offset, p_mask, tl.program_id(1) * BLOCK_V, V, D,
        stride_h_d, stride_w_v, stride_w_d, softcap,
        HAS_BIAS, HAS_SOFTCAP, DOT_IN_FP32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )
    dz = logp_grad_tile(z, offs_v, label, lse, softcap, HAS_SOFTCAP)
    dz = tl.where(p_mask[:, None] & v_mask[None, :], dz * g[:, None], 0.0)
    if NEED_B:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_mask)
    # The products run on the tensor cores, in the input dtype.  Under the interpreter (DOT_IN_FP32)
    # they run in fp32 anyway, and its fp32 -> bf16 cast truncates where a GPU rounds, so dz stays fp32.
    dz_in = dz if DOT_IN_FP32 else dz.to(h_ptr.dtype.element_ty)

    w_row = offs_v.to(tl.int64) * stride_w_v
    dh_row = offs_p.to(tl.int64) * D
    dw_row = offs_v.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if NEED_H:
            w = tl.load(w_ptr + w_row[:, None] + offs_d[None, :] * stride_w_d,
                        mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            dh = dot_acc(dz_in, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), DOT_IN_FP32, DOT_PRECISION)
            tl.atomic_add(dh_ptr + dh_row[:, None] + offs_d[None, :], dh, mask=p_mask[:, None] & d_mask[None, :])
        if NEED_W:
            h = tl.load(h_ptr + h_offset[:, None] + offs_d[None, :] * stride_h_d,
                        mask=p_mask[:, None] & d_mask[None, :], other=0.0)
            dw = dot_acc(tl.trans(dz_in), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), DOT_IN_FP32,
                         DOT_PRECISION)
            tl.atomic_add(dw_ptr + dw_row[:, None] + offs_d[None, :], dw, mask=v_mask[:, None] & d_mask[None, :])


def linear_grad_fused_backward(grad_logp, hidden, weight, bias, labels, rows, n_valid, lse, *, softcap=None,
                               needs=(True, True, True), tiles: TileConfig | None = None):
    """Same contract as ``linear_grad.linear_grad_backward``, with fp32 atomic accumulators."""
    R, T, D = hidden.shape
    V = weight.shape[0]
    tiles = tiles or tiles_for(hidden.dtype)
    need_h, need_w, need_b = needs
    n_rows = rows.numel()
    rows_long = rows.long()
    g = grad_logp.float()[rows_long]
    dh = torch.zeros((n_rows, D), device=hidden.device, dtype=torch.float32) if need_h else None
    dw = torch.zeros((V, D), device=weight.device, dtype=torch.float32) if need_w else None
    db = torch.zeros(V, device=weight.device, dtype=torch.float32) if need_b else None
    if n_rows:
        grid = (triton.cdiv(n_rows, tiles.block_n), triton.cdiv(V, tiles.block_v))
        linear_grad_fused_kernel[grid](
            hidden, weight, weight if bias is None else bias, labels, rows, n_valid, lse, g,
            g if dh is None else dh, g if dw is None else dw, g if db is None else db,
            V, D, T,
            hidden.stride(0), hidden.stride(1), hidden.stride(2), weight.stride(0), weight.stride(1),
            NEED_H=need_h, NEED_W=need_w, NEED_B=need_b,
            **logits_launch_args(hidden.dtype, bias, softcap, tiles),
        )
    d_hidden = None
    if need_h:
        d_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        d_hidden[rows_long // T, rows_long % T] = dh.to(hidden.dtype)
    return (d_hidden, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """This module's ahead-of-time builds at input ``dtype`` (``tiles.AotSpec``): the kernel in
    ``aot_logits_variants``, every gradient wanted (``d_bias`` where there is a bias)."""
    pointers = {**logits_input_pointers(dtype),
                **dict.fromkeys(("lse_ptr", "g_ptr", "dh_ptr", "dw_ptr", "db_ptr"), torch.float32)}
    return [AotSpec("linear_grad_fused", variant, linear_grad_fused_kernel, pointers,
                    {**constexprs, "NEED_H": True, "NEED_W": True, "NEED_B": constexprs["HAS_BIAS"]}, options)
            for variant, constexprs, options in aot_logits_variants(dtype)]


def peak_temporaries(itemsize: int) -> list[tuple[float, str, str]]:
    """What ``linear_grad_fused_backward`` holds at its peak (while ``d_hidden``'s accumulator is cast)
    beyond its inputs and the gradients it returns, for inputs of ``itemsize`` bytes: ``(bytes per
    unit, monomial, why)`` with N the rows of the row index, D the hidden size and V the vocabulary.
    O(N) and O(V) terms are left out.  fused_pref/tools/accounting.py checks it against a measurement."""
    return [
        (4, "N·D", "fp32 d_hidden accumulator (dh)"),
        (itemsize, "N·D", "dh cast to the input dtype, alive with dh"),
        (4, "V·D", "fp32 d_weight accumulator (dw)"),
    ]


__all__ = ["aot_specs", "linear_grad_fused_backward", "linear_grad_fused_kernel", "peak_temporaries"]
