"""Cross-entropy over a block of fp32 logits that cuBLAS wrote: each row's ``-logp`` and ``dz``.

The gradient-in-forward mode (``fused_pref.gradient_in_forward``) has cuBLAS write the logits of a
block of valid rows ``[rows, V]`` in fp32; this kernel turns them, in two passes over each row,
into

    nlp_i = lse_i - z_i[label_i]              (the row's cross-entropy, minus its log-prob)
    dz_i  = softmax(z_i) - onehot(label_i)    (d nlp_i / d logits: times 1/T under a temperature,
                                               1 - (z T / c)^2 under a softcap)

with ``z = softcap(logits + bias) / T``, and with ``LOGIT_SUM`` also ``sum_v z_i[v]`` (the
preference losses' ``logits/*`` metrics).  ``dz`` is stored unscaled, in [-1, 1] as the default
backward's workspace: scaled by a loss's per-row weight (``1/n`` for a mean) an fp16 ``dz`` would
underflow; the caller applies the weights to the rows instead.  Pass one keeps a running max and
sum of exponentials per lane and reduces them once at the row's end; pass two reads the row again
and writes ``dz`` in the input dtype, ready for the two products.  Per logit: two fp32 reads and
one write of the input dtype, where the same in torch ops (``logsumexp``, ``exp_``, ``scatter_``,
``mul_``, a cast) reads and writes the block about eight times.  Ignored rows point at label 0;
the caller gives them no weight.
"""

import torch
import triton
import triton.language as tl

from .tiles import DTYPE_NAMES, AotSpec, logp_grad_tile, transform_logits, workspace_dtype

# A row per program: a block holds a few hundred rows, each a long stream of V logits; 2048-wide
# steps keep 8 fp32 loads per thread in flight (the kernel is bound by memory, not arithmetic).
# 4096-wide ones spilled 4-12 bytes on sm_90 with triton 3.6's ptxas (capped at 64-80 registers),
# and without dz (no_grad, a pair loss's pass for the log-probs of a cut pair) 2048-wide ones
# spilled 8 bytes there with bias, softcap and temperature (at 48 registers, and at 96 with four
# warps): that one-pass kernel takes 1024-wide steps.
BLOCK_R = 1
BLOCK_V = 2048
LOSS_BLOCK_V = 1024
NUM_WARPS = 8


