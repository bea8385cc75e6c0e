"""fused_pref.grpo: GRPO's loss (TRL 1.16, every loss type) on the fused log-probs.

- The fused path against its fp64 reference twin: the loss, every gradient and the metrics, each
  loss type at both importance-sampling levels, fp32 and bf16, padded and packed, awkward shapes
  (T=13, D=72, V=457), a sequence with no completion token, NaN where the masks say nothing is read.
- Against TRL's own ``GRPOTrainer._compute_loss``, run on a stand-in trainer whose model returns the
  reference's log-probs: the loss, the gradients through those log-probs, every metric TRL logs.
- Against Liger-Kernel's ``LigerFusedLinearGRPOLoss`` on the CPU, through fused_pref.compat.liger.
- The errors.
"""

import collections
import math
import types

import pytest
import torch

import fused_pref
from fused_pref.compat.liger import LigerFusedLinearGRPOLoss
from fused_pref.grpo import (CLIPPED_LOSS_TYPES, GRPO_LOSS_TYPES, GRPOOutput, GRPOSpec, grpo_from_logprobs, grpo_loss,
                             reference_grpo_loss)
from fused_pref.testing import (TOLERANCE, as_reference, compare, count_host_reads, make_inputs,
                                relative_error)
from fused_pref.tools.memory import AllocationRecorder

B, T, D, V = 3, 13, 72, 457
ADVANTAGES = (0.9, -1.1, 0.5)      # both signs: both sides of every clip are reached
# bf16 gradients come back rounded to bf16 (2^-8 relative per element).
BF16_TOLERANCE = 1e-2


def _inputs(seed, device, *, dtype=torch.float32, junk=math.nan, empty_row=False, bias=True, temperature=0.7):
    """``make_inputs`` plus GRPO's tensors: ``old_logps`` and ``ref_logps`` the policy's own log-probs
    (at ``temperature``) perturbed, so that ratios land on both sides of every clip; ``junk`` wherever
    the labels are ignored (never read: NaN there fails any test that reads it)."""
    x = make_inputs(B, T, D, V, dtype=dtype, device=device, seed=seed, bias=bias)
    if empty_row:
        x["labels"][0] = -100      # (row 1 keeps the only negative advantage)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref = as_reference({k: x[k] for k in ("hidden", "weight", "bias")})
        logp = fused_pref.reference.linear_logprobs(ref["hidden"], ref["weight"], x["labels"].cpu(), ref["bias"],
                                                    temperature=temperature)
    valid = x["labels"].cpu() != -100

    def perturbed(scale):
        values = logp + scale * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)
        return torch.where(valid, values, junk).float().to(device)

    x["advantages"] = torch.tensor(ADVANTAGES, device=device)
    x["old_logps"], x["ref_logps"], x["sampling_logps"] = perturbed(0.5), perturbed(0.5), perturbed(0.4)
    ratio = torch.exp(0.2 * torch.randn(logp.shape, generator=gen))
    x["importance_sampling_ratio"] = torch.where(valid, ratio, junk).to(device)
    return x


TENSORS = ("advantages", "old_logps", "ref_logps", "sampling_logps", "importance_sampling_ratio")


def _call(module, x, tensors=("advantages", "old_logps", "ref_logps"), **kwargs) -> GRPOOutput:
    """``grpo_loss`` (``module`` fused_pref) or ``reference_grpo_loss`` (fused_pref.reference) on ``x``."""
    fn = grpo_loss if module is fused_pref else reference_grpo_loss
    return fn(x["hidden"], x["weight"], x["labels"], x["bias"], **{k: x[k] for k in tensors}, **kwargs)


def _check_parity(x, dtype, tolerance, tensors=("advantages", "old_logps", "ref_logps"), **kwargs):
    """The fused loss, gradients and metrics against the fp64 reference's."""
    outputs = {}

    def loss(module, inputs):
        outputs[module] = _call(module, inputs, tensors, **kwargs)
        return outputs[module].loss

    result = compare(loss, x)
    failures = [f"{name}: {error:.2e}" for name, error in result.errors.items() if not error <= tolerance]
    failures += [f"{name} came back in {got}" for name, (got, want) in result.dtypes.items() if got != want]
    ours, theirs = outputs[fused_pref].metrics(), outputs[fused_pref.reference].metrics()
    assert ours.keys() == theirs.keys()
    failures += [f"metrics[{key!r}]: {ours[key]} vs {theirs[key]}" for key in ours
                 if not math.isclose(ours[key], theirs[key], rel_tol=1e-4, abs_tol=1e-5)]
    assert not failures, "; ".join(failures)
    assert outputs[fused_pref].loss.dtype == torch.float32
    return outputs[fused_pref]


