"""Cross-entropy's extra terms: label smoothing and the z-loss (``lse_square_scale``, ``return_z_loss``),
on the fused path against the fp64 reference, the reference against ``F.cross_entropy`` and the
z-loss written out, and ``compat.liger`` against Liger-Kernel's own class."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import fused_pref
from fused_pref.compat import liger as compat
from fused_pref.testing import TOLERANCE, as_reference, make_inputs, relative_error
from fused_pref.tools.memory import AllocationRecorder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TERMS = {
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(lse_square_scale=1e-2),
    "both": dict(label_smoothing=0.3, lse_square_scale=1e-3),
    "both_softcap_temperature": dict(label_smoothing=0.2, lse_square_scale=1e-3, softcap=4.0, temperature=0.7),
    "z_loss_class_weights": dict(lse_square_scale=1e-2, ce_weight="rand"),
    "smoothing_class_weights_temperature": dict(label_smoothing=0.2, lse_square_scale=1e-3, ce_weight="rand",
                                                temperature=1.3),
}


def _grads(x):
    return {name: x[name].grad for name in ("hidden", "weight", "bias")}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("terms", TERMS.values(), ids=TERMS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fused_matches_reference(terms, reduction, dtype, device):
    x = make_inputs(3, 13, 67, 487, dtype=dtype, device=device, seed=101)
    ref = as_reference(x)
    if terms.get("ce_weight") == "rand":
        ce_weight = torch.rand(487, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        terms, ref_terms = {**terms, "ce_weight": ce_weight.to(device, torch.float32)}, {**terms, "ce_weight": ce_weight}
    else:
        ref_terms = terms
    args = ("hidden", "weight", "labels", "bias")
    ours = fused_pref.linear_cross_entropy(*(x[k] for k in args), reduction=reduction, return_z_loss=True, **terms)
    theirs = fused_pref.reference.linear_cross_entropy(*(ref[k] for k in args), reduction=reduction,
                                                       return_z_loss=True, **ref_terms)
    assert relative_error(ours.loss, theirs.loss) <= TOLERANCE[dtype]
    assert relative_error(ours.z_loss, theirs.z_loss) <= TOLERANCE[dtype]
    assert ours.z_loss.grad_fn is None and ours.token_accuracy is None and ours.predicted_tokens is None
    g = torch.randn(theirs.loss.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (ours.loss * g.to(device, torch.float32)).sum().backward()
    (theirs.loss * g).sum().backward()
    for name, grad in _grads(x).items():
        assert relative_error(grad, ref[name].grad) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [False, True], ids=["aligned", "shift"])
@pytest.mark.parametrize("class_weights", [False, True], ids=["unweighted", "class_weights"])
def test_reference_is_torch_cross_entropy_plus_z_loss(reduction, shift, class_weights):
    # The reference written a second way: F.cross_entropy's own label smoothing (and class
    # weights, its reduction included), plus s * lse^2 per valid token, reduced over valid tokens
    # without class weights (Liger-Kernel's z-loss).
    x = as_reference(make_inputs(2, 9, 31, 203, seed=7))
    eps, s = 0.15, 2e-3
    ce_weight = torch.rand(203, generator=torch.Generator().manual_seed(5), dtype=torch.float64) if class_weights \
        else None
    out = fused_pref.reference.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"],
                                                    reduction=reduction, label_smoothing=eps, lse_square_scale=s,
                                                    return_z_loss=True, shift=shift, ce_weight=ce_weight)
    labels = x["labels"]
    if shift:
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    z = (x["hidden"] @ x["weight"].T + x["bias"]).reshape(-1, 203)
    flat = labels.reshape(-1)
    ce = F.cross_entropy(z, flat, weight=ce_weight, label_smoothing=eps, reduction=reduction)
    z_terms = torch.where(flat != -100, s * z.logsumexp(-1) ** 2, 0.0)
    n = (flat != -100).sum()
    if reduction == "none":
        expected = (ce + z_terms).view(labels.shape)
    else:
        expected = ce + (z_terms.sum() if reduction == "sum" else z_terms.sum() / n)
    expected_z = {"none": z_terms.view(labels.shape), "sum": z_terms.sum(), "mean": z_terms.sum() / n}[reduction]
    assert relative_error(out.loss, expected) <= 1e-12
    assert relative_error(out.z_loss, expected_z) <= 1e-12


@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
def test_z_loss_without_scale_is_zero_and_options_off_are_the_plain_loss(module, device):
    x = make_inputs(2, 9, 40, 257, device=device, seed=5)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    plain = module.linear_cross_entropy(*args)
    out = module.linear_cross_entropy(*args, return_z_loss=True, label_smoothing=0.0, lse_square_scale=0.0)
    assert torch.equal(out.loss, plain) and out.z_loss.item() == 0.0


def test_smoothing_with_token_accuracy_and_entropy_plan(device):
    # The statistics and the extra terms share one forward pass: both come back, each as alone.
    x = make_inputs(2, 11, 48, 301, device=device, seed=9)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    both = fused_pref.linear_cross_entropy(*args, label_smoothing=0.1, return_token_accuracy=True)
    alone = fused_pref.linear_cross_entropy(*args, label_smoothing=0.1)
    accuracy = fused_pref.linear_cross_entropy(*args, return_token_accuracy=True).token_accuracy
    assert torch.equal(both.loss, alone) and torch.equal(both.token_accuracy, accuracy)


@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(label_smoothing=1.5), ValueError, r"^label_smoothing must be a number in \[0, 1\], got 1.5$"),
    (dict(label_smoothing=True), ValueError, r"^label_smoothing must be a number in \[0, 1\], got True$"),
    (dict(lse_square_scale=-1e-4), ValueError, r"^lse_square_scale must be a finite number >= 0, got -0.0001$"),
    (dict(lse_square_scale=float("nan")), ValueError, r"^lse_square_scale must be a finite number >= 0, got nan$"),
    (dict(return_z_loss=1), TypeError, r"^return_z_loss must be a bool, got int$"),
    (dict(label_smoothing=0.1, ce_weight="ones", softcap=30.0), ValueError,
     r"^label_smoothing with ce_weight does not run under a softcap yet"),
    (dict(lse_square_scale=1e-4, backward="in_forward"), ValueError,
     r"^lse_square_scale does not run with backward='in_forward' yet: use backward='auto'$"),
    (dict(label_smoothing=0.1, lse_square_scale=1e-4, backward="in_forward"), ValueError,
     r"^label_smoothing and lse_square_scale do not run with backward='in_forward' yet: use backward='auto'$"),
], ids=["smoothing_range", "smoothing_bool", "scale_negative", "scale_nan", "return_z_loss_int",
        "smoothing_with_class_weights_and_softcap", "in_forward", "in_forward_both"])
def test_bad_terms(module, kwargs, error, pattern, device):
    x = make_inputs(2, 9, 40, 257, device=device, seed=89)
    if kwargs.get("ce_weight") == "ones":
        kwargs = {**kwargs, "ce_weight": torch.ones(257, device=device)}
    with pytest.raises(error, match=pattern):
        module.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], **kwargs)


LIGER_TERMS = {
    "smoothing_mean": dict(label_smoothing=0.1),
    "z_loss_sum": dict(lse_square_scale=1e-2, reduction="sum"),
    "both_none": dict(label_smoothing=0.2, lse_square_scale=1e-3, reduction="none"),
}
# (Liger's softcap and ce_weight paths do not run under Triton's interpreter: both are covered
# against the reference, whose class-weighted z-loss follows Liger's cross_entropy.py, where the
# z-loss is divided by the valid-token count, not by the weights' sum.)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
@pytest.mark.parametrize("kwargs", LIGER_TERMS.values(), ids=LIGER_TERMS.keys())
def test_compat_matches_liger_kernel(kwargs, device):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    x, y = make_inputs(3, 11, 45, 301, device=device, seed=3), make_inputs(3, 11, 45, 301, device=device, seed=3)
    outs = []
    for cls, inputs in ((compat.LigerFusedLinearCrossEntropyLoss, x), (LigerFusedLinearCrossEntropyLoss, y)):
        out = cls(return_z_loss=True, **kwargs)(inputs["weight"], inputs["hidden"].view(-1, 45),
                                                inputs["labels"].view(-1), inputs["bias"])
        out.loss.sum().backward()
        outs.append(out)
    assert relative_error(outs[0].loss, outs[1].loss) <= 1e-5
    assert relative_error(outs[0].z_loss, outs[1].z_loss.detach()) <= 1e-5
    for name, grad in _grads(x).items():
        assert relative_error(grad, _grads(y)[name]) <= 1e-5, name


def test_packed_shifted_over_many_backward_chunks(device):
    # The per-row weights under the shift of a packed batch, the backward's vocabulary in many chunks.
    x = make_inputs(1, 37, 40, 1031, device=device, seed=13)
    cu_seqlens = torch.tensor([0, 5, 6, 20, 37], device=device, dtype=torch.int32)
    x["hidden"] = x["hidden"].detach().reshape(37, 40).requires_grad_()
    x["labels"] = x["labels"].reshape(37)
    ref = as_reference(x)
    terms = dict(label_smoothing=0.1, lse_square_scale=1e-2, shift=True, cu_seqlens=cu_seqlens)
    ours = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], workspace_bytes=1,
                                           **terms)
    theirs = fused_pref.reference.linear_cross_entropy(ref["hidden"], ref["weight"], ref["labels"], ref["bias"],
                                                       **{**terms, "cu_seqlens": cu_seqlens.cpu()})
    assert relative_error(ours, theirs) <= 1e-5
    ours.backward()
    theirs.backward()
    for name, grad in _grads(x).items():
        assert relative_error(grad, ref[name].grad) <= 1e-5, name


def test_no_tokens_by_vocab_tensor_with_every_term_and_flag(device):
    R, T, D, V = 8, 65, 48, 4099   # as tests/test_memory.py: d_weight [V, D] stays under the bound
    x = make_inputs(R, T, D, V, device=device)
    with AllocationRecorder() as recorder:
        out = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], label_smoothing=0.1,
                                              lse_square_scale=1e-3, return_z_loss=True, return_token_accuracy=True,
                                              return_predicted_tokens=True)
        out.loss.backward()
    assert recorder.largest().numel < R * T * V / 8
