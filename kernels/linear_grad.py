"""Backward: the weighted cross-entropy gradient of DESIGN.md section 1, one vocabulary chunk at a time.

Strategy (b) of DESIGN.md section 4, V-chunked.  For each chunk of the vocabulary a Triton kernel
recomputes the logits of the valid rows (the same ``logits_tile`` and tile shapes as the forward)
and writes ``dz' = onehot(label) - softmax(z)`` (times ``1 - tanh^2`` under a softcap) into a
workspace ``[n_rows, V_chunk]`` in the input dtype; two cuBLAS products through torch then give

    d_hidden += dz' @ W[chunk]              (fp32 accumulator, rows scaled by g afterwards; on
                                             CUDA cuBLAS adds into it, kernels/products.py)
    d_weight[chunk] = dz'.T @ (g * H)       d_bias[chunk] = dz'.T @ g

In the "cublas" tile plan (``tiles.PLANS``) cuBLAS computes each chunk's fp32 logits first and the
kernel reads them (``LOGITS_GIVEN``) where it would compute its tile: the chunk then holds 4 more
bytes per entry, and the gathered rows are kept unscaled too (``2·N·D`` bytes more).

Why (b) and not (a), the fully fused kernel with atomics: (a) ran 4.3x slower on an H200 (no
gradient filtering; benchmarks/NOTES.md), and its atomics made results run-to-run different, so it
was removed.  (b) is exact, deterministic, spends the two
D-wide products in cuBLAS, and its extra traffic (3 x N x V_chunk elements per chunk) is small next
to those products.  The per-row weight ``g = dLoss/dlogp`` is applied outside the workspace, so the
workspace holds values in [-1, 1]: a fp16 workspace cannot underflow on a small ``g``.  With more
per-row weights (``ROW_WEIGHTS``: an entropy term, a z-loss, label smoothing) each row is divided
by its largest weight instead, so the values stay of order 1 (up to about ``log V`` from the
entropy's ``z - E[z]``, and times the per-class weights of a class-weighted smoothing).
"""

import torch
import triton
import triton.language as tl

from .products import add_product, adds_into_fp32, fp32_logits
from .tiles import (DEFAULT_PLAN, STATS_PLANS, WORKSPACE_BYTES, AotSpec, aot_logits_variants, chain_to_product,
                    check_unit_stride_bias, group_rows, grouped_tile, labelled_rows_lse, launch_tiles,
                    logits_input_pointers, logits_launch_args, logits_tile, row_tile_start, stored_logits,
                    workspace_dtype)

# The workspace never holds more than ``workspace_bytes`` (tiles.WORKSPACE_BYTES by default), nor
# more than 1/16 of the logits it replaces: at 16k tokens and bf16 that is 8k vocabulary columns
# per chunk, GEMMs of 16k x 8k x D, large enough for cuBLAS to run near peak.
MAX_CHUNK_FRACTION = 16