# Every loss type at both levels, off-policy, with the KL term and a temperature.
OFF_POLICY = dict(beta=0.04, temperature=0.7, epsilon_high=0.28, max_completion_length=16)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_parity(loss_type, level, device):
    x = _inputs(13, device)
    out = _check_parity(x, torch.float32, TOLERANCE[torch.float32], loss_type=loss_type,
                        importance_sampling_level=level, **OFF_POLICY)
    if loss_type in CLIPPED_LOSS_TYPES and level == "token":
        # The inputs reach both clips, or the test would not test the min().
        assert 0 < out.metrics()["clip_ratio/low_mean"] < 1 and 0 < out.metrics()["clip_ratio/high_mean"] < 1


# The options beyond the loss types, each at least once.
CASES = {
    "on-policy": dict(loss_type="grpo", tensors=("advantages",)),
    "everything": dict(loss_type="dapo", delta=1.3, use_bias_correction_kl=False, num_items_in_batch=50,
                       off_policy_mask_threshold=0.02, top_entropy_quantile=0.5, entropy_coef=0.01,
                       tensors=TENSORS, **OFF_POLICY),
    "vespo-per-sequence-ratio": dict(loss_type="vespo", per_sequence_ratio=True, tensors=TENSORS, **OFF_POLICY),
    "sapo-empty-row": dict(loss_type="sapo", empty_row=True, sapo_temperature_pos=0.8, **OFF_POLICY),
    "gspo-empty-row": dict(loss_type="grpo", importance_sampling_level="sequence", empty_row=True, **OFF_POLICY),
    "cispo-no-bias": dict(loss_type="cispo", epsilon_high=1.1, bias=False, beta=0.1),
    "bnpo-softcap": dict(loss_type="bnpo", softcap=3.0, **OFF_POLICY),
}


def _case(name, device, dtype=torch.float32):
    kwargs = dict(CASES[name])
    x = _inputs(11, device, dtype=dtype, empty_row=kwargs.pop("empty_row", False), bias=kwargs.pop("bias", True))
    if kwargs.pop("per_sequence_ratio", False):
        x["importance_sampling_ratio"] = torch.tensor([1.3, 0.8, 1.05], device=device)
    return x, kwargs


@pytest.mark.parametrize("name", CASES)
def test_options(name, device):
    x, kwargs = _case(name, device)
    _check_parity(x, torch.float32, TOLERANCE[torch.float32], **kwargs)


@pytest.mark.parametrize("name", ["gspo-empty-row", "everything"])
def test_bf16(name, device):
    x, kwargs = _case(name, device, torch.bfloat16)
    _check_parity(x, torch.bfloat16, BF16_TOLERANCE, **kwargs)


def _packed(x, cu_seqlens):
    """``x`` with its sequences packed one after the other, ``hidden`` a fresh ``[N, D]`` leaf."""
    packed = dict(x)
    for key in ("labels", "old_logps", "ref_logps"):
        packed[key] = x[key].flatten(0, 1)
    packed["hidden"] = x["hidden"].detach().flatten(0, 1).requires_grad_()
    packed["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int32, device=x["labels"].device)
    return packed


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("luspo", "sequence"), ("vespo", "token")])
def test_packed_with_shift(loss_type, level, device):
    # Three sequences of 9, 21 and 9 tokens, each predicting its own next label.
    x = _packed(_inputs(7, device), [0, 9, 30, 3 * T])
    cu_seqlens = x.pop("cu_seqlens")
    for key in ("old_logps", "ref_logps"):
        # Entry t now scores labels[t + 1] (NaN where that is ignored, or at a sequence's end).
        x[key] = x[key].roll(-1)
    _check_parity(x, torch.float32, TOLERANCE[torch.float32], loss_type=loss_type, importance_sampling_level=level,
                  shift=True, cu_seqlens=cu_seqlens, **OFF_POLICY)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "luspo", "vespo"])
