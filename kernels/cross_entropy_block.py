"""Cross-entropy over a block of fp32 logits that cuBLAS wrote: each row's ``-logp`` and ``dz``.

The gradient-in-forward mode (``fused_pref.gradient_in_forward``) has cuBLAS write the logits of a
block of valid rows ``[rows, V]`` in fp32; this kernel turns them, in two passes over each row,
into

    nlp_i = lse_i - z_i[label_i]              (the row's cross-entropy, minus its log-prob)
    dz_i  = softmax(z_i) - onehot(label_i)    (d nlp_i / d logits: times 1/T under a temperature,
                                               1 - (z T / c)^2 under a softcap)

with ``z = softcap(logits + bias) / T``, with ``LOGIT_SUM`` also ``sum_v z_i[v]`` (the
preference losses' ``logits/*`` metrics), and with ``STATS`` each row's entropy, argmax (the first
column holding the max, as ``torch.argmax``) and max logit, from the same first pass (the
preference losses' ``token_metrics``; the max merges a sharded vocabulary's argmax).  ``dz`` is
stored unscaled, in [-1, 1] as the default backward's workspace: scaled by a loss's per-row weight (``1/n`` for a mean) an fp16 ``dz`` would
underflow; the caller applies the weights to the rows instead.  Pass one keeps a running max and
sum of exponentials per lane and reduces them once at the row's end; pass two reads the row again
and writes ``dz`` in the input dtype, ready for the two products.  Per logit: two fp32 reads and
one write of the input dtype, where the same in torch ops (``logsumexp``, ``exp_``, ``scatter_``,
``mul_``, a cast) reads and writes the block about eight times.  Ignored rows point at label 0;
the caller gives them no weight.  The "cublas" tile plan's forward (``kernels/linear_lse.py``)
runs the first pass alone over blocks of its own, keeping each row's lse and target logit apart
(``LSE_AND_TARGET``, ``block_lse_and_target``): its backward needs both.
"""

import torch
import triton
import triton.language as tl

from .tiles import DTYPE_NAMES, AotSpec, check_unit_stride_bias, logp_grad_tile, stored_logits, workspace_dtype

# A row per program: a block holds a few hundred rows, each a long stream of V logits; 2048-wide
# steps keep 8 fp32 loads per thread in flight (the kernel is bound by memory, not arithmetic).
# 4096-wide ones spilled 4-12 bytes on sm_90 with triton 3.6's ptxas (capped at 64-80 registers),
# and without dz (no_grad, a pair loss's pass for the log-probs of a cut pair) 2048-wide ones
# spilled 8 bytes there with bias, softcap and temperature (at 48 registers, and at 96 with four
# warps): that one-pass kernel takes 1024-wide steps, as does the kernel with the statistics (with dz,
# bias, softcap, temperature and the sums, 2048-wide steps spilled 8 bytes on sm_80 with triton 3.6,
# capped at 80 registers).
BLOCK_R = 1
BLOCK_V = 2048
LOSS_BLOCK_V = 1024
NUM_WARPS = 8


