"""``kernels/products.py``: products added into fp32 accumulators, on CUDA only (torch has no
``out_dtype`` kernels on the CPU, where the callers take their own way); the default backward's
branch that uses them, emulated on the CPU."""

import pytest
import torch

from fused_pref.kernels import linear_grad, products
from fused_pref.testing import compare, make_inputs, relative_error


def test_no_fp32_products_on_the_cpu():
    assert not products.fp32_products(torch.ones(2, dtype=torch.bfloat16))
    assert not products.fp32_products(torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.mm's out_dtype runs on CUDA only")
@pytest.mark.parametrize("in_place", [True, False], ids=["addmm", "slices"])
def test_cuda_products_accumulate_in_fp32(in_place, monkeypatch):
    # Both ways give the exact fp32 sum: addmm into the fp32 accumulator, or, where a torch refuses
    # that, slices with fp32 temporaries (forced here with SLICE_ROWS smaller than the rows).
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(1000, 384, device="cuda", generator=gen).bfloat16()
    b = torch.randn(384, 96, device="cuda", generator=gen).bfloat16()
    acc = torch.randn(1000, 96, device="cuda", generator=gen)
    expected = acc.double() + 0.25 * (a.double() @ b.double())
    if not in_place:
        monkeypatch.setattr(products, "_ADDMM_INTO_FP32", [False])
        monkeypatch.setattr(products, "SLICE_ROWS", 300)
    products.add_product(acc, a, b, alpha=0.25)
    assert relative_error(acc, expected) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.mm's out_dtype runs on CUDA only")
def test_this_torch_adds_into_fp32_in_place():
    # Where a torch refuses addmm into an fp32 out, the products fall back to slices with fp32
    # temporaries, correct but slower (~2x on d_weight's product): this fails then, so the GPU run
    # says which torch does what.
    a = torch.ones(8, 16, device="cuda", dtype=torch.bfloat16)
    products.add_product(torch.zeros(8, 4, device="cuda"), a, a.t()[:, :4].contiguous())
    assert products._ADDMM_INTO_FP32[0], f"torch {torch.__version__} refuses addmm(out_dtype, out=fp32)"


def test_backward_adding_into_fp32_equals_the_reference(monkeypatch, device):
    # The default backward's CUDA branch (each chunk's d_hidden product added into the fp32
    # accumulator), run here with add_product emulated in fp32: the gradients equal the reference's.
    shapes = []

    def emulated(acc, a, b, alpha=1.0):
        shapes.append(tuple(a.shape))
        acc.add_(a.float() @ b.float(), alpha=alpha)

    monkeypatch.setattr(linear_grad, "fp32_products", lambda t: True)
    monkeypatch.setattr(linear_grad, "add_product", emulated)
    x = make_inputs(4, 23, 97, 1003, dtype=torch.bfloat16, device=device, seed=3)
    compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], sft_weight=0.5),
            x).check(torch.bfloat16)
    assert len(shapes) > 1   # one product per vocabulary chunk, several chunks