def test_packed_equals_padded(loss_type):
    # The same sequences, padded or packed at their padded length: the same loss and gradients.
    x = as_reference(_inputs(17, "cpu", junk=-7.0))
    y = as_reference(x)
    padded = _call(fused_pref.reference, x, importance_sampling_level="sequence", loss_type=loss_type, **OFF_POLICY)
    p = _packed(y, [0, T, 2 * T, 3 * T])
    packed = _call(fused_pref.reference, p, importance_sampling_level="sequence", loss_type=loss_type,
                   cu_seqlens=p["cu_seqlens"], **OFF_POLICY)
    padded.loss.backward()
    packed.loss.backward()
    assert relative_error(packed.loss, padded.loss) < 1e-12
    assert relative_error(p["hidden"].grad.view_as(x["hidden"]), x["hidden"].grad) < 1e-12
    for name in ("weight", "bias"):
        assert relative_error(y[name].grad, x[name].grad) < 1e-12, name
    assert packed.metrics() == pytest.approx(padded.metrics(), rel=1e-6)


def test_on_policy_gradient_is_the_policy_gradient(device):
    # On-policy with beta = 0, every clipped loss type's gradient is that of -A * logp, normalised
    # as the loss type normalises: for dapo, sum_t A_b logp_t over the completion tokens / their count.
    x = _inputs(19, device)
    out = _call(fused_pref, x, tensors=("advantages",), loss_type="dapo")
    assert out.loss.item() == pytest.approx(-sum(ADVANTAGES[b] * (x["labels"][b] != -100).sum().item()
                                                 for b in range(B)) / (x["labels"] != -100).sum().item(), rel=1e-6)
    out.loss.backward()
    y = make_inputs(B, T, D, V, device=device, seed=19)
    logp = fused_pref.linear_logprobs(y["hidden"], y["weight"], y["labels"], y["bias"])
    valid = y["labels"] != -100
    (-(x["advantages"][:, None] * logp).sum() / valid.sum()).backward()
    for name in ("hidden", "weight", "bias"):
        assert relative_error(x[name].grad, y[name].grad) < 1e-6, name


def test_top_entropy_quantile_keeps_its_threshold():
    # TRL keeps the tokens whose entropy is >= the quantile: at rho = 0.5 over entropies 1..5 (the
    # sixth token ignored) the median 3 itself carries a gradient, 1 and 2 do not.
    logp = torch.full((1, 6), -1.0, requires_grad=True)
    entropy = torch.tensor([[3.0, 1.0, 5.0, 2.0, 4.0, 9.0]])
    valid = torch.tensor([[True] * 5 + [False]])
    spec = GRPOSpec(loss_type="bnpo", top_entropy_quantile=0.5)
    grpo_from_logprobs(logp, entropy, valid, torch.ones(1), spec).loss.backward()
    assert logp.grad.ne(0).tolist() == [[True, False, True, False, True, False]]


def test_clip_extremes_skip_empty_sequences():
    # clip_ratio/low_min is TRL's nanmin over sequences: one without completion tokens is NaN, skipped.
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    old = torch.zeros(2, 3)                                  # every ratio e^-1 < 1 - epsilon_low
    valid = torch.tensor([[False] * 3, [True] * 3])
    out = grpo_from_logprobs(logp, None, valid, torch.tensor([-1.0, -1.0]), GRPOSpec(loss_type="grpo"),
                             old_logps=old)
    assert out.metrics()["clip_ratio/low_min"] == 1.0 and out.metrics()["clip_ratio/low_mean"] == 1.0


def test_metrics_one_host_sync(device):
    x = _inputs(23, device)
    out = _call(fused_pref, x, tensors=TENSORS, loss_type="dapo", entropy_coef=0.01, **OFF_POLICY)
    with count_host_reads() as reads:
        metrics = out.metrics()
    assert sum(reads.values()) == 1, reads
    assert set(metrics) == {"kl", "entropy", "policy_loss", "clip_ratio/low_mean", "clip_ratio/high_mean",
                            "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max"}
    assert all(not v.requires_grad for v in out.stats.values())
    assert out.logps.shape == x["labels"].shape and not out.logps.requires_grad