@triton.jit
def linear_grad_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, labels_ptr, rows_ptr, n_valid_ptr, lse_ptr, target_ptr, dz_ptr,
    g_ptr, g_softmax_ptr, g_entropy_ptr, mean_z_ptr, g_uniform_ptr, class_weight_ptr, z_ptr,
    # sizes
    V, D, T, v_chunk_start, v_chunk_end, n_row_tiles, n_vocab_tiles, n_group_rows,
    # strides
    stride_h_r, stride_h_t, stride_h_d, stride_w_v, stride_w_d, stride_dz_p, stride_z_p,
    # scalars
    softcap, inv_temperature,
    # variants
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, ROW_WEIGHTS: tl.constexpr,
    LOGITS_GIVEN: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: ``dz'`` of BLOCK_N valid rows against BLOCK_V entries of the vocabulary chunk
    ``v_chunk_start .. v_chunk_end`` (``tiles.grouped_tile`` orders them), stored in ``dz`` at (the
    row's position in the row index, the entry's column in the chunk).  With ``ROW_WEIGHTS`` the
    rows' weights are applied here, per token at ``g``, ``g_softmax``, ``g_entropy``, ``mean_z``
    and ``g_uniform``.  With ``LOGITS_GIVEN`` the chunk's logits are read from the fp32 products
    cuBLAS wrote at ``z`` (a row per position of the row index, a column per entry of the chunk)
    instead of computed::

        dz = g onehot - p (g_softmax + g_entropy (z - E[z])) + g_uniform c_v

    the gradient of ``g logp + g_L lse + g_H H + g_S sum_v c_v z_v`` (``c`` the per-class weights
    at ``class_weight``, ones without any) with ``g_softmax = g - g_L``
    (``dlogp/dz = onehot - p``, ``dlse/dz = p``, and ``H = lse - E[z]`` gives ``dH/dz = -p (z - E[z])``)."""
    row_tile, vocab_tile = grouped_tile(n_row_tiles, n_vocab_tiles, n_group_rows)
    p0, n_valid = row_tile_start(n_valid_ptr, row_tile, BLOCK_N)
    if p0 >= n_valid:
        return
    offs_p, row, p_mask, h_offset, label, lse = labelled_rows_lse(rows_ptr, labels_ptr, lse_ptr, n_valid, p0, V, T,
                                                                  stride_h_r, stride_h_t, BLOCK_N)
    # The forward's target logit, the value its logp used: the label's z from tiles of the same
    # plan (equal to this program's z there up to the compiler's contractions of what follows the
    # product, e.g. an FMA into exp's argument).
    z_label = tl.load(target_ptr + row, mask=p_mask, other=0.0)
    if ROW_WEIGHTS:
        # Loaded before the logits loop, as the lse is (labelled_rows_lse says why).
        g = tl.load(g_ptr + row, mask=p_mask, other=0.0)
        g_softmax = tl.load(g_softmax_ptr + row, mask=p_mask, other=0.0)
        g_entropy = tl.load(g_entropy_ptr + row, mask=p_mask, other=0.0)
        mean_z = tl.load(mean_z_ptr + row, mask=p_mask, other=0.0)
        g_uniform = tl.load(g_uniform_ptr + row, mask=p_mask, other=0.0)
    v0 = v_chunk_start + vocab_tile * BLOCK_V
    if LOGITS_GIVEN:
        z_rows = z_ptr + offs_p.to(tl.int64)[:, None] * stride_z_p - v_chunk_start
        z, offs_v, _ = stored_logits(z_rows, b_ptr, p_mask, v0, v_chunk_end, softcap, inv_temperature,
                                     HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK_V)
    else:
        z, offs_v, _ = logits_tile(
            h_ptr, w_ptr, b_ptr, h_offset, p_mask, v0, V, D,
            stride_h_d, stride_w_v, stride_w_d, softcap, inv_temperature,
            HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, DOT_IN_FP32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
    # The tile holds every term but the one-hot's; the label's column is rewritten below.  A
    # one-hot compared over the whole tile took the 128x256 build past 255 registers (ptxas,
    # sm_90: 112-168 bytes of spills; 189-234 registers without it).
    p = tl.exp(z - lse[:, None])
    if ROW_WEIGHTS:
        class_weight = tl.load(class_weight_ptr + offs_v, mask=offs_v < V, other=0.0)
        dz = g_uniform[:, None] * class_weight[None, :] - p * (g_softmax[:, None] + g_entropy[:, None] * (z - mean_z[:, None]))
    else:
        dz = -p
    dz = chain_to_product(dz, z, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    col_mask = offs_v < v_chunk_end
    dz_offset = offs_p.to(tl.int64)[:, None] * stride_dz_p + (offs_v - v_chunk_start)[None, :]
    tl.store(dz_ptr + dz_offset, dz.to(dz_ptr.dtype.element_ty), mask=p_mask[:, None] & col_mask[None, :])

    # The label's column: the same terms plus the one-hot's, from one value per row.
    p_label = tl.exp(z_label - lse)
    if ROW_WEIGHTS:
        class_weight_label = tl.load(class_weight_ptr + label, mask=p_mask & (label >= 0), other=0.0)
        dz_label = g + (g_uniform * class_weight_label - p_label * (g_softmax + g_entropy * (z_label - mean_z)))
    else:
        dz_label = 1.0 - p_label
    dz_label = chain_to_product(dz_label, z_label, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    # Stored after every thread's tile store (a barrier orders a CTA's global stores), so it wins.
    tl.debug_barrier()
    in_tile = p_mask & (label >= v0) & (label < v0 + BLOCK_V) & (label < v_chunk_end)
    tl.store(dz_ptr + offs_p.to(tl.int64) * stride_dz_p + (label - v_chunk_start),
             dz_label.to(dz_ptr.dtype.element_ty), mask=in_tile)


def linear_grad_chunk(dz, hidden, weight, bias, labels, rows, n_valid, lse, target, v_start, *,
                      softcap=None, temperature=1.0, weights=None, plan: str = DEFAULT_PLAN, logits=None):
    """Write ``dz'`` for vocabulary entries ``v_start .. v_start + dz.shape[1]`` into ``dz``.

    ``dz`` is ``[len(rows), V_chunk]`` with unit column stride; ``lse`` and ``target`` are the
    forward's per-token outputs (fp32 ``[R*T]``, ``target`` the label's logit from the forward's
    tiles, i.e. of the same plan); rows of ``dz`` past the device-side valid count are left untouched (the caller zero-fills the workspace once).  ``weights``: None,
    or per-token fp32 ``(g, g_softmax, g_entropy, mean_z, g_uniform)`` and the per-class fp32
    ``class_weight`` ``[V]``, applied in the kernel (``ROW_WEIGHTS``).  ``logits``: the chunk's
    fp32 products ``hidden[rows] @ weight[chunk].T`` (unit column stride), read instead of
    computed (the "cublas" plan).
    """
    if rows.numel() == 0:
        return
    assert logits is None or logits.stride(1) == 1, "the kernel reads the logits with unit column stride"
    V, D = weight.shape
    T = hidden.shape[1]
    check_unit_stride_bias(bias)
    tiles = launch_tiles(plan, hidden, weight, bias, softcap)
    row_tiles, vocab_tiles = triton.cdiv(rows.numel(), tiles.block_n), triton.cdiv(dz.shape[1], tiles.block_v)
    row_weights = (lse,) * 6 if weights is None else weights
    linear_grad_kernel[(row_tiles * vocab_tiles,)](
        hidden, weight, weight if bias is None else bias, labels, rows, n_valid, lse, target, dz, *row_weights,
        lse if logits is None else logits,
        V, D, T, v_start, v_start + dz.shape[1], row_tiles, vocab_tiles, group_rows(tiles, row_tiles),
        hidden.stride(0), hidden.stride(1), hidden.stride(2), weight.stride(0), weight.stride(1),
        dz.stride(0), 0 if logits is None else logits.stride(0),
        ROW_WEIGHTS=weights is not None, LOGITS_GIVEN=logits is not None,
        **logits_launch_args(hidden.dtype, bias, softcap, temperature, tiles),
    )


def vocab_chunk_size(n_rows: int, V: int, itemsize: int, block_v: int,
                     workspace_bytes: int = WORKSPACE_BYTES, logits_bytes: int = 0) -> int:
    """Vocabulary columns per backward chunk: a multiple of BLOCK_V within the workspace bounds, the
    chunk's ``dz`` (``itemsize`` bytes an entry) and, in the "cublas" plan, its fp32 logits
    (``logits_bytes``) holding at most ``workspace_bytes`` and a 16th of the logits' bytes in the
    input dtype (at least one BLOCK_V-wide chunk)."""
    entry_bytes = itemsize + logits_bytes
    by_bytes = workspace_bytes // max(1, n_rows * entry_bytes)
    by_fraction = triton.cdiv(V * itemsize, MAX_CHUNK_FRACTION * entry_bytes)
    chunk = min(by_bytes, by_fraction) // block_v * block_v
    return max(block_v, chunk)


def linear_grad_backward(grad_logp, hidden, weight, bias, labels, rows, n_valid, lse, target, *,
                         softcap=None, temperature=1.0, needs=(True, True, True),
                         workspace_bytes=WORKSPACE_BYTES, plan: str = DEFAULT_PLAN, grad_lse=None,
                         grad_logit_sum=None, grad_entropy=None, mean_z=None, class_weight=None):
    """Gradients of ``sum_i grad_logp[i] * logp[i]`` w.r.t. hidden, weight and bias.

    Shapes as in ``linear_lse_forward``, whose ``lse`` and ``target`` this takes; ``grad_logp`` is fp32 ``[R*T]``.  ``needs`` says which of
    (hidden, weight, bias) want a gradient; the others come back as None.  Gradients are returned
    in the input dtype, ``d_hidden`` as a contiguous ``[R, T, D]``.  ``plan`` must be the forward's
    (``tiles.PLANS``), so the logits are rounded as they were there.

    The gradient also of the per-token losses' other terms, each fp32 ``[R*T]`` or None:
    ``grad_lse`` of ``sum_i grad_lse[i] * lse[i]`` (a z-loss), ``grad_logit_sum`` of the sum of
    logits over the vocabulary, each times ``class_weight`` when given (label smoothing), ``grad_entropy`` of the entropy (with ``mean_z
    = lse - entropy``).  Several per-row weights do not factor out of the workspace whole: each
    row's largest, ``s``, does, as ``g`` does alone, and the kernel applies the weights divided by
    it (at most 1 in size), so the workspace keeps values of order 1 and its dtype.  (In fp16 the
    uniform term of label smoothing, about ``eps / V`` of the row's scale, is below the normal range
    (6.1e-5) for V above about 16k x eps: it is stored as a subnormal with fewer bits of precision,
    where bf16 and fp32 keep their 8 and 24.)
    """
    R, T, D = hidden.shape
    V = weight.shape[0]
    check_unit_stride_bias(bias)
    tiles = launch_tiles(plan, hidden, weight, bias, softcap)
    n_rows = rows.numel()
    rows_long = rows.long()
    weights = _row_weights(grad_logp, grad_lse, grad_logit_sum, grad_entropy, mean_z, class_weight, V)
    if weights is not None:
        weights, larger = weights
        g = larger[rows_long]
    else:
        g = grad_logp.float()[rows_long]
    need_h, need_w, need_b = needs
    d_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    d_bias = torch.empty(V, device=weight.device, dtype=torch.float32) if need_b else None
    if n_rows == 0:
        return (d_hidden, None if d_weight is None else d_weight.zero_(),
                None if d_bias is None else d_bias.to(bias.dtype).zero_())

    # The valid rows of hidden, gathered once (cuBLAS takes no row index) and pre-scaled by g.
    picked = (rows_long // T, rows_long % T)
    g_in = g.to(hidden.dtype)
    # The "cublas" plan's logits take the rows unscaled: a second gathered copy.
    rows_h = hidden[picked] if tiles.cublas_logits else None
    # Unvalidated, the row index lists the ignored tokens after its n_valid valid ones.  Their dz rows
    # stay 0, but their hidden states may be NaN or inf (a fully masked row of some attention
    # kernels), and 0 * NaN in the d_weight product would reach every column: zeroed here.
    ignored = (torch.arange(n_rows, device=hidden.device) >= n_valid)[:, None]
    # In the input dtype: the product is rounded once, as an fp32 product cast back would be,
    # without an fp32 [N, D] temporary (in place on the gather where nothing else reads it).
    if need_w:
        h_scaled = hidden[picked] if rows_h is None else rows_h.clone()
        h_scaled.mul_(g_in[:, None]).masked_fill_(ignored, 0)
    else:
        h_scaled = None
    # The "cublas" plan's chunk holds its fp32 logits beside dz: 4 more bytes per entry.
    chunk = vocab_chunk_size(n_rows, V, hidden.element_size(), tiles.block_v, workspace_bytes,
                             logits_bytes=4 * tiles.cublas_logits)
    workspace = torch.zeros((n_rows, min(chunk, V)), device=hidden.device, dtype=workspace_dtype(hidden.dtype))
    # Where cuBLAS adds into fp32 (CUDA, kernels/products.py), each chunk's product goes into the
    # accumulator: no [N, D] temporary, and no rounding to the input dtype before the sum.
    # Elsewhere (the CPU, a torch that refuses it) the product is made in the input dtype and added.
    in_place = need_h and adds_into_fp32(hidden)
    dh_acc = torch.zeros((n_rows, D), device=hidden.device, dtype=torch.float32) if in_place else None
    for v_start in range(0, V, chunk):
        v_end = min(v_start + chunk, V)
        dz = workspace[:, : v_end - v_start]
        logits = fp32_logits(rows_h, weight[v_start:v_end]) if tiles.cublas_logits else None
        linear_grad_chunk(dz, hidden, weight, bias, labels, rows, n_valid, lse, target, v_start,
                          softcap=softcap, temperature=temperature, weights=weights,
                          plan=plan, logits=logits)
        del logits  # before the products' outputs exist
        dz = dz.to(hidden.dtype)    # a no-op except under the interpreter (see workspace_dtype)
        if in_place:
            add_product(dh_acc, dz, weight[v_start:v_end])
        elif need_h:
            # Accumulated without a name that outlives the chunk, so two chunk products never coexist.
            dh_acc = (dz @ weight[v_start:v_end]).float() if dh_acc is None else dh_acc.add_(dz @ weight[v_start:v_end])
        if need_w:
            torch.mm(dz.t(), h_scaled, out=d_weight[v_start:v_end])
        if need_b:
            d_bias[v_start:v_end] = dz.t() @ g_in
    if need_h:
        del workspace, h_scaled, rows_h, dz  # the temporaries go before d_hidden's cast is made
        d_hidden[picked] = dh_acc.mul_(g[:, None]).to(hidden.dtype)
    return d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype)


def _row_weights(grad_logp, grad_lse, grad_logit_sum, grad_entropy, mean_z, class_weight, V):
    """The kernel's per-row weights ``(g, g_softmax, g_entropy, mean_z, g_uniform)``, each divided by
    the row's largest, and the per-class weights (ones without any), returned with the row's
    largest; or None when the log-prob's ``g`` is the only one."""
    if grad_lse is None and grad_logit_sum is None and grad_entropy is None:
        return None
    g = grad_logp.float()
    zero = torch.zeros_like(g)
    g_softmax = g if grad_lse is None else g - grad_lse.float()
    g_entropy = zero if grad_entropy is None else grad_entropy.float()
    g_uniform = zero if grad_logit_sum is None else grad_logit_sum.float()
    larger = torch.stack([g, g_softmax, g_entropy, g_uniform]).abs().amax(dim=0)
    larger = torch.where(larger > 0, larger, 1.0)
    mean_z = zero if mean_z is None else mean_z.float()
    per_class = (torch.ones(V, device=g.device, dtype=torch.float32) if class_weight is None
                 else class_weight.detach().float().contiguous())
    return tuple((w / larger).contiguous() for w in (g, g_softmax, g_entropy)) + (
        mean_z.contiguous(), (g_uniform / larger).contiguous(), per_class), larger


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """This module's ahead-of-time builds at input ``dtype`` (``tiles.AotSpec``): the kernel in
    ``aot_logits_variants``, writing the workspace dtype a GPU uses."""
    specs = []
    for build in aot_logits_variants(dtype):
        # Per-row weights run in the statistics' plans only (tiles.STATS_PLANS): their larger
        # variants carry them.
        weighted = build.constexprs["HAS_BIAS"] and build.plan in STATS_PLANS
        pointers = {**logits_input_pointers(dtype), "lse_ptr": torch.float32, "target_ptr": torch.float32,
                    "dz_ptr": workspace_dtype(dtype, interpreted=False),
                    **dict.fromkeys(("g_ptr", "g_softmax_ptr", "g_entropy_ptr", "mean_z_ptr", "g_uniform_ptr",
                                     "class_weight_ptr", "z_ptr"), torch.float32)}
        # The "cublas" plan's build reads the logits; it reads no input but through stored_logits, so
        # its aligned build stands for every layout it runs in.
        specs.append(AotSpec("linear_grad", build.variant + ("+weights" if weighted else ""), linear_grad_kernel,
                             pointers, {**build.constexprs, "ROW_WEIGHTS": weighted,
                                        "LOGITS_GIVEN": build.cublas_logits},
                             build.options, build.layouts, build.archs))
    return specs


def peak_temporaries(itemsize: int, adds_into_fp32: bool = False) -> list[tuple[float, str, str]]:
    """What ``linear_grad_backward`` holds at its peak (its last chunk) beyond its inputs, the
    gradients it returns and the ``dz`` workspace, for inputs of ``itemsize`` bytes: ``(bytes per
    unit, monomial, why)`` with N the rows of the row index and D the hidden size.  O(N) terms are
    left out.  ``adds_into_fp32``: where cuBLAS adds each chunk's product into the accumulator
    (``kernels/products.py``), which has no product temporary.  fused_pref/tools/accounting.py checks
    it (on the CPU, without) against a measurement."""
    return [
        (4, "N·D", "fp32 d_hidden accumulator (dh_acc)"),
        *(() if adds_into_fp32 else ((itemsize, "N·D", "the chunk's dz @ W product, input dtype, until it is added"),)),
        (itemsize, "N·D", "gathered rows scaled by g (h_scaled), input dtype, scaled in place"),
    ]


__all__ = ["MAX_CHUNK_FRACTION", "aot_specs", "linear_grad_backward", "linear_grad_chunk", "linear_grad_kernel", "peak_temporaries",
           "vocab_chunk_size"]