@triton.jit
def _block_logits(z_rows, b_ptr, r_mask, v0, V, softcap, inv_temperature,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    offs_v = v0 + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    mask = r_mask[:, None] & v_mask[None, :]
    z = tl.load(z_rows + offs_v[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return transform_logits(z, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE), offs_v, mask


@triton.jit
def cross_entropy_block_kernel(
    z_ptr, b_ptr, labels_ptr, nlp_ptr, sum_ptr, dz_ptr,
    n_rows, V, stride_z, stride_dz, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, LOGIT_SUM: tl.constexpr,
    WRITE_DZ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """BLOCK_R rows of the block: their ``-logp``, with ``LOGIT_SUM`` their sums of logits, and with
    ``WRITE_DZ`` their ``dz``."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < n_rows
    label = tl.load(labels_ptr + offs_r, mask=r_mask, other=0)
    z_rows = z_ptr + offs_r.to(tl.int64)[:, None] * stride_z
    # A finite floor, so that a lane no column has reached yet never computes inf - inf.
    run_max = tl.full((BLOCK_R, BLOCK_V), -1e30, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    target = tl.zeros((BLOCK_R,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z, offs_v, mask = _block_logits(z_rows, b_ptr, r_mask, v0, V, softcap, inv_temperature,
                                        HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK_V)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
        run_max = new_max
        # A label past V (validate=False) matches no column, padded or not: its target stays 0.
        target += tl.sum(tl.where((offs_v[None, :] == label[:, None]) & mask, z, 0.0), axis=1)
        if LOGIT_SUM:
            logit_sum += tl.where(mask, z, 0.0)
    row_max = tl.max(run_max, axis=1)
    lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max[:, None]), axis=1))
    tl.store(nlp_ptr + offs_r, lse - target, mask=r_mask)
    if LOGIT_SUM:
        tl.store(sum_ptr + offs_r, tl.sum(logit_sum, axis=1), mask=r_mask)
    if WRITE_DZ:
        dz_rows = dz_ptr + offs_r.to(tl.int64)[:, None] * stride_dz
        for v0 in range(0, V, BLOCK_V):
            z, offs_v, mask = _block_logits(z_rows, b_ptr, r_mask, v0, V, softcap, inv_temperature,
                                            HAS_BIAS, HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK_V)
            # The loss's gradient is minus logp's.
            dz = -logp_grad_tile(z, offs_v, label, lse, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
            tl.store(dz_rows + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


def new_workspace(n_rows: int, V: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A ``dz`` block for inputs of ``dtype``: that dtype on a GPU, fp32 under the interpreter, whose
    casts to bf16 truncate (``tiles.workspace_dtype``; the caller rounds it with torch)."""
    return torch.empty(n_rows, V, dtype=workspace_dtype(dtype), device=device)


def cross_entropy_block(logits, bias, labels, *, softcap=None, temperature=1.0, dz=None,
                        logit_sum=None) -> torch.Tensor:
    """Each row's ``-logp`` ``[rows]`` (fp32) under an fp32 ``logits`` block (unit column stride),
    with ``labels`` int64 per row; when ``dz`` (``[rows, V]``, unit column stride) is given, the
    gradient of each row's ``-logp`` written into it, and when ``logit_sum`` (fp32 ``[rows]``) is,
    each row's sum of (soft-capped, tempered) logits."""
    n_rows, V = logits.shape
    nlp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return nlp
    cross_entropy_block_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
        logits, logits if bias is None else bias, labels, nlp, nlp if logit_sum is None else logit_sum,
        nlp if dz is None else dz,
        n_rows, V, logits.stride(0), 0 if dz is None else dz.stride(0), 1.0 if softcap is None else float(softcap),
        1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_TEMPERATURE=temperature != 1.0,
        LOGIT_SUM=logit_sum is not None, WRITE_DZ=dz is not None,
        BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V if dz is not None else LOSS_BLOCK_V, num_warps=NUM_WARPS,
    )
    return nlp


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """This kernel's ahead-of-time builds for inputs of ``dtype``: the loss alone (``no_grad``, and a
    pair loss's pass for the log-probs of a pair cut into several blocks), and ``dz`` in the GPU's
    workspace dtype, each without and with the logit sums (a pair loss's) and bias, softcap and
    temperature."""
    pointers = {"z_ptr": torch.float32, "b_ptr": dtype, "labels_ptr": torch.int64, "nlp_ptr": torch.float32,
                "sum_ptr": torch.float32, "dz_ptr": workspace_dtype(dtype, interpreted=False)}
    variants = [("loss", False, False, False, False), ("loss+bias+softcap+temperature", True, True, False, False),
                ("loss+sums", False, False, True, False), ("loss+bias+softcap+temperature+sums", True, True, True, False),
                ("dz", False, False, False, True),
                ("dz+sums", False, False, True, True), ("dz+bias+softcap+temperature+sums", True, True, True, True)]
    return [AotSpec("cross_entropy_block", f"{DTYPE_NAMES[dtype]} {name}", cross_entropy_block_kernel, pointers,
                    {"HAS_BIAS": bias, "HAS_SOFTCAP": softcap, "HAS_TEMPERATURE": softcap, "LOGIT_SUM": sums,
                     "WRITE_DZ": write_dz, "BLOCK_R": BLOCK_R, "BLOCK_V": BLOCK_V if write_dz else LOSS_BLOCK_V},
                    {"num_warps": NUM_WARPS})
            for name, bias, softcap, sums, write_dz in variants]


__all__ = ["aot_specs", "cross_entropy_block", "cross_entropy_block_kernel", "new_workspace"]
