"""Per-token statistics from the forward pass (``linear_logprobs(return_entropy=..., return_token_accuracy=...,
return_argmax=...)``): the entropy of the softmax, whether the label is its argmax, and the argmax,
against the fp64 reference, through the split-vocabulary merge and both tile plans."""

import pytest
import torch

import fused_pref
from fused_pref.outputs import CrossEntropyOutput, TokenLogprobs
from fused_pref.testing import TOLERANCE, compare, make_inputs, relative_error
from fused_pref.tools.memory import AllocationRecorder

SHAPES = {
    "R4-T23-D97-V1003": (4, 23, 97, 1003),
    "R2-T9-D497-V300": (2, 9, 497, 300),
    "R6-T101-D33-V2053": (6, 101, 33, 2053),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ALL = {"return_entropy": True, "return_token_accuracy": True, "return_argmax": True}


def _both(x, **kwargs):
    ours = fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], **ALL, **kwargs)
    ref = {k: (v.detach().double() if v is not None and v.dtype.is_floating_point else v) for k, v in x.items()}
    theirs = fused_pref.reference.linear_logprobs(ref["hidden"].cpu(), ref["weight"].cpu(), ref["labels"].cpu(),
                                                  None if ref["bias"] is None else ref["bias"].cpu(), **ALL, **kwargs)
    return ours, theirs


def _check(ours, theirs, dtype):
    assert isinstance(ours, TokenLogprobs) and isinstance(theirs, TokenLogprobs)
    assert ours.entropy.dtype == torch.float32 and ours.argmax.dtype == torch.int64
    assert ours.token_accuracy.dtype == torch.bool
    assert relative_error(ours.logp, theirs.logp) <= TOLERANCE[torch.float32]
    assert relative_error(ours.entropy, theirs.entropy) <= TOLERANCE[dtype]
    assert torch.equal(ours.argmax.cpu(), theirs.argmax) and torch.equal(ours.token_accuracy.cpu(), theirs.token_accuracy)
    # The inputs make a quarter of the valid tokens confident: both outcomes occur.
    assert ours.token_accuracy.any() and not ours.token_accuracy.all()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_parity(shape, dtype, device):
    x = make_inputs(*shape, dtype=dtype, device=device, seed=sum(shape))
    _check(*_both(x), dtype)


@pytest.mark.parametrize("options", [{"softcap": 30.0, "temperature": 0.7}, {"shift": True}], ids=["softcap-T", "shift"])
def test_options(options, device):
    # (Statistics run the default plan or "cublas": test_statistics_run_their_plan_forward_and_backward.)
    x = make_inputs(4, 23, 97, 1003, dtype=torch.bfloat16, device=device, seed=61)
    _check(*_both(x, **options), torch.bfloat16)


def test_only_what_is_asked_for(device):
    x = make_inputs(2, 9, 40, 257, device=device, seed=3)
    out = fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"], return_token_accuracy=True)
    assert out.entropy is None and out.argmax is None and out.token_accuracy is not None
    plain = fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"])
    assert isinstance(plain, torch.Tensor) and torch.equal(out.logp, plain)


def test_no_logits_with_every_statistic(device):
    R, T, D, V = 8, 65, 48, 4099
    x = make_inputs(R, T, D, V, device=device, seed=7, bias=False)
    with AllocationRecorder() as recorder:
        out = fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"], **ALL)
        (out.logp.sum() + out.entropy.sum()).backward()   # the entropy's backward too
    assert recorder.largest().numel < R * T * V / 8


@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
def test_flags_must_be_bools(module, device):
    x = make_inputs(2, 9, 40, 257, device=device, seed=5)
    with pytest.raises(TypeError, match=r"^return_entropy must be a bool, got str$"):
        module.linear_logprobs(x["hidden"], x["weight"], x["labels"], return_entropy="yes")


