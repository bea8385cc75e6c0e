"""fused_pref.compat.liger: Liger-Kernel's classes, arguments and (loss, aux) over fused_pref.

Each class equals the fused_pref function it maps onto (loss, every gradient, every aux entry), and
the fp64 reference where the mapping is not a plain rename (DPO's reference model, CPO's averaging);
Liger's own logits means are checked against the logits written out.  Unsupported arguments raise;
the no-op ones change nothing.  With liger-kernel installed, the classes are compared with it too.
"""

import dataclasses
import importlib.util

import pytest
import torch

import fused_pref
from fused_pref.compat import liger as compat
from fused_pref.testing import TOLERANCE, as_reference, make_inputs, relative_error

SHAPE = (4, 9, 24, 131)   # 2 pairs, T=9, D=24, V=131
TOL = TOLERANCE[torch.float32]


def _inputs(device, seed, bias=True):
    return make_inputs(*SHAPE, device=device, seed=seed, bias=bias)


def _run(module, x, **refs):
    loss, aux = module(x["weight"], x["hidden"], x["labels"], x["bias"], **refs)
    loss.backward()
    return loss, aux


def _grads(x):
    return {name: x[name].grad for name in ("hidden", "weight", "bias") if x[name] is not None}


def _assert_close(ours, theirs, what, tol=TOL):
    error = relative_error(ours, theirs)
    assert error <= tol, f"{what}: {error:.2e}"


def _check_against(aux, loss, grads, out, out_grads, *, nll):
    """``(loss, aux)`` and gradients of a compat class against a PreferenceOutput and its gradients."""
    _assert_close(loss, out.loss, "loss")
    for name in grads:
        _assert_close(grads[name], out_grads[name], f"d_{name}")
    expected = {0: out.chosen_logps, 1: out.rejected_logps, 4: nll, 5: out.chosen_rewards, 6: out.rejected_rewards}
    for i, value in expected.items():
        _assert_close(aux[i], value, f"aux[{i}]")


def _logits_means(x):
    """Liger's definition, written out: the mean of every logit of each half, padding included."""
    z = x["hidden"].detach().double() @ x["weight"].detach().double().T
    if x["bias"] is not None:
        z = z + x["bias"].detach().double()
    B = z.shape[0] // 2
    return z[:B].mean(), z[B:].mean()


def _fresh(x):
    return {k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
            for k, v in x.items()}


def _nll(x):
    """Mean NLL of the chosen tokens, from fused_pref (any loss with sft_weight > 0 reports it)."""
    return fused_pref.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], sft_weight=1.0).nll_loss


SIMPO_CASES = {
    "defaults": dict(),
    "no_nll": dict(compute_nll_loss=False, beta=2.0, gamma=1.2),
    "alpha_smoothing": dict(alpha=0.3, label_smoothing=0.1, beta=0.5),
    "alpha_zero": dict(alpha=0.0),   # the loss leaves the NLL out, aux still reports it
}


@pytest.mark.parametrize("kwargs", SIMPO_CASES.values(), ids=SIMPO_CASES.keys())
def test_simpo_equals_simpo_loss(kwargs, device):
    x, y = _inputs(device, 1), _inputs(device, 1)
    loss, aux = _run(compat.LigerFusedLinearSimPOLoss(**kwargs), x)
    options = {"beta": 0.1, "gamma": 0.5, "alpha": 1.0, "label_smoothing": 0.0, "compute_nll_loss": True, **kwargs}
    out = fused_pref.simpo_loss(y["hidden"], y["weight"], y["labels"], y["bias"], beta=options["beta"],
                                gamma=options["gamma"], label_smoothing=options["label_smoothing"],
                                sft_weight=options["alpha"] if options["compute_nll_loss"] else 0.0)
    out.loss.backward()
    nll = _nll(_fresh(y)) if options["compute_nll_loss"] else torch.zeros(())
    assert len(aux) == 7
    _check_against(aux, loss, _grads(x), out, _grads(y), nll=nll)


