"""Cross-entropy with its gradients computed inside the forward (``backward="in_forward"``).

Where ``dLoss/dlogits`` is known during the forward (a mean or summed cross-entropy: ``softmax -
onehot`` per valid token), the logits need not be computed twice.  Per block of valid rows this
path runs three cuBLAS products and one Triton pass over an fp32 block of logits::

    z    = h_b @ W.T                        fp32 output, cuBLAS
    loss += s * (lse - z[label]),  dz = softmax - onehot   kernels/cross_entropy_block.py
                                            (bias, softcap, temperature there; dz in the input dtype)
    dH_b = s * (dz @ W)                     cuBLAS (fp32 out), the rows' d_hidden, final
    dW  += dz.T @ (s * h_b)                 cuBLAS into an fp32 accumulator

6NDV of products where the default path (forward, then the backward's recompute) does 8NDV; the
backward only multiplies the stored gradients by ``grad_output``.  The price is memory: the fp32
``d_weight`` accumulator (4VD bytes: 2.1 GB at Llama-3-8B's head) lives for the whole forward, and
the gradients are held from the forward to the backward.  Logits and ``d_weight``'s accumulation
stay fp32, the gradient is exact (no filtering) and every sum runs in a fixed order.

The block holds ``rows x V`` of ``dz`` in the input dtype and half as many rows of fp32 logits at a
time: at most ``workspace_bytes``, and never more than 1/16 of the rows, as the chunked backward
bounds its workspace.  The ``[N, V]`` logits never exist.

Products with fp32 outputs from bf16/fp16 operands are ``torch.mm(..., out_dtype=torch.float32)``
on CUDA.  torch has no such kernel on the CPU, where the same math runs on fp32 copies (the
interpreter's tests; the copies cost 4VD more there).
"""

import torch

from .kernels.cross_entropy_block import cross_entropy_block, new_workspace