@pytest.mark.parametrize("loss_type", ["dapo", "vespo"])
def test_validate_false_reads_nothing_back_to_the_host(loss_type, device):
    # As every function of the library (DESIGN.md section 4): no host sync without validation.
    x = _inputs(47, device)
    kwargs = dict(loss_type=loss_type, tensors=TENSORS, top_entropy_quantile=0.5, entropy_coef=0.01,
                  off_policy_mask_threshold=0.02, validate=False, **OFF_POLICY)
    _call(fused_pref, x, **kwargs).loss.backward()   # compile and warm up first
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with count_host_reads() as reads:
            _call(fused_pref, x, **kwargs).loss.backward()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert not reads, reads


def test_no_logits(device):
    # N * V / 8 above the weight's own gradient (V * D), which must exist.
    R, T_, D_, V_ = 8, 65, 48, 4099
    x = make_inputs(R, T_, D_, V_, device=device, seed=29, bias=False)
    advantages = torch.linspace(-1, 1, R, device=device)
    with AllocationRecorder() as recorder:
        out = grpo_loss(x["hidden"], x["weight"], x["labels"], advantages=advantages, loss_type="grpo",
                        entropy_coef=0.01, top_entropy_quantile=0.5)
        out.loss.backward()
    assert recorder.largest().numel < R * T_ * V_ / 8


# ----------------------------------------------------------------------------------------------------
# TRL's own code: GRPOTrainer._compute_loss on a stand-in trainer.