def test_a_tied_max_goes_to_the_first_column(device):
    # Columns 3, 300 and 1500 are the same row of the weight, and the first tokens point straight at
    # it: their max is tied three ways, and torch.argmax (the reference) takes the first column.
    # Under the statistics' (narrow) plan 3 and 300 are two tiles of one vocabulary split (the tie
    # inside a program) and 1500 is in the other split (the tie in the merge).
    x = make_inputs(6, 101, 33, 2053, device=device, seed=67, bias=False, confident=0.0)
    with torch.no_grad():
        x["weight"][300] = x["weight"][1500] = x["weight"][3]
        x["hidden"][:, 20:28] = x["weight"][3] / x["weight"][3].norm() * 3.0
    x["labels"][:, 20:24] = 1500  # a tied column, not the first: not accurate
    x["labels"][:, 24:28] = 3     # the first tied column: accurate
    ours, theirs = _both(x)
    assert (theirs.argmax[:, 20:28] == 3).all()
    _check(ours, theirs, torch.float32)


@pytest.mark.parametrize("active, stats_plan", [("narrow", "narrow"), ("wide", "narrow"), ("widest", "narrow"),
                                                 ("cublas", "cublas")])
def test_statistics_run_their_plan_forward_and_backward(active, stats_plan, monkeypatch, device):
    # A call with statistics, or with per-row weights in its backward (label smoothing), runs the
    # active plan where it carries them (tiles.STATS_PLANS), else the default plan, in its forward
    # and its backward alike (so each logit is rounded the same way in both); a plain call runs the
    # active plan.
    from fused_pref import ops

    plans = []
    for name in ("linear_lse_forward", "linear_grad_backward"):
        def spy(*args, _launcher=getattr(ops, name), **kwargs):
            plans.append(kwargs["plan"])
            return _launcher(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)
    x = make_inputs(2, 9, 40, 257, dtype=torch.bfloat16, device=device, seed=71)
    with fused_pref.kernels.tile_plan(active):
        fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"], return_entropy=True).logp.sum().backward()
        fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], label_smoothing=0.1).backward()
        fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"]).sum().backward()
    assert plans == [stats_plan, stats_plan, stats_plan, stats_plan, active, active]


def test_a_kernel_call_refuses_statistics_in_a_plan_without_them(device):
    x = make_inputs(2, 9, 40, 257, dtype=torch.bfloat16, device=device, seed=72)
    n = x["labels"].numel()
    rows = torch.arange(n, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"^the token statistics run in the plans \('narrow', 'cublas'\)"):
        fused_pref.kernels.linear_lse_forward(x["hidden"].detach(), x["weight"].detach(), None, x["labels"].view(-1),
                                              rows, rows.new_full((1,), n), token_stats=True, plan="wide")


def _gradients(module, x, loss_of, **kwargs):
    out = module.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], return_entropy=True, **kwargs)
    loss_of(out).backward()
    return [x[name].grad for name in ("hidden", "weight", "bias")]