@pytest.mark.parametrize("average_log_prob", [False, True], ids=["summed", "averaged"])
def test_cpo_equals_fp64_reference(average_log_prob, device):
    x = _inputs(device, 2)
    rx = as_reference(x)
    loss, aux = _run(compat.LigerFusedLinearCPOLoss(beta=0.2, alpha=0.7, label_smoothing=0.05,
                                                    average_log_prob=average_log_prob), x)
    # CPO on averaged log-probs is SimPO without the margin.
    args = (rx["hidden"], rx["weight"], rx["labels"], rx["bias"])
    options = dict(beta=0.2, label_smoothing=0.05, sft_weight=0.7)
    ref = (fused_pref.reference.simpo_loss(*args, gamma=0.0, **options) if average_log_prob
           else fused_pref.reference.cpo_loss(*args, **options))
    ref.loss.backward()
    assert len(aux) == 7
    _check_against(aux, loss, _grads(x), ref, _grads(rx), nll=ref.nll_loss)


def test_orpo_equals_orpo_loss(device):
    x, y = _inputs(device, 3), _inputs(device, 3)
    loss, aux = _run(compat.LigerFusedLinearORPOLoss(beta=0.3), x)
    out = fused_pref.orpo_loss(y["hidden"], y["weight"], y["labels"], y["bias"], beta=0.3)
    out.loss.backward()
    assert len(aux) == 9
    _check_against(aux, loss, _grads(x), out, _grads(y), nll=out.nll_loss)
    _assert_close(aux[7], out.extra["log_odds_ratio"].mean(), "log_odds_ratio")
    _assert_close(aux[8], out.extra["log_odds_chosen"].mean(), "log_odds_chosen")
    assert aux[7].dim() == aux[8].dim() == 0


# Liger's DPO loss types, with a label smoothing where Liger uses one.
DPO_CASES = {t: dict(loss_type=t) for t in compat.LIGER_DPO_LOSS_TYPES}
DPO_CASES["robust"]["label_smoothing"] = 0.1
DPO_CASES["exo_pair"]["label_smoothing"] = 0.05
DPO_CASES["discopop"]["discopop_tau"] = 0.2
DPO_CASES["sigmoid_averaged_rpo"] = dict(average_log_prob=True, compute_nll_loss=True, alpha=0.5)


@pytest.mark.parametrize("kwargs", DPO_CASES.values(), ids=DPO_CASES.keys())
def test_dpo_equals_dpo_loss(kwargs, device):
    x, y = _inputs(device, 4), _inputs(device, 4)
    ref = make_inputs(4, 9, 40, 131, device=device, seed=5)   # a reference model with another width
    ref_args = (ref["hidden"].detach(), ref["weight"].detach(), ref["bias"].detach())
    beta = 0.05 if kwargs.get("loss_type") == "sppo_hard" else 0.2
    loss, aux = _run(compat.LigerFusedLinearDPOLoss(beta=beta, **kwargs), x,
                     ref_input=ref_args[0], ref_weight=ref_args[1], ref_bias=ref_args[2])
    nll_on = kwargs.get("compute_nll_loss", False)
    out = fused_pref.dpo_loss(y["hidden"], y["weight"], y["labels"], y["bias"], ref_hidden=ref_args[0],
                              ref_weight=ref_args[1], ref_bias=ref_args[2], beta=beta,
                              loss_type=kwargs.get("loss_type", "sigmoid"),
                              label_smoothing=kwargs.get("label_smoothing", 0.0),
                              discopop_tau=kwargs.get("discopop_tau", 0.05),
                              sft_weight=kwargs.get("alpha", 1.0) if nll_on else 0.0,
                              length_normalize=kwargs.get("average_log_prob", False))
    out.loss.backward()
    assert len(aux) == 7
    _check_against(aux, loss, _grads(x), out, _grads(y), nll=out.nll_loss if nll_on else torch.zeros(()))


def test_dpo_reference_without_bias_means_no_bias(device):
    # Liger applies ref_bias as given: None is no bias, not the policy's (fused_pref.dpo_loss's default).
    x = _inputs(device, 6)
    rx = as_reference(x)
    ref_hidden = x["hidden"].detach().flip(0) * 1.5
    loss, aux = _run(compat.LigerFusedLinearDPOLoss(beta=0.3), x, ref_input=ref_hidden, ref_weight=x["weight"].detach())
    zeros = torch.zeros(SHAPE[3], dtype=torch.float64)
    ref = fused_pref.reference.dpo_loss(rx["hidden"], rx["weight"], rx["labels"], rx["bias"],
                                        ref_hidden=ref_hidden.cpu().double(), ref_weight=rx["weight"].detach(),
                                        ref_bias=zeros, beta=0.3)
    ref.loss.backward()
    _check_against(aux, loss, _grads(x), ref, _grads(rx), nll=torch.zeros(()))


