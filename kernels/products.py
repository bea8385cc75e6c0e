"""cuBLAS products of bf16/fp16 operands added into fp32 accumulators, with no fp32 temporary.

The default backward accumulates ``d_hidden`` over vocabulary chunks and the gradient-in-forward
mode ``d_weight`` over blocks of rows, both in fp32.  On CUDA, ``torch.addmm(acc, a, b,
out_dtype=torch.float32, out=acc)`` (torch >= 2.8) has cuBLAS add the product into ``acc`` as it
accumulates in fp32: no temporary, and the product is never rounded to the operands' dtype
before it is added.  Some torch versions refuse an fp32 ``acc`` there (they want it in the
operands' dtype); the product then runs in slices of ``SLICE_ROWS`` rows with fp32 temporaries.
torch has no ``out_dtype`` kernels on the CPU: there ``fp32_products`` is False and the callers
do without.
"""

import torch

_ADDMM_INTO_FP32 = [True]   # cleared, for the process, by the first torch that refuses it
SLICE_ROWS = 8192           # rows per product where it is refused: SLICE_ROWS x columns fp32 temporaries


def has_out_dtype_mm() -> bool:
    """Whether this torch has ``mm`` and ``addmm`` with an ``out_dtype`` (torch >= 2.8)."""
    return hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype_out")


def fp32_products(t: torch.Tensor) -> bool:
    """Whether products of ``t``'s device and dtype get fp32 outputs from cuBLAS here: CUDA,
    torch >= 2.8, and a dtype narrower than fp32."""
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and has_out_dtype_mm()


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * (a @ b)`` with fp32 accumulation and output, for ``fp32_products`` operands
    and an fp32 ``acc`` (any strides cuBLAS takes)."""
    if _ADDMM_INTO_FP32[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=alpha, out=acc)
            return
        except RuntimeError as error:
            if "dtype" not in str(error) or isinstance(error, torch.OutOfMemoryError):
                raise
            _ADDMM_INTO_FP32[0] = False
    for r in range(0, acc.shape[0], SLICE_ROWS):
        acc[r:r + SLICE_ROWS].add_(torch.mm(a[r:r + SLICE_ROWS], b, out_dtype=torch.float32), alpha=alpha)


__all__ = ["SLICE_ROWS", "add_product", "fp32_products", "has_out_dtype_mm"]