LOSSES = {
    # GRPO-style: a per-token objective on the log-probs plus an entropy bonus.
    "logp+entropy": lambda out: (out.logp * torch.linspace(-1, 1, out.logp.numel(), dtype=out.logp.dtype,
                                                           device=out.logp.device).view(out.logp.shape)).sum()
                                - 0.1 * out.entropy.sum(),
    # The entropy alone (the log-probs reach the backward with no gradient).
    "entropy": lambda out: out.entropy.sum(),
    # A small weight, as an entropy bonus has (the workspace holds the weights over the larger one).
    "small-entropy": lambda out: 1e-3 * out.entropy.sum(),
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("options", [{}, {"softcap": 20.0, "temperature": 0.7}], ids=["plain", "softcap-T"])
def test_the_entropy_is_differentiable(loss, dtype, options, device):
    x = make_inputs(4, 23, 97, 1003, dtype=dtype, device=device, seed=73)
    ref = {k: (v.detach().cpu().double().requires_grad_() if v.dtype.is_floating_point else v.cpu())
           for k, v in x.items()}
    ours = _gradients(fused_pref, x, LOSSES[loss], **options)
    theirs = _gradients(fused_pref.reference, ref, LOSSES[loss], **options)
    for name, a, b in zip(("hidden", "weight", "bias"), ours, theirs):
        assert a.dtype == dtype and relative_error(a, b) <= TOLERANCE[dtype], (name, relative_error(a, b))


@pytest.mark.parametrize("options", [{"plan": "narrow"}, {"plan": "cublas"}, {"backward": "in_forward"}],
                         ids=["narrow", "cublas", "in_forward"])
def test_confident_tokens_keep_their_small_entropy(options, device):
    # Peaked rows (hidden x10: entropies down to 1e-4 and below, logits of tens): lse - E[z] in fp32
    # cancels to the rounding of the largest logit (5e-6 relative over the batch); summed from
    # non-negative terms the entropy is as close to fp64 as a plain fp32 -sum(p log p) (3e-7).
    x = make_inputs(4, 9, 33, 1003, device=device, seed=1)
    with torch.no_grad():
        x["hidden"].mul_(10.0)
    ref = {k: v.detach().cpu().double() if v.dtype.is_floating_point else v.cpu() for k, v in x.items()}
    theirs = fused_pref.reference.linear_logprobs(ref["hidden"], ref["weight"], ref["labels"], ref["bias"],
                                                  return_entropy=True).entropy
    if "backward" in options:    # the gradient-in-forward mode's statistics: a pair loss's token metrics
        ours = fused_pref.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], token_metrics=True,
                                     **options).entropy
        theirs = (theirs * (ref["labels"] != -100)).sum() / (ref["labels"] != -100).sum()
    else:
        ours = fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], return_entropy=True,
                                          **options).entropy
        # Token by token too, where fp32 holds the entropy at all (p of e^-14 and more): 7e-4 at worst
        # now, as fp32's own -sum(p log p); 5e-2 by lse - E[z].
        held = (theirs > 1e-6).to(ours.device)
        assert ((ours - theirs.to(ours)).abs() / theirs.to(ours))[held].max() < 5e-3
    assert relative_error(ours, theirs) < 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cross_entropy_token_accuracy_and_predicted_tokens(reduction, dtype, device):
    x = make_inputs(4, 23, 97, 1003, dtype=dtype, device=device, seed=79)
    kwargs = dict(reduction=reduction, return_token_accuracy=True, return_predicted_tokens=True)
    ours = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], **kwargs)
    ref = {k: (v.detach().cpu().double() if v.dtype.is_floating_point else v.cpu()) for k, v in x.items()}
    theirs = fused_pref.reference.linear_cross_entropy(ref["hidden"], ref["weight"], ref["labels"], ref["bias"],
                                                       **kwargs)
    assert isinstance(ours, CrossEntropyOutput) and ours.z_loss is None
    assert relative_error(ours.loss, theirs.loss) <= TOLERANCE[dtype]
    assert torch.equal(ours.predicted_tokens.cpu(), theirs.predicted_tokens)
    accuracy, expected = ours.token_accuracy.cpu(), theirs.token_accuracy
    if reduction == "none":
        # Each token's 0 or 1, as Liger's (0 where ignored); their fraction below.
        correct = ((theirs.predicted_tokens == ref["labels"]) & (ref["labels"] != -100)).float()
        assert torch.equal(accuracy, correct) and torch.equal(expected, correct)
        valid = (ref["labels"] != -100).sum()
        accuracy, expected = accuracy.sum() / valid, expected.sum() / valid
    assert accuracy.dim() == 0 and 0 < accuracy.item() < 1
    assert accuracy.item() == pytest.approx(expected.item())
    # The loss is the plain call's, bit for bit.
    plain = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], reduction=reduction)
    torch.testing.assert_close(ours.loss, plain, rtol=0, atol=0)


