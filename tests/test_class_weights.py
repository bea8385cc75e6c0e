"""``ce_weight``: per-class weights of the cross-entropy, as ``F.cross_entropy``'s ``weight``, on the
fused path (both backwards) and the reference, against ``F.cross_entropy`` itself in fp64."""

import pytest
import torch
import torch.nn.functional as F

import fused_pref
from fused_pref.testing import TOLERANCE, make_inputs, relative_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _torch_loss(x, ce_weight, reduction):
    z = x["hidden"].reshape(-1, x["hidden"].shape[-1]) @ x["weight"].T + x["bias"]
    return F.cross_entropy(z, x["labels"].reshape(-1), weight=ce_weight, reduction=reduction).reshape(
        x["labels"].shape if reduction == "none" else ())


# in_forward takes no per-token output.
@pytest.mark.parametrize("backward, reduction", [("auto", "mean"), ("auto", "sum"), ("auto", "none"),
                                                 ("in_forward", "mean"), ("in_forward", "sum")])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_parity_with_torch(backward, reduction, dtype, device):
    x = make_inputs(4, 23, 97, 1003, dtype=dtype, device=device, seed=83)
    ce_weight = torch.rand(1003, generator=torch.Generator().manual_seed(0)).to(device)
    ours = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], reduction=reduction,
                                           ce_weight=ce_weight, backward=backward)
    ref = {k: (v.detach().cpu().double().requires_grad_() if v.dtype.is_floating_point else v.cpu())
           for k, v in x.items()}
    theirs = _torch_loss(ref, ce_weight.cpu().double(), reduction)
    assert relative_error(ours, theirs) <= TOLERANCE[dtype]
    g = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ours * g.to(ours.device, ours.dtype)).sum().backward()
    (theirs * g).sum().backward()
    for name in ("hidden", "weight", "bias"):
        assert relative_error(x[name].grad, ref[name].grad) <= TOLERANCE[dtype], name
    # The reference twin agrees too.
    twin = fused_pref.reference.linear_cross_entropy(ref["hidden"].detach(), ref["weight"].detach(), ref["labels"],
                                                     ref["bias"].detach(), reduction=reduction,
                                                     ce_weight=ce_weight.cpu().double())
    assert relative_error(twin, theirs.detach()) <= 1e-12


@pytest.mark.parametrize("backward", ["auto", "in_forward"])
def test_weights_summing_below_zero_divide_as_torch(backward, device):
    # F.cross_entropy divides by the labels' weights' sum whatever its sign.
    x = make_inputs(2, 9, 40, 257, device=device, seed=89)
    ce_weight = torch.randn(257, generator=torch.Generator().manual_seed(2)).to(device)
    ce_weight[x["labels"][x["labels"] != -100]] -= 1.0
    ref = {k: v.detach().cpu().double() if v.dtype.is_floating_point else v.cpu() for k, v in x.items()}
    theirs = _torch_loss(ref, ce_weight.cpu().double(), "mean")
    assert ce_weight[x["labels"][x["labels"] != -100]].sum() < 0
    for module in (fused_pref, fused_pref.reference):
        ours = module.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], ce_weight=ce_weight,
                                           backward=backward)
        assert relative_error(ours, theirs) <= 1e-5, module.__name__


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
def test_label_weights_summing_to_zero_give_zero_not_nan(module, smoothing, device):
    # The README's "0, not NaN": also where what the mean divides is not 0 (label smoothing's uniform
    # part weighs every class, here all but the labels' 1).
    x = make_inputs(2, 9, 40, 257, device=device, seed=89)
    ce_weight = torch.ones(257, device=device)
    ce_weight[x["labels"][x["labels"] != -100]] = 0.0
    loss = module.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], ce_weight=ce_weight,
                                       label_smoothing=smoothing)
    loss.backward()
    assert loss.item() == 0.0 and (x["hidden"].grad == 0).all()


@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
@pytest.mark.parametrize("ce_weight, error, pattern", [
    (torch.ones(256), ValueError, r"^ce_weight must be \[V\] = \[257\], got shape \(256,\)$"),
    (torch.ones(257, dtype=torch.long), TypeError, r"^ce_weight must be a floating-point torch.Tensor \[V\] or None, "
                                                  r"got torch.int64$"),
    ([1.0] * 257, TypeError, r"^ce_weight must be a floating-point torch.Tensor \[V\] or None, got list$"),
], ids=["shape", "dtype", "list"])
def test_bad_class_weights(module, ce_weight, error, pattern, device):
    x = make_inputs(2, 9, 40, 257, device=device, seed=89)
    if isinstance(ce_weight, torch.Tensor):
        ce_weight = ce_weight.to(device)
    with pytest.raises(error, match=pattern):
        module.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], ce_weight=ce_weight)