def test_dpo_without_reference_model_is_reference_free(device):
    x, y = _inputs(device, 7), _inputs(device, 7)
    ignored = torch.full_like(x["hidden"], float("nan"))   # not read without use_ref_model, as in Liger
    loss, aux = _run(compat.LigerFusedLinearDPOLoss(beta=0.2, use_ref_model=False), x, ref_input=ignored)
    out = fused_pref.dpo_loss(y["hidden"], y["weight"], y["labels"], y["bias"], beta=0.2,
                              ref_logps=torch.zeros(SHAPE[0], device=device))
    out.loss.backward()
    _check_against(aux, loss, _grads(x), out, _grads(y), nll=torch.zeros(()))
    _assert_close(aux[5], 0.2 * aux[0], "chosen_rewards = beta * logps")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name", ["SimPO", "CPO", "ORPO", "DPO"])
def test_logits_means_are_liger_means_over_every_position(name, bias, device):
    x = _inputs(device, 8, bias=bias)
    module = getattr(compat, f"LigerFusedLinear{name}Loss")(**({"use_ref_model": False} if name == "DPO" else {}))
    _, aux = module(x["weight"], x["hidden"], x["labels"], x["bias"])
    chosen, rejected = _logits_means(x)
    _assert_close(aux[2], chosen, "chosen_logits_mean")
    _assert_close(aux[3], rejected, "rejected_logits_mean")
    assert aux[2].dim() == aux[3].dim() == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["plain", "softcap"])
def test_cross_entropy_equals_linear_cross_entropy(reduction, softcap, device):
    x, y = _inputs(device, 9), _inputs(device, 9)
    D = SHAPE[2]
    ours = compat.LigerFusedLinearCrossEntropyLoss(reduction=reduction, softcap=softcap)(
        x["weight"], x["hidden"].view(-1, D), x["labels"].view(-1), x["bias"])   # Liger's [BT, D] layout
    theirs = fused_pref.linear_cross_entropy(y["hidden"].view(-1, D), y["weight"], y["labels"].view(-1), y["bias"],
                                             reduction=reduction, softcap=softcap)
    _assert_close(ours, theirs, "loss")
    ours.sum().backward()
    theirs.sum().backward()
    for name, grad in _grads(x).items():
        _assert_close(grad, _grads(y)[name], f"d_{name}")


def test_cross_entropy_token_accuracy_and_predicted_tokens(device):
    # Liger's CrossEntropyOutput fields, from fused_pref.linear_cross_entropy's same options.
    x = _inputs(device, 10)
    D = SHAPE[2]
    args = (x["hidden"].view(-1, D), x["weight"], x["labels"].view(-1), x["bias"])
    ours = compat.LigerFusedLinearCrossEntropyLoss(return_token_accuracy=True, return_predicted_tokens=True)(
        args[1], args[0], args[2], args[3])
    theirs = fused_pref.linear_cross_entropy(*args, return_token_accuracy=True, return_predicted_tokens=True)
    assert [f.name for f in dataclasses.fields(ours)] == ["loss", "z_loss", "token_accuracy", "predicted_tokens"]
    assert ours.z_loss is None and torch.equal(ours.predicted_tokens, theirs.predicted_tokens)
    assert torch.equal(ours.loss, theirs.loss) and torch.equal(ours.token_accuracy, theirs.token_accuracy)


NO_OPS = {
    "simpo": (compat.LigerFusedLinearSimPOLoss, dict(compiled=False, chunk_size=3)),
    "cpo": (compat.LigerFusedLinearCPOLoss, dict(compiled=False, chunk_size=2)),
    "orpo": (compat.LigerFusedLinearORPOLoss, dict(compiled=False, chunk_size=8)),
    "dpo": (compat.LigerFusedLinearDPOLoss, dict(compiled=False, chunk_size=5, use_ref_model=False)),
    "dpo_unused_alpha_default": (compat.LigerFusedLinearDPOLoss, dict(alpha=1.0, use_ref_model=False)),
    "cross_entropy": (compat.LigerFusedLinearCrossEntropyLoss, dict(chunk_size=1024, accum_dtype=torch.float32)),
}