def rows_per_block(n_rows: int, vocab: int, dtype: torch.dtype, workspace_bytes: int) -> int:
    """Rows of ``dz`` (input ``dtype``) each block holds, its logits computed in two halves (fp32):
    4 bytes per logit of a row in all for 2-byte inputs, within ``workspace_bytes`` and at most a
    16th of the rows (at least one).  From 128 rows up, a multiple of 128, so the products' row
    tiles are all full.  The block is the depth of ``d_weight``'s product: each adds into the fp32
    accumulator, reading and writing its 8VD bytes, so it stays bound by arithmetic only from ~800
    rows up on an H100/H200 (``workspace_bytes=2**29`` at Llama-3-8B's vocabulary)."""
    by_bytes = workspace_bytes // (vocab * (dtype.itemsize + 2))
    if by_bytes >= 128:
        by_bytes -= by_bytes % 128
    return max(1, min(by_bytes, -(-n_rows // 16)))


_ADDMM_INTO_FP32 = [True]   # cleared, for the process, by the first torch that refuses it
_SLICE_ROWS = 8192          # d_weight rows per product where it is refused: 8192 x D fp32 temporaries


def _has_out_dtype_mm() -> bool:
    return hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype_out")


class _Fp32Products:
    """``h @ W.T`` and ``acc += dz.T @ h`` with fp32 outputs for operands of ``weight``'s dtype."""

    def __init__(self, weight: torch.Tensor):
        self.cuda_out_dtype = weight.is_cuda and weight.dtype != torch.float32
        if self.cuda_out_dtype and not _has_out_dtype_mm():
            raise RuntimeError(f"backward='in_forward' needs torch.mm's out_dtype on CUDA (torch >= 2.8), "
                               f"this is torch {torch.__version__}: use backward='auto'")
        # CPU with bf16/fp16: an fp32 copy of the weight, made once per call.
        self.weight = weight if self.cuda_out_dtype or weight.dtype == torch.float32 else weight.float()

    def logits(self, h):
        if self.cuda_out_dtype:
            return torch.mm(h, self.weight.t(), out_dtype=torch.float32)
        return torch.mm(h.to(self.weight.dtype), self.weight.t())

    def scaled_rows(self, dz, scale):
        """``(dz @ W) * scale`` per row in fp32: the product rounded once, when the caller casts it."""
        if self.cuda_out_dtype:
            return torch.mm(dz, self.weight, out_dtype=torch.float32).mul_(scale[:, None])
        return torch.mm(dz.to(self.weight.dtype), self.weight).mul_(scale[:, None])

    def accumulate(self, acc, dz, h):
        if not self.cuda_out_dtype:
            acc.addmm_(dz.t().float(), h.float())
            return
        if _ADDMM_INTO_FP32[0]:
            try:
                torch.addmm(acc, dz.t(), h, out_dtype=torch.float32, out=acc)
                return
            except RuntimeError as error:
                # Some torch versions want addmm.dtype_out's ``self`` in the operands' dtype (it
                # checks before writing): products per vocabulary slice instead, slower.
                if "dtype" not in str(error) or isinstance(error, torch.OutOfMemoryError):
                    raise
                _ADDMM_INTO_FP32[0] = False
        for v in range(0, acc.shape[0], _SLICE_ROWS):
            acc[v:v + _SLICE_ROWS] += torch.mm(dz[:, v:v + _SLICE_ROWS].t(), h, out_dtype=torch.float32)


def cross_entropy_and_gradients(hidden, weight, bias, labels, valid, rows, row_scale, needs, *, softcap,
                                temperature, workspace_bytes):
    """``(loss, d_hidden, d_weight, d_bias)`` of ``sum_i row_scale[i] * (lse_i - z[i, labels_i])`` over
    the rows listed in ``rows``; a gradient is None where ``needs`` (hidden, weight, bias) says no,
    in the input dtype, fp32 for fp16 inputs (the backward casts them after scaling).

    ``hidden`` ``[R, T, D]`` (any strides; the block's rows are gathered), ``labels``, ``valid`` and
    ``row_scale`` (fp32, 0 at invalid rows) flat over ``R * T``; ``rows`` the int32 valid-first index
    (every row when validation made no host sync: invalid ones then cost products but add nothing)."""
    R, T, D = hidden.shape
    V = weight.shape[0]
    products = _Fp32Products(weight)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # fp16 gradients stay fp32 until the backward scales them: rounded to fp16 before the loss scale
    # multiplies them, small ones would be lost (loss scaling exists for exactly that).
    grad_dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
    d_hidden = torch.zeros(hidden.shape, dtype=grad_dtype, device=hidden.device) if needs[0] else None
    d_weight = torch.zeros(V, D, dtype=torch.float32, device=weight.device) if needs[1] else None
    d_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if needs[2] else None
    block = rows_per_block(rows.numel(), V, weight.dtype, workspace_bytes)
    half = -(-block // 2)
    # The products' operands carry each row's scale relative to the largest (1 for a plain mean),
    # which multiplies the fp32 accumulators at the end: scaled by 1/n itself an fp16 row would
    # sink below fp16's normal range.
    top = row_scale.max() if rows.numel() else row_scale.new_ones(())
    top = torch.where(top > 0, top, 1.0)
    for start in range(0, rows.numel(), block):
        index = rows[start:start + block].long()
        seq, pos = index // T, index % T
        h = hidden[seq, pos]
        # Ignored rows (scale 0) point at label 0: finite, and multiplied away.
        label = torch.where(valid[index], labels[index], 0)
        scale = row_scale[index]
        dz = new_workspace(index.numel(), V, weight.dtype, hidden.device) if any(needs) else None
        for a in range(0, index.numel(), half):
            # Half the block's logits at a time: the fp32 block costs what the dz block does.
            loss += cross_entropy_block(products.logits(h[a:a + half]), bias, label[a:a + half], scale[a:a + half],
                                        softcap=softcap, temperature=temperature,
                                        dz=None if dz is None else dz[a:a + half]).sum()
        if dz is None:
            continue
        dz = dz.to(weight.dtype)  # a no-op on a GPU; the interpreter's workspace is fp32 (tiles.workspace_dtype)
        # dz is unscaled (cross_entropy_block): each row's scale goes on the other operand, as the
        # default backward applies its per-row weight.
        unit = scale / top
        if d_bias is not None:
            d_bias += torch.mv(dz.t(), unit.to(dz.dtype)).float()
        if d_hidden is not None:
            d_hidden[seq, pos] = products.scaled_rows(dz, scale).to(grad_dtype)
        if d_weight is not None:
            products.accumulate(d_weight, dz, (h.float() * unit[:, None]).to(h.dtype))
    return (loss, d_hidden, None if d_weight is None else d_weight.mul_(top).to(grad_dtype),
            None if d_bias is None else d_bias.mul_(top).to(grad_dtype))