@triton.jit
def _first_pass(z_rows, b_ptr, label, r_mask, nlp_ptr, target_ptr, sum_ptr, entropy_ptr, argmax_ptr, max_ptr, offs_r,
                V, softcap, inv_temperature, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_TEMPERATURE: tl.constexpr, LOGIT_SUM: tl.constexpr, LSE_AND_TARGET: tl.constexpr,
                STATS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """The rows' lse (returned) and, stored, their ``-logp`` or lse and target, logit sums and
    statistics."""
    # A finite floor, so that a lane no column has reached yet never computes inf - inf.
    run_max = tl.full((BLOCK_R, BLOCK_V), -1e30, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    target = tl.zeros((BLOCK_R,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    # Per lane, with STATS: sum of exp(z - run_max) * (run_max - z), each term >= 0 (the entropy
    # from it has no cancellation, as linear_lse's), and the first column holding run_max.
    run_spread = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    run_arg = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        z, offs_v, mask = stored_logits(z_rows, b_ptr, r_mask, v0, V, softcap, inv_temperature,
                                        HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK_V)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(run_max, z)
        rescale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max)
        if STATS:
            # The lane's terms so far move by its max's rise (run_sum is 0 before its first column, and
            # the floor finite); masked columns add 0 (e is 0 there), not 0 * inf.  Strictly greater:
            # a lane keeps its first column of a tie.
            rise = (new_max - run_max) * run_sum
            run_spread = (run_spread + rise) * rescale + e * tl.where(mask, new_max - z, 0.0)
            run_arg = tl.where(z > run_max, offs_v[None, :], run_arg)
        run_sum = run_sum * rescale + e
        run_max = new_max
        # A label past V (validate=False) matches no column, padded or not: its target stays 0.
        target += tl.sum(tl.where((offs_v[None, :] == label[:, None]) & mask, z, 0.0), axis=1)
        if LOGIT_SUM:
            logit_sum += tl.where(mask, z, 0.0)
    row_max = tl.max(run_max, axis=1)
    lane_weight = tl.exp(run_max - row_max[:, None])
    total = tl.sum(run_sum * lane_weight, axis=1)
    lse = row_max + tl.log(total)
    if STATS:
        # H = log(total) + sum_v p_v (row_max - z_v), each lane's terms moved to the row's max.
        lane_spread = (run_spread + (row_max[:, None] - run_max) * run_sum) * lane_weight
        tl.store(entropy_ptr + offs_r, tl.log(total) + tl.sum(lane_spread, axis=1) / total, mask=r_mask)
        # The first column among the lanes holding the row's max.
        first = tl.min(tl.where(run_max == row_max[:, None], run_arg, V), axis=1)
        tl.store(argmax_ptr + offs_r, first.to(tl.int64), mask=r_mask)
        tl.store(max_ptr + offs_r, row_max, mask=r_mask)
    if LSE_AND_TARGET:
        tl.store(nlp_ptr + offs_r, lse, mask=r_mask)
        tl.store(target_ptr + offs_r, target, mask=r_mask)
    else:
        tl.store(nlp_ptr + offs_r, lse - target, mask=r_mask)
    if LOGIT_SUM:
        tl.store(sum_ptr + offs_r, tl.sum(logit_sum, axis=1), mask=r_mask)
    return lse


@triton.jit
def cross_entropy_block_kernel(
    z_ptr, b_ptr, labels_ptr, nlp_ptr, target_ptr, sum_ptr, entropy_ptr, argmax_ptr, max_ptr, dz_ptr,
    n_rows, V, stride_z, stride_dz, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, LOGIT_SUM: tl.constexpr,
    STATS: tl.constexpr, WRITE_DZ: tl.constexpr, LSE_AND_TARGET: tl.constexpr, LSE_GIVEN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """BLOCK_R rows of the block: their ``-logp`` (with ``LSE_AND_TARGET`` their lse instead, and
    their target logit at ``target_ptr``), with ``LOGIT_SUM`` their sums of logits, with ``STATS``
    their entropy, argmax and max logit, and with ``WRITE_DZ`` their ``dz``.  With ``LSE_GIVEN`` only
    ``dz``, from the lse read at ``nlp_ptr`` (a sharded vocabulary's, merged across the ranks): the
    first pass is left out."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < n_rows
    label = tl.load(labels_ptr + offs_r, mask=r_mask, other=0)
    z_rows = z_ptr + offs_r.to(tl.int64)[:, None] * stride_z
    if LSE_GIVEN:
        tl.static_assert(WRITE_DZ and not LSE_AND_TARGET and not LOGIT_SUM and not STATS, "a given lse only writes dz")
        lse = tl.load(nlp_ptr + offs_r, mask=r_mask, other=0.0)
    else:
        lse = _first_pass(z_rows, b_ptr, label, r_mask, nlp_ptr, target_ptr, sum_ptr, entropy_ptr, argmax_ptr,
                          max_ptr, offs_r, V, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE,
                          LOGIT_SUM, LSE_AND_TARGET, STATS, BLOCK_R, BLOCK_V)
    if WRITE_DZ:
        dz_rows = dz_ptr + offs_r.to(tl.int64)[:, None] * stride_dz
        for v0 in range(0, V, BLOCK_V):
            z, offs_v, mask = stored_logits(z_rows, b_ptr, r_mask, v0, V, softcap, inv_temperature,
                                            HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK_V)
            # The loss's gradient is minus logp's.
            dz = -logp_grad_tile(z, offs_v, label, lse, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
            tl.store(dz_rows + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


def new_workspace(n_rows: int, V: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A ``dz`` block for inputs of ``dtype``: that dtype on a GPU, fp32 under the interpreter, whose
    casts to bf16 truncate (``tiles.workspace_dtype``; the caller rounds it with torch)."""
    return torch.empty(n_rows, V, dtype=workspace_dtype(dtype), device=device)


def cross_entropy_block(logits, bias, labels, *, softcap=None, temperature=1.0, dz=None,
                        logit_sum=None, stats=None) -> torch.Tensor:
    """Each row's ``-logp`` ``[rows]`` (fp32) under an fp32 ``logits`` block (unit column stride),
    with ``labels`` int64 per row; when ``dz`` (``[rows, V]``, unit column stride) is given, the
    gradient of each row's ``-logp`` written into it, when ``logit_sum`` (fp32 ``[rows]``) is,
    each row's sum of (soft-capped, tempered) logits, and when ``stats`` (``new_stats``) is, each
    row's entropy, argmax (a column of the block) and max logit."""
    nlp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _launch(logits, bias, labels, nlp, None, dz, logit_sum, softcap, temperature, stats=stats)
    return nlp


def new_stats(n_rows: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Buffers for ``n_rows`` rows' ``(entropy, argmax, max logit)``: fp32, int64, fp32."""
    return (torch.empty(n_rows, dtype=torch.float32, device=device),
            torch.empty(n_rows, dtype=torch.int64, device=device),
            torch.empty(n_rows, dtype=torch.float32, device=device))


def block_lse_and_target(logits, bias, labels, *, softcap=None, temperature=1.0,
                         logit_sum=None, stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-sum-exp and target logit (fp32 ``[rows]`` each; 0 for a label outside
    ``[0, V)``) under an fp32 ``logits`` block, as ``cross_entropy_block`` takes it: the forward of
    the "cublas" tile plan (``linear_lse``) and a vocabulary shard's first pass (with ``stats``
    as in ``cross_entropy_block``: the shard's, to be merged across the ranks)."""
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    target = torch.empty_like(lse)
    _launch(logits, bias, labels, lse, target, None, logit_sum, softcap, temperature, stats=stats)
    return lse, target


def block_dz_from_lse(logits, bias, labels, lse, dz, *, softcap=None, temperature=1.0):
    """``dz`` of each row's ``-logp`` under an fp32 ``logits`` block, as ``cross_entropy_block``
    writes it, from a given fp32 ``lse`` ``[rows]``: a vocabulary shard's block under the whole
    vocabulary's lse, merged across the ranks (``fused_pref.gradient_in_forward``).  A label outside
    ``[0, V)`` (another shard's) has no one-hot here."""
    _launch(logits, bias, labels, lse, None, dz, None, softcap, temperature, lse_given=True)


def _launch(logits, bias, labels, out, target, dz, logit_sum, softcap, temperature, lse_given=False, stats=None):
    n_rows, V = logits.shape
    if n_rows == 0:
        return
    assert logits.stride(1) == 1, "the kernel reads the logits with unit column stride"
    check_unit_stride_bias(bias)
    entropy, argmax, max_logit = (out, labels, out) if stats is None else stats
    cross_entropy_block_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
        logits, logits if bias is None else bias, labels, out, out if target is None else target,
        out if logit_sum is None else logit_sum, entropy, argmax, max_logit, out if dz is None else dz,
        n_rows, V, logits.stride(0), 0 if dz is None else dz.stride(0), 1.0 if softcap is None else float(softcap),
        1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_TEMPERATURE=temperature != 1.0,
        LOGIT_SUM=logit_sum is not None, STATS=stats is not None, WRITE_DZ=dz is not None,
        LSE_AND_TARGET=target is not None,
        LSE_GIVEN=lse_given, BLOCK_R=BLOCK_R, BLOCK_V=_step(dz is not None, stats is not None), num_warps=NUM_WARPS,
    )


def _step(write_dz: bool, stats: bool) -> int:
    """Columns per step: 2048 while writing ``dz``, 1024 for one pass or with the statistics."""
    return BLOCK_V if write_dz and not stats else LOSS_BLOCK_V


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """This kernel's ahead-of-time builds for inputs of ``dtype``: the loss alone (``no_grad``, and a
    pair loss's pass for the log-probs of a pair cut into several blocks), and ``dz`` in the GPU's
    workspace dtype, each without and with the logit sums (a pair loss's) and bias, softcap and
    temperature; the lse and target apart (the "cublas" plan's forward, a sharded vocabulary's
    first pass), and ``dz`` from a given lse (a sharded vocabulary's second)."""
    pointers = {"z_ptr": torch.float32, "b_ptr": dtype, "labels_ptr": torch.int64, "nlp_ptr": torch.float32,
                "target_ptr": torch.float32, "sum_ptr": torch.float32, "entropy_ptr": torch.float32,
                "argmax_ptr": torch.int64, "max_ptr": torch.float32,
                "dz_ptr": workspace_dtype(dtype, interpreted=False)}
    # name, bias+softcap+temperature, sums, stats, dz, lse and target apart, lse given
    variants = [("loss", False, False, False, False, False, False),
                ("loss+bias+softcap+temperature", True, False, False, False, False, False),
                ("loss+sums", False, True, False, False, False, False),
                ("loss+bias+softcap+temperature+sums", True, True, False, False, False, False),
                ("loss+sums+stats", False, True, True, False, False, False),
                ("loss+bias+softcap+temperature+sums+stats", True, True, True, False, False, False),
                ("dz", False, False, False, True, False, False),
                ("dz+sums", False, True, False, True, False, False),
                ("dz+bias+softcap+temperature+sums", True, True, False, True, False, False),
                ("dz+sums+stats", False, True, True, True, False, False),
                ("dz+bias+softcap+temperature+sums+stats", True, True, True, True, False, False),
                ("lse+target", False, False, False, False, True, False),
                ("lse+target+bias+softcap+temperature+sums", True, True, False, False, True, False),
                ("lse+target+sums+stats", False, True, True, False, True, False),
                ("lse+target+bias+softcap+temperature+sums+stats", True, True, True, False, True, False),
                ("dz-from-lse", False, False, False, True, False, True),
                ("dz-from-lse+bias+softcap+temperature", True, False, False, True, False, True)]
    return [AotSpec("cross_entropy_block", f"{DTYPE_NAMES[dtype]} {name}", cross_entropy_block_kernel, pointers,
                    {"HAS_BIAS": extras, "HAS_SOFTCAP": extras, "HAS_TEMPERATURE": extras, "LOGIT_SUM": sums,
                     "STATS": stats, "WRITE_DZ": write_dz, "LSE_AND_TARGET": parts, "LSE_GIVEN": given,
                     "BLOCK_R": BLOCK_R, "BLOCK_V": _step(write_dz, stats)}, {"num_warps": NUM_WARPS})
            for name, extras, sums, stats, write_dz, parts, given in variants]


__all__ = ["aot_specs", "block_dz_from_lse", "block_lse_and_target", "cross_entropy_block",
           "cross_entropy_block_kernel", "new_stats", "new_workspace"]