def _trl_trainer(logps, entropies, *, loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high,
                 max_completion_length, use_vllm, entropy_coef, top_entropy_quantile, off_policy_mask_threshold,
                 config):
    """A GRPOTrainer holding only what ``_compute_loss`` reads: one process, no gradient accumulation,
    training mode; its model's forward returns ``logps`` and ``entropies``."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    single_process = types.SimpleNamespace(
        num_processes=1, sync_gradients=True, reduce=lambda tensor, reduction: tensor, gather=lambda tensor: tensor,
        gather_for_metrics=lambda tensor: tensor, pad_across_processes=lambda tensor, dim, pad_index: tensor)
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(
        accelerator=single_process, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        loss_type=loss_type, importance_sampling_level=importance_sampling_level, beta=beta,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, max_completion_length=max_completion_length,
        use_vllm=use_vllm, vllm_importance_sampling_correction=use_vllm, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold, entropy_coef=entropy_coef,
        _entropy_bonus_enabled=entropy_coef != 0, use_adaptive_entropy=False, aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
        args=types.SimpleNamespace(steps_per_generation=1, **config),
        _get_per_token_logps_and_entropies=lambda model, *args, **kwargs: (logps, entropies, None))
    return trainer


# TRL's defaults, but SAPO's 1.05, which TRL turns into an fp32 tensor (torch.where on Python floats)
# while the rest of this test runs in fp64: 1.25 is exact in both.
TRL_DEFAULTS = dict(delta=None, use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.25,
                    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
# top_entropy_quantile=0.45 puts the quantile between two entropies: TRL rounds the threshold to fp32,
# which against fp64 entropies drops a token whose entropy is the threshold itself.
TRL_SETTINGS = {
    "plain": dict(beta=0.0, on_policy=True),
    "kl": dict(beta=0.04, delta=1.25),
    "everything": dict(beta=0.04, use_bias_correction_kl=False, delta=1.25, ratio=True, entropy_coef=0.01,
                       top_entropy_quantile=0.45, sapo_temperature_pos=0.75,
                       off_policy_mask_threshold=0.02,   # keeps row 1 by sampling_logps; by old_logps it drops it
                       vespo_k_pos=1.5, vespo_lambda_neg=-0.5),    # TRL floors lambda at 1e-4
}


@pytest.mark.parametrize("completion_tokens", [3, 0])
def test_divisor_below_one_matches_trl(completion_tokens):
    # TRL clamps the generation batch's count at 1 and then divides by the processes: with few
    # completion tokens on many processes the divisor is below 1, and is to be kept; with none, 0
    # (its count before the clamp, or the divisor computed from it) gives TRL's loss of 0.
    pytest.importorskip("trl")
    x = as_reference(_inputs(31, "cpu", junk=-7.0, temperature=1.0))
    keep = torch.zeros_like(x["labels"], dtype=torch.bool).flatten()
    keep[torch.nonzero((x["labels"] != -100).flatten())[:completion_tokens]] = True
    x["labels"] = x["labels"].masked_fill(~keep.view_as(x["labels"]), -100)
    valid = x["labels"] != -100
    hyper = dict(loss_type="dapo", importance_sampling_level="token", beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                 max_completion_length=16, entropy_coef=0.0, top_entropy_quantile=1.0, off_policy_mask_threshold=None)
    y = as_reference(x)
    out = fused_pref.reference.linear_logprobs(y["hidden"], y["weight"], y["labels"], y["bias"], return_entropy=True)
    trainer = _trl_trainer(out.logp, out.entropy, use_vllm=False, config=TRL_DEFAULTS, **hyper)
    trainer.accelerator.num_processes = 8
    count = torch.tensor(float(completion_tokens), dtype=torch.float64)
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.where(valid, y["labels"], 0), completion_mask=valid.long(),
                  advantages=y["advantages"], num_items_in_batch=count, old_per_token_logps=y["old_logps"])
    theirs = trainer._compute_loss(None, inputs)
    for divisor in {count.clamp(min=1) / 8, count / 8, float(count / 8)}:
        ours = _call(fused_pref.reference, x, num_items_in_batch=divisor, **hyper, **TRL_DEFAULTS)
        assert relative_error(ours.loss, theirs) < 1e-12 if completion_tokens else ours.loss == theirs == 0


@pytest.mark.parametrize("setting", TRL_SETTINGS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_matches_trl(loss_type, level, setting):
    pytest.importorskip("trl")
    settings = dict(TRL_SETTINGS[setting])
    on_policy, with_ratio = settings.pop("on_policy", False), settings.pop("ratio", False)
    entropy_coef = settings.pop("entropy_coef", 0.0)
    top_entropy_quantile = settings.pop("top_entropy_quantile", 1.0)
    off_policy_mask_threshold = settings.pop("off_policy_mask_threshold", None)
    beta = settings.pop("beta")
    config = {**TRL_DEFAULTS, **settings}
    # Junk (finite, as TRL needs) where nothing is read; TRL's VESPO sums the sampler ratio over
    # padding too, so that is 1 there.
    x = as_reference(_inputs(31, "cpu", junk=-7.0, empty_row=True, temperature=1.0))
    valid = x["labels"] != -100
    x["importance_sampling_ratio"] = torch.where(valid, x["importance_sampling_ratio"], 1.0)
    hyper = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                 max_completion_length=16, entropy_coef=entropy_coef, top_entropy_quantile=top_entropy_quantile,
                 off_policy_mask_threshold=off_policy_mask_threshold)
    num_items = torch.tensor(2.0 * valid.sum().item(), dtype=torch.float64)   # a generation batch twice this one

    # TRL, on log-probs and entropies from the reference (fp64, differentiable).
    y = as_reference(x)
    out = fused_pref.reference.linear_logprobs(y["hidden"], y["weight"], y["labels"], y["bias"], return_entropy=True)
    trainer = _trl_trainer(out.logp, out.entropy, use_vllm=with_ratio, config=config, **hyper)
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.where(valid, y["labels"], 0), completion_mask=valid.long(),
                  advantages=y["advantages"], num_items_in_batch=num_items,
                  ref_per_token_logps=y["ref_logps"], sampling_per_token_logps=y["sampling_logps"])
    if not on_policy:
        inputs["old_per_token_logps"] = y["old_logps"]
    if with_ratio:
        inputs["importance_sampling_ratio"] = y["importance_sampling_ratio"]
    theirs = trainer._compute_loss(None, inputs)
    theirs.backward()
    their_metrics = {k: v[0] for k, v in trainer._metrics["train"].items() if k != "entropy_coef"}

    # Ours, from the same inputs.
    tensors = ["advantages", "ref_logps", "sampling_logps"] + ([] if on_policy else ["old_logps"])
    tensors += ["importance_sampling_ratio"] if with_ratio else []
    ours = _call(fused_pref.reference, x, tensors, num_items_in_batch=num_items, **hyper, **config)
    ours.loss.backward()

    assert relative_error(ours.loss, theirs) < 1e-10
    for name in ("hidden", "weight", "bias"):
        assert relative_error(x[name].grad, y[name].grad) < 1e-10, name
    assert ours.metrics().keys() == their_metrics.keys()
    for key, value in ours.metrics().items():
        assert math.isclose(value, their_metrics[key], rel_tol=1e-6, abs_tol=1e-7), (key, value, their_metrics[key])


# ----------------------------------------------------------------------------------------------------
# Liger-Kernel's LigerFusedLinearGRPOLoss (its chunked loss runs on the CPU; compiled=False).

LIGER_CASES = {
    **{f"{t}": dict(loss_type=t) for t in GRPO_LOSS_TYPES if t != "luspo"},
    **{f"{t}-sequence": dict(loss_type=t, importance_sampling_level="sequence") for t in CLIPPED_LOSS_TYPES
       if t != "luspo"},
    "dapo-ref-input-delta": dict(loss_type="dapo", ref_input=True, delta=1.25, use_bias_correction_kl=True),
    "grpo-no-ref-model-ratio": dict(loss_type="grpo", use_ref_model=False, vllm_is_ratio="token"),
    "vespo-ratio-items": dict(loss_type="vespo", vllm_is_ratio="sequence", num_items_in_batch=40),
    "cispo-beta0-on-policy": dict(loss_type="cispo", beta=0.0, on_policy=True, epsilon_high=1.3),
    "luspo-sequence-beta0": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.0),
}


def _liger_run(cls, x, device, case):
    case = dict(case)
    use_ref_input, ratio = case.pop("ref_input", False), case.pop("vllm_is_ratio", None)
    num_items, on_policy = case.pop("num_items_in_batch", None), case.pop("on_policy", False)
    kwargs = dict(beta=0.04, compiled=False, temperature=0.7, max_completion_length=16, epsilon_high=0.28)
    module = cls(**{**kwargs, **case})
    mask = (x["labels"] != -100).long()
    ids = torch.where(mask.bool(), x["labels"], 3)
    forward = dict(old_per_token_logps=None if on_policy else x["old_logps"], num_items_in_batch=num_items)
    if use_ref_input:
        forward.update(ref_input=x["hidden"].detach().flip(0), ref_weight=x["weight"].detach())
    else:
        forward["ref_per_token_logps"] = x["ref_logps"]
    if ratio == "token":
        forward["vllm_is_ratio"] = torch.where(mask.bool(), x["importance_sampling_ratio"], 1.0)
    elif ratio == "sequence":
        forward["vllm_is_ratio"] = torch.tensor([[1.3], [0.8], [1.05]], device=device)
    loss, metrics = module(x["hidden"], x["weight"], ids, mask, x["advantages"], x["bias"], **forward)
    loss.backward()
    return loss, metrics


@pytest.mark.parametrize("name", LIGER_CASES)
def test_matches_liger_kernel(name, device):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    x, y = _inputs(37, device, junk=-7.0), _inputs(37, "cpu", junk=-7.0)
    ours, our_metrics = _liger_run(LigerFusedLinearGRPOLoss, x, device, LIGER_CASES[name])
    theirs, their_metrics = _liger_run(liger.LigerFusedLinearGRPOLoss, y, "cpu", LIGER_CASES[name])
    assert relative_error(ours, theirs) < TOLERANCE[torch.float32]
    for key in ("hidden", "weight", "bias"):
        assert relative_error(x[key].grad, y[key].grad) < TOLERANCE[torch.float32], key
    assert len(our_metrics) == len(their_metrics)
    for a, b in zip(our_metrics, their_metrics):
        assert a.shape == b.shape and a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# Errors: each bad argument, named, by the fused path and the reference alike, before any work.

ERRORS = {
    "loss_type": (dict(loss_type="ppo"), ValueError, r"^loss_type must be one of \('grpo'"),
    "level": (dict(importance_sampling_level="seq"), ValueError, r"^importance_sampling_level must be one of"),
    "advantages-shape": (dict(advantages=torch.zeros(B, 1)), ValueError, r"^advantages must be \[B\] = \[3\]"),
    "advantages-int": (dict(advantages=torch.zeros(B, dtype=torch.long)), TypeError,
                       r"^advantages must be a floating-point torch.Tensor \[B\], got torch.int64$"),
    "old-shape": (dict(old_logps=torch.zeros(B, T + 1)), ValueError,
                  r"^old_logps must have the shape of labels \(3, 13\), got \(3, 14\)$"),
    "ref-shape": (dict(beta=0.1, ref_logps=torch.zeros(B)), ValueError, r"^ref_logps must have the shape of labels"),
    "beta-without-ref": (dict(beta=0.1), ValueError, r"^beta=0.1 weighs the KL to the reference model: give ref_logps"),
    "dr_grpo-length": (dict(loss_type="dr_grpo"), ValueError, r"^loss_type='dr_grpo' divides by B \* max_completion_"),
    "epsilon_low-negative": (dict(epsilon_low=-0.1), ValueError,
                             r"^epsilon_low must be a number in \[0, 1\], got -0.1$"),
    "epsilon_low-above-1": (dict(epsilon_low=1.5), ValueError, r"^epsilon_low must be a number in \[0, 1\]"),
    "epsilon_high-nan": (dict(epsilon_high=math.nan), ValueError,
                         r"^epsilon_high must be a finite number >= 0, got nan$"),
    "beta-negative": (dict(beta=-1.0), ValueError, r"^beta must be a finite number >= 0, got -1.0$"),
    "beta-bool": (dict(beta=True), ValueError, r"^beta must be a finite number >= 0, got True$"),
    "delta-zero": (dict(delta=0), ValueError, r"^delta must be a finite number > 0, got 0$"),
    "sapo-temperature": (dict(sapo_temperature_neg=0.0), ValueError,
                         r"^sapo_temperature_neg must be a finite number > 0"),
    "top_entropy_quantile": (dict(top_entropy_quantile=2), ValueError, r"^top_entropy_quantile must be a number in"),
    "max_completion_length": (dict(max_completion_length=0), ValueError,
                              r"^max_completion_length must be a positive int or None, got 0$"),
    "num_items_in_batch": (dict(num_items_in_batch=-1), ValueError,
                           r"^num_items_in_batch must be a finite number >= 0"),
    "ratio-shape": (dict(importance_sampling_ratio=torch.ones(B + 1)), ValueError,
                    r"^importance_sampling_ratio must have the shape of labels \(3, 13\) \(per token\) or \[B\]"),
    "bias-correction-flag": (dict(use_bias_correction_kl="yes"), TypeError, r"^use_bias_correction_kl must be a bool"),
    "flat-hidden": (dict(flat=True), ValueError, r"^hidden must be \[R, T, D\] \(or \[N, D\] with cu_seqlens\)"),
}


@pytest.mark.parametrize("name", ERRORS)
@pytest.mark.parametrize("fn", [grpo_loss, reference_grpo_loss], ids=["fused", "reference"])
def test_errors(fn, name, device):
    kwargs, error, pattern = ERRORS[name]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    x = make_inputs(B, T, 8, 11, device=device, seed=41)
    hidden, labels = x["hidden"], x["labels"]
    if kwargs.pop("flat", False):
        hidden, labels = hidden.flatten(0, 1), labels.flatten()
    kwargs.setdefault("advantages", torch.zeros(B, device=device))
    with pytest.raises(error, match=pattern):
        fn(hidden, x["weight"], labels, x["bias"], **kwargs)


COMPAT_ERRORS = {
    "sequence-cispo": (dict(loss_type="cispo", importance_sampling_level="sequence"), {}, ValueError,
                       r"^importance_sampling_level='sequence' is not supported for loss_type='cispo'"),
    "luspo-token": (dict(loss_type="luspo"), {}, NotImplementedError, r"^loss_type='luspo' at importance_sampling"),
    "luspo-kl": (dict(loss_type="luspo", importance_sampling_level="sequence"), dict(ref=True), NotImplementedError,
                 r"^loss_type='luspo' with a reference KL term"),
    "no-reference": (dict(), {}, ValueError, r"^use_ref_model=True needs ref_per_token_logps"),
    "weighted-mask": (dict(use_ref_model=False), dict(mask_value=0.5), NotImplementedError,
                      r"^attention_mask holds values other than 0 and 1"),
    "dr_grpo": (dict(loss_type="dr_grpo"), {}, ValueError, r"^loss_type='dr_grpo' divides by"),
    "sapo-temperature": (dict(loss_type="sapo", sapo_temperature_pos=0.0), {}, ValueError,
                         r"^sapo_temperature_pos must be a finite number > 0"),
}


@pytest.mark.parametrize("name", COMPAT_ERRORS)
def test_compat_errors(name, device):
    init, call, error, pattern = COMPAT_ERRORS[name]
    x = make_inputs(B, T, 8, 11, device=device, seed=43)
    mask = torch.ones(B, T, device=device)
    mask[0, 0] = call.get("mask_value", 1.0)
    forward = dict(ref_per_token_logps=torch.zeros(B, T, device=device)) if call.get("ref") else {}
    with pytest.raises(error, match=pattern):
        module = LigerFusedLinearGRPOLoss(**init)
        module(x["hidden"], x["weight"], x["labels"].clamp(min=0), mask, torch.zeros(B, device=device), **forward)


def test_public_names():
    # The package's, the reference's and the Liger-compatible names of the loss.
    assert fused_pref.grpo_loss is grpo_loss and fused_pref.reference.grpo_loss is reference_grpo_loss
    assert fused_pref.GRPOOutput is GRPOOutput


def test_module_equals_function(device):
    x = make_inputs(3, 9, 40, 257, device=device, seed=5)
    advantages = torch.tensor([1.0, -0.5, 0.25], device=device)
    module = fused_pref.FusedGRPOLoss(loss_type="grpo", epsilon_high=0.28, temperature=0.7)
    assert "epsilon_high=0.28" in repr(module) and "temperature=0.7" in repr(module)
    out = module(x["hidden"], x["weight"], x["labels"], x["bias"], advantages=advantages)
    expected = grpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], advantages=advantages, loss_type="grpo",
                         epsilon_high=0.28, temperature=0.7)
    assert torch.equal(out.loss, expected.loss)
    with pytest.raises(ValueError, match="^loss_type must be one of"):
        fused_pref.FusedGRPOLoss(loss_type="ppo")


@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
def test_reference_head_equals_its_logps(module, device):
    # ref_hidden (+ ref_weight, ref_bias) is the reference's per-token log-probs under the same options.
    x = make_inputs(3, 9, 40, 257, device=device, seed=7)
    r = make_inputs(3, 9, 56, 257, device=device, seed=8)
    if module is fused_pref.reference:
        x, r = as_reference(x), as_reference(r)
    advantages = torch.tensor([1.0, -0.5, 0.25], device=x["hidden"].device, dtype=x["hidden"].dtype)
    options = dict(temperature=0.8, shift=True)
    head = dict(ref_hidden=r["hidden"].detach(), ref_weight=r["weight"].detach(), ref_bias=r["bias"].detach())
    ref_logps = module.linear_logprobs(*(t.detach() for t in (r["hidden"], r["weight"])), x["labels"],
                                       r["bias"].detach(), **options)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    by_head = module.grpo_loss(*args, advantages=advantages, beta=0.1, loss_type="grpo", **head, **options)
    by_logps = module.grpo_loss(*args, advantages=advantages, beta=0.1, loss_type="grpo", ref_logps=ref_logps,
                                **options)
    assert torch.equal(by_head.loss, by_logps.loss) and by_head.metrics()["kl"] > 0


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(ref_logps="zeros", ref_hidden="h"), "^give the reference model as ref_logps"),
    (dict(ref_weight="w"), "^ref_weight and ref_bias are only used with ref_hidden$"),
    (dict(ref_hidden="h", ref_weight="short"), r"^ref_weight must have the vocabulary size of weight, V = 257"),
])
def test_reference_head_errors(kwargs, pattern, device):
    x = make_inputs(3, 9, 40, 257, device=device, seed=7)
    values = {"zeros": torch.zeros(3, 9, device=device), "h": x["hidden"].detach(), "w": x["weight"].detach(),
              "short": x["weight"].detach()[:200]}
    with pytest.raises(ValueError, match=pattern):
        grpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], advantages=torch.ones(3, device=device), beta=0.1,
                  **{k: values[v] for k, v in kwargs.items()})


@pytest.mark.parametrize("fn", [grpo_loss, reference_grpo_loss], ids=["fused", "reference"])
def test_reference_head_reads_only_checked_labels(fn, device):
    # The policy's pass checks the labels before the reference head's unchecked pass reads them: a
    # label past V gets the range error, not the reference pass's out-of-bounds gather.
    x = make_inputs(3, 9, 40, 257, device=device, seed=7)
    labels = x["labels"].clone()
    labels[1, 4] = 257
    with pytest.raises(ValueError, match=r"^labels must be in \[0, 257\)"):
        fn(x["hidden"], x["weight"], labels, x["bias"], advantages=torch.ones(3, device=device), beta=0.1,
           ref_hidden=x["hidden"].detach())