@pytest.mark.parametrize("workspace", [None, 20 * 1003 * 6], ids=["default", "blocks-of-20-rows"])
def test_cross_entropy_statistics_in_the_gradient_in_forward_mode(workspace, device):
    # The argmax from the blocks' first pass: the predicted tokens equal the default path's and the
    # reference's (the first column of a tie, as torch.argmax), so the accuracy too; the loss and
    # its gradients are the mode's; return_z_loss without a z-loss term gives 0, as the default path.
    x = make_inputs(4, 23, 97, 1003, device=device, seed=81)
    kwargs = dict(return_token_accuracy=True, return_predicted_tokens=True, softcap=20.0, temperature=0.8,
                  **({} if workspace is None else {"workspace_bytes": workspace}))
    compare(lambda m, x: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"],
                                                backward="in_forward", **kwargs).loss, x).check(torch.float32)
    args = (x["hidden"].detach(), x["weight"].detach(), x["labels"], x["bias"].detach())
    out = fused_pref.linear_cross_entropy(*args, backward="in_forward", **kwargs)
    default = fused_pref.linear_cross_entropy(*args, **kwargs)
    ref = {k: (v.detach().cpu().double() if v.dtype.is_floating_point else v.cpu()) for k, v in x.items()}
    theirs = fused_pref.reference.linear_cross_entropy(ref["hidden"], ref["weight"], ref["labels"], ref["bias"],
                                                       **kwargs)
    assert torch.equal(out.predicted_tokens, default.predicted_tokens)
    assert torch.equal(out.predicted_tokens.cpu(), theirs.predicted_tokens)
    assert out.token_accuracy.item() == default.token_accuracy.item() > 0
    z = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], backward="in_forward",
                                        return_z_loss=True)
    assert isinstance(z, CrossEntropyOutput) and z.z_loss.item() == 0 and z.token_accuracy is None


PREFERENCE = {
    "simpo": ("simpo_loss", {}),
    "cpo": ("cpo_loss", {}),
    "orpo": ("orpo_loss", {}),
    "dpo": ("dpo_loss", {"ref_logps": "zeros"}),
}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", PREFERENCE, ids=PREFERENCE.keys())
def test_preference_token_metrics_are_trl_dpo_trainers(name, packed, device):
    # TRL DPOTrainer: the entropy averaged over every valid token, the accuracy over the chosen ones.
    fn, kwargs = PREFERENCE[name]
    x = make_inputs(4, 13, 40, 301, device=device, seed=17)
    extra = {}
    if packed:
        x["hidden"] = x["hidden"].detach().reshape(52, 40)
        x["labels"] = x["labels"].reshape(52)
        extra["cu_seqlens"] = torch.tensor([0, 13, 26, 39, 52], device=device, dtype=torch.int32)
    if kwargs.get("ref_logps") == "zeros":
        kwargs = {"ref_logps": torch.zeros(4, device=device)}
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    out = getattr(fused_pref, fn)(*args, token_metrics=True, **kwargs, **extra)
    stats = fused_pref.reference.linear_logprobs(*(t.detach().double().cpu() if t.dtype.is_floating_point else t.cpu()
                                                   for t in args), return_entropy=True, return_token_accuracy=True,
                                                 **{k: v.cpu() for k, v in extra.items()})
    valid = (x["labels"] != -100).cpu()
    chosen = torch.zeros_like(valid)
    chosen[: 26 if packed else 2] = True   # the first two sequences
    expected_entropy = stats.entropy[valid].mean()
    expected_accuracy = stats.token_accuracy[valid & chosen].float().mean()
    metrics = out.metrics()
    assert metrics["entropy"] == pytest.approx(expected_entropy.item(), rel=1e-5)
    assert metrics["mean_token_accuracy"] == pytest.approx(expected_accuracy.item(), abs=1e-7)
    assert 0 < metrics["mean_token_accuracy"] < 1    # the inputs make both outcomes occur
    ref = fused_pref.reference
    theirs = getattr(ref, fn)(*(t.detach().double().cpu() if t.dtype.is_floating_point else t.cpu() for t in args),
                              token_metrics=True, **{k: v.cpu() for k, v in {**kwargs, **extra}.items()})
    assert theirs.metrics()["entropy"] == pytest.approx(metrics["entropy"], rel=1e-5)
    assert theirs.metrics()["mean_token_accuracy"] == metrics["mean_token_accuracy"]
    plain = getattr(fused_pref, fn)(*args, **kwargs, **extra)
    assert plain.entropy is None and "entropy" not in plain.metrics() and torch.equal(plain.loss, out.loss)
