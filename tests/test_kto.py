"""``kto_loss``: the fused path against the fp64 reference, the reference against TRL KTOTrainer's
loss written out from its source, and against Liger-Kernel's own KTO loss where it is installed."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import fused_pref
from fused_pref.testing import TOLERANCE, as_reference, compare, make_inputs, relative_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
R, T, D, V = 5, 11, 48, 301
DESIRABLE = [True, False, False, True, False]


def _args(x):
    return x["hidden"], x["weight"], x["labels"], x["bias"]


def _grads(x):
    return {name: x[name].grad for name in ("hidden", "weight", "bias")}


CASES = {
    "kto": dict(loss_type="kto", kl=0.3, desirable_weight=1.0, undesirable_weight=1.33),
    "kto_tensor_kl": dict(loss_type="kto", kl="tensor", beta=0.5),
    "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired", beta=0.2, desirable_weight=0.7),
}


@pytest.mark.parametrize("reference_model", ["ref_logps", "ref_hidden"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fused_matches_reference(case, reference_model, dtype, device):
    x = make_inputs(R, T, D, V, dtype=dtype, device=device, seed=31)
    r = make_inputs(R, T, D, V, dtype=dtype, device=device, seed=32)
    desirable = torch.tensor(DESIRABLE, device=device)
    ref = as_reference(x)
    kwargs = dict(case)
    if kwargs.get("kl") == "tensor":
        kwargs["kl"] = torch.tensor([0.2], device=device)
    if reference_model == "ref_logps":
        ref_logps = fused_pref.reference.sequence_logprobs(as_reference(r)["hidden"].detach(), ref["weight"].detach(),
                                                           ref["labels"], ref["bias"].detach())
        ours_ref, theirs_ref = dict(ref_logps=ref_logps.float().to(device)), dict(ref_logps=ref_logps)
    else:
        ours_ref = dict(ref_hidden=r["hidden"].detach())
        theirs_ref = dict(ref_hidden=as_reference(r)["hidden"].detach())
    ours = fused_pref.kto_loss(*_args(x), desirable=desirable, token_metrics=True, **ours_ref, **kwargs)
    theirs_kwargs = {k: (v.cpu().double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    theirs = fused_pref.reference.kto_loss(*_args(ref), desirable=desirable.cpu(), token_metrics=True, **theirs_ref,
                                           **theirs_kwargs)
    assert relative_error(ours.loss, theirs.loss) <= TOLERANCE[dtype]
    ours_metrics, theirs_metrics = ours.metrics(), theirs.metrics()
    assert ours_metrics.keys() == theirs_metrics.keys() >= {"kl", "entropy", "rewards/margins", "logits/chosen"}
    for name, value in theirs_metrics.items():
        assert ours_metrics[name] == pytest.approx(value, rel=TOLERANCE[dtype] * 10, abs=1e-6), name
    ours.loss.backward()
    theirs.loss.backward()
    for name, grad in _grads(x).items():
        assert relative_error(grad, ref[name].grad) <= TOLERANCE[dtype], name


def _trl_loss(logps, ref_logps, labels, kl, beta, loss_type, desirable_weight, undesirable_weight):
    # TRL 1.16 trl/trainer/kto_trainer.py, KTOTrainer._compute_loss: index_select the two halves,
    # the two branches per loss type, cat with their weights, nanmean.
    chosen_idx = torch.nonzero(labels).view(-1)
    rejected_idx = torch.nonzero(~labels).view(-1)
    chosen_logratios = logps.index_select(0, chosen_idx) - ref_logps.index_select(0, chosen_idx)
    rejected_logratios = logps.index_select(0, rejected_idx) - ref_logps.index_select(0, rejected_idx)
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - F.sigmoid(beta * chosen_logratios)
        rejected_losses = F.sigmoid(beta * rejected_logratios)
    return torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0).nanmean()


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_reference_is_trl_kto_trainer(loss_type):
    x = as_reference(make_inputs(R, T, D, V, seed=41))
    labels = torch.tensor(DESIRABLE)
    ref_logps = torch.randn(R, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 20
    kl = 0.25 if loss_type == "kto" else None
    hyper = dict(beta=0.3, desirable_weight=1.2, undesirable_weight=0.8)
    out = fused_pref.reference.kto_loss(*_args(x), desirable=labels, ref_logps=ref_logps, kl=kl, loss_type=loss_type,
                                        **hyper)
    z = (x["hidden"] @ x["weight"].T + x["bias"]).log_softmax(-1)
    valid = x["labels"] != -100
    logps = torch.where(valid, z.gather(-1, x["labels"].clamp(min=0)[..., None])[..., 0], 0.0).sum(-1)
    expected = _trl_loss(logps, ref_logps, labels, kl or 0.0, hyper["beta"], loss_type, hyper["desirable_weight"],
                         hyper["undesirable_weight"])
    assert relative_error(out.loss, expected) <= 1e-12


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["losses_near_0", "losses_near_1"])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_saturated_sequences_keep_fp32_gradients(loss_type, sign, device):
    # Every sequence 15 from its reference point (beta 0.1, rewards 150 nats apart), on either
    # side: each one's gradient, s(x) s(-x) ~ 3e-7, was lost to cancellation in fp32 when computed
    # as TRL writes the loss, 1 - s(x), or through s(x)'s own backward, s (1 - s), near s = 1.
    x = make_inputs(R, T, D, V, device=device, seed=31)
    with torch.no_grad():
        logps = fused_pref.reference.sequence_logprobs(*_args(as_reference(x))).float()
    side = torch.where(torch.tensor(DESIRABLE), 1.0, -1.0)
    x["ref_logps"] = (logps - sign * 150.0 * side).to(device)
    x["desirable"] = torch.tensor(DESIRABLE, device=device)
    kl = 0.3 if loss_type == "kto" else None

    def loss(m, x):
        return m.kto_loss(*_args(x), desirable=x["desirable"], ref_logps=x["ref_logps"], kl=kl, loss_type=loss_type)

    comparison = compare(loss, x).check(torch.float32)
    assert abs(comparison.reference.loss.item() - (sign < 0)) < 1e-6


def test_packed_equals_padded(device):
    x = make_inputs(R, T, D, V, device=device, seed=43)
    desirable = torch.tensor(DESIRABLE, device=device)
    ref_logps = -torch.arange(R, device=device, dtype=torch.float32) - 10
    padded = fused_pref.kto_loss(*_args(x), desirable=desirable, ref_logps=ref_logps, kl=0.1)
    cu_seqlens = torch.arange(0, R * T + 1, T, device=device, dtype=torch.int32)
    packed = fused_pref.kto_loss(x["hidden"].reshape(R * T, D), x["weight"], x["labels"].reshape(-1), x["bias"],
                                 desirable=desirable, ref_logps=ref_logps, kl=0.1, cu_seqlens=cu_seqlens)
    assert relative_error(packed.loss, padded.loss) <= 1e-6


def test_metrics_of_one_sided_batches_leave_out_the_missing_side(device):
    x = make_inputs(R, T, D, V, device=device, seed=47)
    out = fused_pref.kto_loss(*_args(x), desirable=torch.ones(R, dtype=torch.bool, device=device),
                              ref_logps=torch.zeros(R, device=device), kl=0.0)
    metrics = out.metrics()
    assert "rewards/chosen" in metrics and "rewards/rejected" not in metrics and "rewards/margins" not in metrics


@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(loss_type="bco"), ValueError, r"^loss_type must be one of \('kto', 'apo_zero_unpaired'\), got 'bco'$"),
    (dict(kl=None), ValueError, r"^loss_type='kto' needs kl, the reference point"),
    (dict(loss_type="apo_zero_unpaired"), ValueError, r"^loss_type='apo_zero_unpaired' has no KL reference point"),
    (dict(kl=float("nan")), ValueError, r"^kl must be a finite number or a one-element tensor, got nan$"),
    (dict(desirable="ints"), TypeError, r"^desirable must be a bool torch.Tensor \[R\]"),
    (dict(desirable="short"), ValueError, r"^desirable must be \[R\] = \[5\], got shape \(4,\)$"),
    (dict(undesirable_weight=-1.0), ValueError, r"^undesirable_weight must be a finite number >= 0, got -1.0$"),
    (dict(ref_logps=None), ValueError, r"^kto_loss needs exactly one of ref_logps \(\[R\]"),
], ids=["loss_type", "kto_without_kl", "apo_with_kl", "kl_nan", "desirable_dtype", "desirable_shape",
        "weight_negative", "no_reference"])
def test_bad_arguments(module, kwargs, error, pattern, device):
    x = make_inputs(R, T, D, V, device=device, seed=53)
    call = dict(desirable=torch.tensor(DESIRABLE, device=device), ref_logps=torch.zeros(R, device=device), kl=0.1)
    call.update(kwargs)
    if call["desirable"] == "ints":
        call["desirable"] = torch.ones(R, dtype=torch.long, device=device)
    elif call["desirable"] == "short":
        call["desirable"] = torch.ones(R - 1, dtype=torch.bool, device=device)
    with pytest.raises(error, match=pattern):
        module.kto_loss(*_args(x), **call)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_matches_liger_kernel(device):
    # Liger's KTO: TRL's "kto" unweighted, on summed log-probs, the reference's without gradient.
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    kl = 0.4
    x, y = make_inputs(R, T, D, V, device=device, seed=59), make_inputs(R, T, D, V, device=device, seed=59)
    r = make_inputs(R, T, D, V, device=device, seed=61)
    desirable = torch.tensor(DESIRABLE, device=device)
    refs = dict(ref_input=r["hidden"].detach(), ref_weight=r["weight"].detach(), ref_bias=r["bias"].detach())
    theirs, _ = LigerFusedLinearKTOLoss(beta=0.3, compiled=False, use_ref_model=True)(
        y["hidden"], y["weight"], y["labels"], y["bias"], preference_labels=desirable,
        kl=torch.tensor(kl, device=device), **refs)
    ours = fused_pref.kto_loss(*_args(x), desirable=desirable, ref_hidden=refs["ref_input"],
                               ref_weight=refs["ref_weight"], ref_bias=refs["ref_bias"], kl=kl, beta=0.3)
    assert relative_error(ours.loss, theirs) <= 1e-5
    ours.loss.backward()
    theirs.backward()
    for name, grad in _grads(x).items():
        assert relative_error(grad, _grads(y)[name]) <= 1e-5, name


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
@pytest.mark.parametrize("kl, use_ref_model", [(0.4, True), (None, True), (0.1, False)],
                         ids=["kto", "apo_zero_unpaired", "reference_free"])
def test_compat_class_matches_liger_kernel(kl, use_ref_model, device):
    from liger_kernel import chunked_loss as liger

    from fused_pref.compat import liger as compat

    x, y = make_inputs(R, T, D, V, device=device, seed=67), make_inputs(R, T, D, V, device=device, seed=67)
    r = make_inputs(R, T, D, V, device=device, seed=71)
    call = dict(preference_labels=torch.tensor(DESIRABLE, device=device), ref_input=r["hidden"].detach(),
                ref_weight=r["weight"].detach(), ref_bias=r["bias"].detach(),
                kl=None if kl is None else torch.tensor(kl, device=device))
    results = []
    for cls, inputs in ((compat.LigerFusedLinearKTOLoss, x), (liger.LigerFusedLinearKTOLoss, y)):
        module = cls(beta=0.3, use_ref_model=use_ref_model) if cls is compat.LigerFusedLinearKTOLoss else \
            cls(beta=0.3, use_ref_model=use_ref_model, compiled=False)
        loss, aux = module(*_args(inputs), **call)
        loss.backward()
        results.append((loss, aux))
    (ours, ours_aux), (theirs, theirs_aux) = results
    assert relative_error(ours, theirs) <= 1e-5
    assert len(ours_aux) == len(theirs_aux) == 6
    for i, (a, b) in enumerate(zip(ours_aux, theirs_aux)):
        assert relative_error(a, b.detach()) <= 1e-5, i
    for name, grad in _grads(x).items():
        assert relative_error(grad, _grads(y)[name]) <= 1e-5, name


def test_module_equals_function(device):
    x = make_inputs(R, T, D, V, device=device, seed=73)
    call = dict(desirable=torch.tensor(DESIRABLE, device=device), ref_logps=torch.zeros(R, device=device), kl=0.2)
    module = fused_pref.FusedKTOLoss(beta=0.4, undesirable_weight=1.5, softcap=30.0)
    assert "undesirable_weight=1.5" in repr(module) and "softcap=30.0" in repr(module)
    out = module(*_args(x), **call)
    expected = fused_pref.kto_loss(*_args(x), beta=0.4, undesirable_weight=1.5, softcap=30.0, **call)
    assert torch.equal(out.loss, expected.loss)