@pytest.mark.parametrize("case", NO_OPS.values(), ids=NO_OPS.keys())
def test_no_op_arguments_change_nothing(case, device):
    cls, kwargs = case
    x = _inputs(device, 10)
    args = (x["weight"], x["hidden"], x["labels"], x["bias"])
    base = {"use_ref_model": False} if "use_ref_model" in kwargs else {}
    plain, knobs = cls(**base)(*args), cls(**kwargs)(*args)
    plain, knobs = (plain, knobs) if isinstance(plain, tuple) else ((plain, ()), (knobs, ()))
    assert torch.equal(plain[0], knobs[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], knobs[1], strict=True))
    assert all(f"{k}={v!r}" in repr(cls(**kwargs)) for k, v in kwargs.items())


UNSUPPORTED = {
    "dpo_ipo": (compat.LigerFusedLinearDPOLoss, dict(loss_type="ipo"), ValueError, "loss_type"),
    "dpo_smoothing_on_sigmoid": (compat.LigerFusedLinearDPOLoss, dict(label_smoothing=0.1), ValueError,
                                 "label_smoothing"),
    "dpo_exo_without_smoothing": (compat.LigerFusedLinearDPOLoss, dict(loss_type="exo_pair"), ValueError,
                                  "label_smoothing"),
    "dpo_robust_half": (compat.LigerFusedLinearDPOLoss, dict(loss_type="robust", label_smoothing=0.5), ValueError,
                        "label_smoothing"),
    "dpo_tau_outside_discopop": (compat.LigerFusedLinearDPOLoss, dict(discopop_tau=0.1), ValueError, "discopop_tau"),
    "dpo_alpha_without_nll": (compat.LigerFusedLinearDPOLoss, dict(alpha=0.5), ValueError, "alpha"),
    "simpo_alpha_negative": (compat.LigerFusedLinearSimPOLoss, dict(alpha=-1.0), ValueError, "alpha"),
    "simpo_beta_zero": (compat.LigerFusedLinearSimPOLoss, dict(beta=0.0), ValueError, "beta"),
    "cpo_flag_not_bool": (compat.LigerFusedLinearCPOLoss, dict(average_log_prob=1), TypeError, "average_log_prob"),
    "orpo_no_nll": (compat.LigerFusedLinearORPOLoss, dict(compute_nll_loss=False), NotImplementedError,
                    "compute_nll_loss"),
    "chunk_size_zero": (compat.LigerFusedLinearORPOLoss, dict(chunk_size=0), ValueError, "chunk_size"),
    "ce_weight_int": (compat.LigerFusedLinearCrossEntropyLoss, dict(ce_weight=torch.ones(3, dtype=torch.long)),
                      TypeError, "ce_weight"),
    "ce_z_loss_scale_negative": (compat.LigerFusedLinearCrossEntropyLoss, dict(lse_square_scale=-1e-4), ValueError,
                                 "lse_square_scale"),
    "ce_smoothing_with_class_weights_and_softcap": (compat.LigerFusedLinearCrossEntropyLoss,
                                        dict(label_smoothing=0.1, ce_weight=torch.ones(3), softcap=30.0),
                                        ValueError, "label_smoothing with ce_weight"),
    "ce_return_z_loss_not_bool": (compat.LigerFusedLinearCrossEntropyLoss, dict(return_z_loss=1), TypeError,
                                  "return_z_loss"),
    "ce_token_scaling": (compat.LigerFusedLinearCrossEntropyLoss, dict(use_token_scaling=True), NotImplementedError,
                         "use_token_scaling"),
    "ce_token_accuracy_not_bool": (compat.LigerFusedLinearCrossEntropyLoss, dict(return_token_accuracy=1),
                                   TypeError, "return_token_accuracy"),
    "ce_accum_bf16": (compat.LigerFusedLinearCrossEntropyLoss, dict(accum_dtype=torch.bfloat16), NotImplementedError,
                      "accum_dtype"),
    "ce_reduction": (compat.LigerFusedLinearCrossEntropyLoss, dict(reduction="batchmean"), ValueError, "reduction"),
}


