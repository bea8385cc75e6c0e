"""``kernels/products.py``: products added into fp32 accumulators, on CUDA only (torch has no
``out_dtype`` kernels on the CPU, where the callers take their own way); the default backward's
branch that uses them, emulated on the CPU."""

import pytest
import torch

from fused_pref.kernels import linear_grad, products
from fused_pref.testing import compare, make_inputs, relative_error

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.mm's out_dtype runs on CUDA only")


@cuda_only
@pytest.mark.parametrize("in_place", [True, False], ids=["addmm", "slices"])
def test_cuda_products_accumulate_in_fp32(in_place, monkeypatch):
    # The callers' layouts: the default backward's dz (a column slice of the workspace) times a
    # row slice of the weight; the forward mode's dz.T (a transposed view) times the rows.  Both
    # ways give the exact fp32 sum: addmm into the fp32 accumulator, or, where a torch refuses
    # that, slices with fp32 temporaries (forced here, with SLICE_ROWS below the rows).
    if not in_place:
        monkeypatch.setattr(products, "_addmm_into_fp32", lambda device: False)
        monkeypatch.setattr(products, "SLICE_ROWS", 300)
    gen = torch.Generator(device="cuda").manual_seed(0)
    workspace = torch.randn(1000, 512, device="cuda", generator=gen).bfloat16()
    weight = torch.randn(600, 96, device="cuda", generator=gen).bfloat16()
    for a, b in ((workspace[:, :384], weight[100:484]), (workspace[:, :384].t(), workspace[:, 100:196])):
        acc = torch.randn(a.shape[0], b.shape[1], device="cuda", generator=gen)
        expected = acc.double() + 0.25 * (a.double() @ b.double())
        products.add_product(acc, a, b, alpha=0.25)
        assert relative_error(acc, expected) < 1e-6


@cuda_only
def test_this_torch_adds_into_fp32_in_place():
    # Where a torch refuses addmm into an fp32 out, the forward mode's d_weight runs in slices with
    # fp32 temporaries (correct, ~2x slower on that product) and the default backward keeps its
    # d_hidden product in the input dtype: this fails then, so the GPU run says which torch does what.
    assert products.adds_into_fp32(torch.ones(1, device="cuda", dtype=torch.bfloat16)), (
        f"torch {torch.__version__} refuses addmm(out_dtype=float32, out=<float32>)")


def test_backward_adding_into_fp32_equals_the_reference(monkeypatch, device):
    # The default backward's CUDA branch (each chunk's d_hidden product added into the fp32
    # accumulator), run here with add_product emulated in fp32: the gradients equal the reference's.
    shapes = []

    def emulated(acc, a, b, alpha=1.0):
        shapes.append(tuple(a.shape))
        acc.add_(a.float() @ b.float(), alpha=alpha)

    monkeypatch.setattr(linear_grad, "adds_into_fp32", lambda t: True)
    monkeypatch.setattr(linear_grad, "add_product", emulated)
    x = make_inputs(4, 23, 97, 1003, dtype=torch.bfloat16, device=device, seed=3)
    compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], sft_weight=0.5),
            x).check(torch.bfloat16)
    assert len(shapes) > 1   # one product per vocabulary chunk, several chunks
