"""cuBLAS products of bf16/fp16 operands with fp32 outputs: logits (``fp32_logits``), and products
added into fp32 accumulators with no fp32 temporary (``add_product``).

The default backward accumulates ``d_hidden`` over vocabulary chunks and the gradient-in-forward
mode ``d_weight`` over blocks of rows, both in fp32.  On CUDA, ``torch.addmm(acc, a, b,
out_dtype=torch.float32, out=acc)`` has cuBLAS add the product into ``acc`` as it accumulates in
fp32: no temporary, and the product is never rounded to the operands' dtype before it is added.
torch has ``out_dtype`` products from 2.8, but some versions (2.8 among them) refuse an fp32
``acc`` there, wanting it in the operands' dtype: ``adds_into_fp32`` asks the device once.  Where
it is refused, ``add_product`` runs in slices of ``SLICE_ROWS`` rows with fp32 temporaries, and the
default backward keeps its own way (a product in the input dtype, then added: less memory than
the slices below 8192 rows).  torch has no ``out_dtype`` kernels on the CPU.
"""

import functools

import torch

SLICE_ROWS = 8192   # rows per product where addmm into fp32 is refused: SLICE_ROWS x columns fp32 temporaries
CPU_SLICE_ROWS = 1024   # rows of a weight ``fp32_logits`` copies to fp32 at a time off CUDA


def has_out_dtype_mm() -> bool:
    """Whether this torch has ``mm`` and ``addmm`` with an ``out_dtype`` (torch >= 2.8)."""
    return hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype_out")


@functools.cache
def _addmm_into_fp32(device: torch.device) -> bool:
    acc = torch.zeros(1, 1, device=device)
    one = torch.ones(1, 1, device=device, dtype=torch.bfloat16)
    try:
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except RuntimeError as error:
        if "dtype" not in str(error):
            raise
        return False
    return True


def adds_into_fp32(t: torch.Tensor) -> bool:
    """Whether cuBLAS adds products of ``t``'s device and dtype into an fp32 accumulator here:
    CUDA, a dtype narrower than fp32, and a torch whose ``addmm`` takes an fp32 ``out``."""
    return (t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and has_out_dtype_mm()
            and _addmm_into_fp32(t.device))


def fp32_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h @ w.T`` with fp32 accumulation and output: on CUDA cuBLAS's ``out_dtype`` product, with no
    fp32 copy of either operand; elsewhere products of fp32 copies, ``w`` copied ``CPU_SLICE_ROWS`` rows
    at a time (the interpreter's tests: no copy of a whole weight, which no GPU makes)."""
    if h.is_cuda and h.dtype != torch.float32:
        if not has_out_dtype_mm():
            raise RuntimeError(f"fp32 logits from {h.dtype} operands need torch.mm's out_dtype on CUDA (torch >= 2.8), "
                               f"this is torch {torch.__version__}")
        return torch.mm(h, w.t(), out_dtype=torch.float32)
    if h.dtype == w.dtype == torch.float32:
        return torch.mm(h, w.t())
    h = h.float()
    out = torch.empty(h.shape[0], w.shape[0], dtype=torch.float32, device=h.device)
    for v in range(0, w.shape[0], CPU_SLICE_ROWS):
        out[:, v:v + CPU_SLICE_ROWS] = h @ w[v:v + CPU_SLICE_ROWS].float().t()
    return out


def whole_row_tiles(fitting: int) -> int:
    """Rows per block of a cuBLAS product where ``fitting`` fit its workspace: at least one; from 128
    up, a multiple of 128, so the product's row tiles are all full."""
    if fitting >= 128:
        fitting -= fitting % 128
    return max(1, fitting)


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * (a @ b)`` with fp32 accumulation and output, for CUDA operands with
    ``out_dtype`` products (torch >= 2.8) and an fp32 ``acc``: in place where ``adds_into_fp32``,
    else in row slices with fp32 temporaries."""
    if adds_into_fp32(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=alpha, out=acc)
        return
    for r in range(0, acc.shape[0], SLICE_ROWS):
        acc[r:r + SLICE_ROWS].add_(torch.mm(a[r:r + SLICE_ROWS], b, out_dtype=torch.float32), alpha=alpha)


__all__ = ["SLICE_ROWS", "add_product", "adds_into_fp32", "fp32_logits", "has_out_dtype_mm", "whole_row_tiles"]