@pytest.mark.parametrize("case", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_arguments_raise_naming_them(case):
    cls, kwargs, error, name = case
    with pytest.raises(error, match=name):
        cls(**kwargs)


def test_forward_arguments_that_are_unsupported_or_missing_raise(device):
    x = _inputs(device, 11)
    args = (x["weight"], x["hidden"], x["labels"], x["bias"])
    with pytest.raises(NotImplementedError, match="nll_target"):
        compat.LigerFusedLinearORPOLoss()(*args, nll_target=x["labels"])
    with pytest.raises(ValueError, match="ref_input"):
        compat.LigerFusedLinearDPOLoss()(*args)   # use_ref_model=True is Liger's default
    with pytest.raises(ValueError, match="_input"):
        compat.LigerFusedLinearSimPOLoss()(x["weight"], x["hidden"][0], x["labels"][0], x["bias"])


# --- Against Liger-Kernel itself, where it is installed --------------------------------------------

LIGER_CASES = {
    "simpo": ("LigerFusedLinearSimPOLoss", dict(beta=0.2, gamma=0.3, alpha=0.5, label_smoothing=0.1)),
    "cpo": ("LigerFusedLinearCPOLoss", dict(beta=0.2, alpha=0.7, average_log_prob=True)),
    "orpo": ("LigerFusedLinearORPOLoss", dict(beta=0.3)),
    "dpo_sigmoid": ("LigerFusedLinearDPOLoss", dict(beta=0.2, compute_nll_loss=True, average_log_prob=True)),
    "dpo_apo_zero": ("LigerFusedLinearDPOLoss", dict(beta=0.2, loss_type="apo_zero")),
    "dpo_nca_pair": ("LigerFusedLinearDPOLoss", dict(beta=0.2, loss_type="nca_pair")),
}


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
@pytest.mark.parametrize("case", LIGER_CASES.values(), ids=LIGER_CASES.keys())
def test_matches_liger_kernel(case, device):
    from liger_kernel import chunked_loss as liger

    name, kwargs = case
    x, y = _inputs(device, 12), _inputs(device, 12)
    refs = {}
    if name == "LigerFusedLinearDPOLoss":
        r = make_inputs(*SHAPE, device=device, seed=13)
        refs = dict(ref_input=r["hidden"].detach(), ref_weight=r["weight"].detach(), ref_bias=r["bias"].detach())
    ours_loss, ours_aux = _run(getattr(compat, name)(**kwargs), x, **refs)
    theirs_loss, theirs_aux = _run(getattr(liger, name)(compiled=False, **kwargs), y, **refs)
    _assert_close(ours_loss, theirs_loss, "loss", tol=1e-4)
    assert len(ours_aux) == len(theirs_aux)
    for i, (a, b) in enumerate(zip(ours_aux, theirs_aux, strict=True)):
        _assert_close(a, b, f"aux[{i}]", tol=1e-4)
    for grad_name, grad in _grads(x).items():
        _assert_close(grad, _grads(y)[grad_name], f"d_{grad_name}", tol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_token_accuracy_is_ligers(reduction, device):
    # Liger gives each token's 0 or 1 under reduction="none", the valid tokens' fraction otherwise.
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    x = _inputs(device, 10)
    D = SHAPE[2]
    args = (x["weight"], x["hidden"].view(-1, D), x["labels"].view(-1), x["bias"])
    kwargs = dict(reduction=reduction, return_token_accuracy=True)
    ours = compat.LigerFusedLinearCrossEntropyLoss(**kwargs)(*args)
    with torch.no_grad():
        theirs = LigerFusedLinearCrossEntropyLoss(**kwargs)(*(a.detach() for a in args))
    assert ours.token_accuracy.shape == theirs.token_accuracy.shape
    assert torch.equal(ours.token_accuracy, theirs.token_accuracy.to(ours.token_accuracy.dtype))
    reference = fused_pref.reference.linear_cross_entropy(*(a.detach().double() for a in (args[1], args[0])), args[2],
                                                          args[3].detach().double(), **kwargs)
    assert torch.equal(ours.token_accuracy, reference.token_accuracy)
