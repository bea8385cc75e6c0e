"""GRPO's loss as TRL 1.16's ``GRPOTrainer._compute_loss`` defines it, every ``loss_type``, over
``hidden @ weight.T`` without the ``[tokens, vocab]`` logits.

The vocabulary work is one call of :func:`fused_pref.linear_logprobs`: per-token log-probs and, from the
same pass, entropies, both differentiable.  Everything GRPO adds is O(tokens) PyTorch on those, written
once in :func:`grpo_from_logprobs` and shared by :func:`grpo_loss` and its plain-PyTorch twin
:func:`reference_grpo_loss`, which differ only in how the log-probs are computed.  Autograd hands
``dLoss/dlogp`` (and ``dLoss/dentropy`` for the entropy bonus) to the fused backward, the same weighted
cross-entropy backward as every other loss (DESIGN.md section 1).

Read against TRL 1.16.0 (``trl/trainer/grpo_trainer.py``: ``_compute_loss``, ``get_gamma_weights``,
``get_off_policy_mask``, ``get_high_entropy_mask``; ``grpo_config.py``) and Liger-Kernel 0.8.5
(``chunked_loss/grpo_loss.py``, ``fused_linear_ppo.py``).
"""

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import functional, reference, validation
from .functional import _public
from .options import Options, takes_options
from .outputs import pytree_output
from .segments import sequence_sums, shift_labels

# TRL 1.16's GRPOConfig.loss_type values.
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# The loss types built on PPO's clipped surrogate; they differ only in how the tokens are averaged.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# VESPO's bounds on a sequence's log importance weight, TRL's get_gamma_weights: w in [1e-8, e^20].
_VESPO_LOG_W_MIN, _VESPO_LOG_W_MAX = math.log(1e-8), 20.0


def _check_number(name, value, ok, expected):
    # ``ok`` is written so that NaN fails it (every comparison with NaN is False).
    if not validation.is_number(value) or not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class GRPOSpec:
    """The hyper-parameters of a GRPO loss, checked when made; see :func:`grpo_loss` for each."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True
    max_completion_length: int | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0

    def __post_init__(self):
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        finite = (lambda v: -math.inf < v < math.inf, "a finite number")
        non_negative = (lambda v: 0 <= v < math.inf, "a finite number >= 0")
        positive = (lambda v: 0 < v < math.inf, "a finite number > 0")
        _check_number("beta", self.beta, *non_negative)
        # 1 - epsilon_low is the lower clip of the ratio, which is positive: epsilon_low <= 1.
        _check_number("epsilon_low", self.epsilon_low, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _check_number("epsilon_high", self.epsilon_high, *non_negative)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            _check_number(name, getattr(self, name), *positive)   # 4 / tau: tau = 0 divides by zero
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
            _check_number(name, getattr(self, name), *finite)
        if self.delta is not None:
            _check_number("delta", self.delta, *positive)
        if self.off_policy_mask_threshold is not None:
            _check_number("off_policy_mask_threshold", self.off_policy_mask_threshold, *finite)
        _check_number("top_entropy_quantile", self.top_entropy_quantile, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        validation.check_flag("use_bias_correction_kl", self.use_bias_correction_kl)
        validation.check_positive_int("max_completion_length", self.max_completion_length, allow_none=True)
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' divides by B * max_completion_length: give max_completion_length "
                             "(TRL's GRPOConfig.max_completion_length, 512 by default there)")


def grpo_spec(*, epsilon_low=0.2, epsilon_high=None, **hyper) -> GRPOSpec:
    """The checked spec of :func:`grpo_loss`'s hyper-parameters (``epsilon_high=None``: ``epsilon_low``)."""
    return GRPOSpec(epsilon_low=epsilon_low, epsilon_high=epsilon_low if epsilon_high is None else epsilon_high,
                    **hyper)


def module_spec(*, options: Options, **hyper) -> GRPOSpec:
    """What ``FusedGRPOLoss`` checks when built, as :func:`grpo_loss` does per call: the spec, and
    the option it cannot run (``backward="in_forward"``: its gradient needs the whole batch)."""
    validation.check_gradient_in_forward(options, None, None)
    return grpo_spec(**hyper)


# The keywords of grpo_loss (and its twin) that make its spec, and those that are the call's tensors.
HYPERPARAMETERS = tuple(f.name for f in dataclasses.fields(GRPOSpec))
_TENSORS = ("advantages", "old_logps", "ref_logps", "importance_sampling_ratio", "sampling_logps",
            "num_items_in_batch", "ref_hidden", "ref_weight", "ref_bias")


def _arguments(arguments: dict) -> tuple[GRPOSpec, dict]:
    """The spec and the per-call tensors from a public function's arguments (its ``locals()``)."""
    return (grpo_spec(**{name: arguments[name] for name in HYPERPARAMETERS}),
            {name: arguments[name] for name in _TENSORS})


@pytree_output
@dataclass
class GRPOOutput:
    """What :func:`grpo_loss` returns.

    ``loss``: the differentiable scalar.  ``logps``: the per-token log-probs (detached, fp32 (fp64 from
    an fp64 reference), shape of ``labels``, 0 where ignored), TRL's ``per_token_logps``: the next
    iteration's ``old_logps``.
    ``entropy``: the per-token entropies alike (None only from :func:`grpo_from_logprobs` given
    none).  ``stats``: 0-d detached tensors under the names TRL logs: ``entropy``, ``kl`` (beta != 0),
    ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``clip_ratio/low_min``,
    ``clip_ratio/high_max`` (the clipped loss types), ``cispo_clip_ratio``, ``vespo/phi_seq_mean``,
    ``policy_loss`` (the loss before the entropy bonus, when ``entropy_coef != 0``).
    """

    loss: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor | None
    stats: dict[str, torch.Tensor]

    def metrics(self) -> dict[str, float]:
        """``stats`` as floats (one host sync)."""
        if not self.stats:
            return {}
        numbers = torch.stack([value.float() for value in self.stats.values()]).tolist()
        return dict(zip(self.stats, numbers))


class _Sequences:
    """Per-sequence sums of per-token values, and per-sequence values spread back over the tokens, for
    the padded ``[B, T]`` and the packed ``[N]`` (``cu_seqlens``) layout alike."""

    def __init__(self, valid, cu_seqlens):
        self.cu_seqlens = cu_seqlens
        if cu_seqlens is not None:
            tokens = torch.arange(valid.numel(), device=valid.device)
            # Sequence r holds tokens cu[r] <= i < cu[r + 1]: its index is the number of ends <= i.
            self.owner = torch.bucketize(tokens, cu_seqlens[1:].to(tokens.dtype), right=True)

    def sum(self, values):
        return sequence_sums(values, self.cu_seqlens)

    def spread(self, per_sequence):
        """``[B]`` -> broadcastable against the tokens' shape."""
        return per_sequence.unsqueeze(-1) if self.cu_seqlens is None else per_sequence[self.owner]


def _vespo_weights(log_ratio, mask, advantages, log_is_ratio, spec: GRPOSpec, sequences: _Sequences):
    """VESPO's per-sequence gamma weight (TRL's ``get_gamma_weights``), a constant scale (no gradient):
    ``phi(w) = exp(lambda + k log w - lambda w)``, 1 at ``w = 1``, with ``w`` the product of the
    sequence's token ratios (times the sampler correction)."""
    with torch.no_grad():
        log_w = sequences.sum(log_ratio.clamp(-20.0, 20.0) * mask)
        if log_is_ratio is not None:
            log_w = log_w + log_is_ratio
        log_w = log_w.clamp(_VESPO_LOG_W_MIN, _VESPO_LOG_W_MAX)
        non_negative = advantages >= 0
        k = torch.where(non_negative, advantages.new_tensor(spec.vespo_k_pos), spec.vespo_k_neg)
        # TRL floors lambda at 1e-4 instead of refusing lambda <= 0.
        lam = torch.where(non_negative, advantages.new_tensor(spec.vespo_lambda_pos), spec.vespo_lambda_neg)
        lam = lam.clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def _nan_extreme(values, largest: bool):
    """TRL's ``nanmax`` / ``nanmin``: the extreme of the non-NaN entries, NaN when all are NaN."""
    missing = torch.isnan(values)
    filled = torch.where(missing, -math.inf if largest else math.inf, values)
    return torch.where(missing.all(), math.nan, filled.max() if largest else filled.min())


def _policy_losses(spec: GRPOSpec, logp, coef, advantages, sequences: _Sequences, per_sequence, phi):
    """Each loss type's per-token policy loss (before the masks, the sampler correction and the KL term),
    and the clipping flags TRL counts for it, at the ratio's level: per token, or with ``per_sequence``
    per sequence (``coef`` ``[B]``).  ``phi``: VESPO's weights ``[B]``, else None."""
    unit_advantages = advantages if per_sequence else sequences.spread(advantages)

    def widen(values):
        return sequences.spread(values) if per_sequence else values

    if spec.loss_type == "cispo":
        # MiniMax-M1: the clipped ratio is a constant weight on the policy gradient A dlogp.
        losses = -widen(coef.clamp(max=spec.epsilon_high).detach()) * sequences.spread(advantages) * logp
        return losses, {"cispo_clip_ratio": (coef > spec.epsilon_high) & (unit_advantages > 0)}
    if spec.loss_type in CLIPPED_LOSS_TYPES:
        clipped_coef = coef.clamp(1 - spec.epsilon_low, 1 + spec.epsilon_high)
        if spec.delta is not None:
            coef = coef.clamp(max=spec.delta)                   # INTELLECT-2's two-sided clipping
        losses = widen(-torch.minimum(coef * unit_advantages, clipped_coef * unit_advantages))
        # Counted on the ratio after delta's clamp, as TRL counts them.
        low = (coef < 1 - spec.epsilon_low) & (unit_advantages < 0)
        high = (coef > 1 + spec.epsilon_high) & (unit_advantages > 0)
        return losses, {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}
    if spec.loss_type == "sapo":
        tau = torch.where(unit_advantages > 0, unit_advantages.new_tensor(spec.sapo_temperature_pos),
                          spec.sapo_temperature_neg)
        # A sigmoid gate instead of the clip: slope 1 at r = 1, fading off-policy.
        return widen(-torch.sigmoid(tau * (coef - 1)) * (4 / tau) * unit_advantages), {}
    return -sequences.spread(phi * advantages) * logp, {}     # vespo


def _reduce(spec: GRPOSpec, masked, sequences: _Sequences, counts, n_valid, num_items_in_batch):
    """The loss type's average of the masked per-token losses."""
    if spec.loss_type in ("grpo", "sapo"):
        return (sequences.sum(masked) / counts.clamp(min=1)).mean()
    if spec.loss_type == "bnpo":
        return masked.sum() / n_valid.clamp(min=1)
    if spec.loss_type == "dr_grpo":
        return masked.sum() / (counts.shape[0] * spec.max_completion_length)
    if spec.loss_type == "luspo":
        return sequences.sum(masked).mean()                   # each sequence weighed by its length
    # dapo, cispo, vespo
    if num_items_in_batch is None:
        return masked.sum() / n_valid.to(masked.dtype).clamp(min=1)
    # Given as TRL computes it, a divisor that may be below 1 (its count clamped at 1, then divided by
    # the processes): kept.  0 (no completion token counts) leaves nothing to divide: the sum is 0 too.
    items = torch.as_tensor(num_items_in_batch, device=masked.device).to(masked.dtype).reshape(())
    return masked.sum() / torch.where(items == 0, 1, items)     # a NaN stays a NaN


def grpo_from_logprobs(logp, entropy, valid, advantages, spec: GRPOSpec, *, old_logps=None, ref_logps=None,
                       importance_sampling_ratio=None, sampling_logps=None, num_items_in_batch=None,
                       cu_seqlens=None) -> GRPOOutput:
    """GRPO's loss from per-token log-probs: the math of :func:`grpo_loss`, shared by its fused path
    and its reference.

    ``logp`` (differentiable, 0 where not ``valid``) and ``entropy`` (differentiable; may be None when
    neither the bonus nor the entropy mask needs it) have the shape of the labels, ``[B, T]``, or
    ``[N]`` with ``cu_seqlens``; ``valid`` is the completion mask.  The other arguments are
    :func:`grpo_loss`'s, already checked.  The math runs in ``logp``'s dtype (fp32, or fp64 for an fp64
    reference).
    """
    dtype = logp.dtype
    sequences = _Sequences(valid, cu_seqlens)
    mask = valid.to(dtype)
    counts = sequences.sum(mask)              # completion length of each sequence, [B]
    n_valid = mask.sum()
    advantages = advantages.detach().to(dtype)

    def given(values, fill=0.0):
        # Inputs count at completion tokens only; elsewhere a fixed value, so that padding holding
        # anything (even inf) gives neither a NaN loss nor a NaN gradient.
        return torch.where(valid, values.detach().to(dtype), fill)

    old = logp.detach() if old_logps is None else given(old_logps)
    log_ratio = logp - old
    per_sequence = spec.importance_sampling_level == "sequence"
    # GSPO's sequence level: one ratio per sequence, the exp of its mean token log-ratio, [B].
    coef = torch.exp(sequences.sum(log_ratio * mask) / counts.clamp(min=1) if per_sequence else log_ratio)
    coef_tokens = sequences.spread(coef) if per_sequence else coef

    kl = None
    if spec.beta != 0:
        log_ref_ratio = given(ref_logps) - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1       # k3, >= 0, unbiased for KL(pi || ref)
        if spec.use_bias_correction_kl:
            kl = kl * coef_tokens                               # DeepSeek-V3.2; before delta's clamp

    ratio_tokens, log_is_ratio = None, None
    if importance_sampling_ratio is not None:
        if importance_sampling_ratio.shape == valid.shape:
            ratio_tokens = given(importance_sampling_ratio, 1.0)
            log_is = torch.log(ratio_tokens).clamp(_VESPO_LOG_W_MIN, _VESPO_LOG_W_MAX)
            log_is_ratio = sequences.sum(log_is)
        else:
            ratio = importance_sampling_ratio.detach().to(dtype)
            ratio_tokens = sequences.spread(ratio)
            log_is_ratio = torch.log(ratio).clamp(_VESPO_LOG_W_MIN, _VESPO_LOG_W_MAX)

    stats = {}
    phi = None
    if spec.loss_type == "vespo":
        phi = _vespo_weights(log_ratio, mask, advantages, log_is_ratio, spec, sequences)
        stats["vespo/phi_seq_mean"] = phi.mean()
    token_loss, clip_flags = _policy_losses(spec, logp, coef, advantages, sequences, per_sequence, phi)

    if spec.off_policy_mask_threshold is not None:
        # DeepSeek-V3.2: drop a negative-advantage sequence whose sampler has drifted from the policy by
        # more than the threshold (mean KL(sampler || policy) estimate over its tokens).
        behaviour = old if sampling_logps is None else given(sampling_logps)
        drift = torch.nan_to_num(behaviour - logp.detach(), nan=0.0)   # NaN: a token the sampler did not score
        mean_drift = sequences.sum(drift * mask) / counts.clamp(min=1)
        keep = (advantages >= 0) | (mean_drift <= spec.off_policy_mask_threshold)
        token_loss = token_loss * sequences.spread(keep.to(dtype))
    entropy_mask = None
    if spec.top_entropy_quantile < 1.0:
        # "Beyond the 80/20 rule": only the top-rho tokens by entropy carry the policy gradient.
        spread_entropy = torch.where(valid, entropy.detach().to(dtype), math.nan).reshape(-1)
        threshold = torch.nanquantile(spread_entropy, 1 - spec.top_entropy_quantile)
        entropy_mask = ((entropy.detach() >= threshold) & valid).to(dtype)
        token_loss = token_loss * entropy_mask
    if ratio_tokens is not None and spec.loss_type != "vespo":    # VESPO folded it into phi
        token_loss = token_loss * ratio_tokens
    if kl is not None:
        token_loss = token_loss + spec.beta * kl

    loss = _reduce(spec, token_loss * mask, sequences, counts, n_valid, num_items_in_batch)
    if spec.entropy_coef != 0:
        stats["policy_loss"] = loss
        acting = mask if entropy_mask is None else entropy_mask
        loss = loss - spec.entropy_coef * (entropy.to(dtype) * acting).sum() / acting.sum().clamp(min=1)

    def token_mean(values):
        return (values.to(dtype) * mask).sum() / n_valid.clamp(min=1)

    if kl is not None:
        stats["kl"] = token_mean(kl)
    if entropy is not None:
        stats["entropy"] = token_mean(entropy)
    # TRL averages a per-sequence flag over sequences, a per-token one over completion tokens.
    stats.update({name: flags.to(dtype).mean() if per_sequence else token_mean(flags)
                  for name, flags in clip_flags.items()})
    if spec.loss_type in CLIPPED_LOSS_TYPES:
        def per_sequence_mean(flags):
            # NaN for a sequence without completion tokens, which nanmin / nanmax then skip.
            return flags.to(dtype) if per_sequence else sequences.sum(flags.to(dtype) * mask) / counts
        low, high = clip_flags["clip_ratio/low_mean"], clip_flags["clip_ratio/high_mean"]
        stats["clip_ratio/low_min"] = _nan_extreme(per_sequence_mean(low), largest=False)
        stats["clip_ratio/high_max"] = _nan_extreme(per_sequence_mean(high), largest=True)
    return GRPOOutput(loss, logp.detach(), None if entropy is None else entropy.detach(),
                      {name: value.detach() for name, value in stats.items()})


def _check_per_token(name, value, labels):
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor or None, got "
                        f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    if value.shape != labels.shape:
        raise ValueError(f"{name} must have the shape of labels {tuple(labels.shape)}, got {tuple(value.shape)}")
    if value.device != labels.device:
        raise ValueError(f"{name} is on {value.device}, labels on {labels.device}")


def _check_inputs(labels, num_sequences, spec: GRPOSpec, *, advantages, old_logps, ref_logps,
                  importance_sampling_ratio, sampling_logps, num_items_in_batch, reference_head=False):
    """The GRPO tensors against the labels (the projection inputs are checked by linear_logprobs);
    ``reference_head``: whether the reference model's log-probs will come from its head."""
    if not isinstance(advantages, torch.Tensor) or not advantages.dtype.is_floating_point:
        raise TypeError("advantages must be a floating-point torch.Tensor [B], got "
                        f"{advantages.dtype if isinstance(advantages, torch.Tensor) else type(advantages).__name__}")
    if tuple(advantages.shape) != (num_sequences,):
        raise ValueError(f"advantages must be [B] = [{num_sequences}] (one per sequence), got "
                         f"{tuple(advantages.shape)}")
    if advantages.device != labels.device:
        raise ValueError(f"advantages is on {advantages.device}, labels on {labels.device}")
    for name, value in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps)):
        _check_per_token(name, value, labels)
    if spec.beta != 0 and ref_logps is None and not reference_head:
        raise ValueError(f"beta={spec.beta!r} weighs the KL to the reference model: give ref_logps (its per-token "
                         "log-probs, shape of labels) or ref_hidden (and ref_weight), or set beta=0")
    ratio = importance_sampling_ratio
    if ratio is not None:
        if not isinstance(ratio, torch.Tensor) or not ratio.dtype.is_floating_point:
            raise TypeError("importance_sampling_ratio must be a floating-point torch.Tensor or None, got "
                            f"{ratio.dtype if isinstance(ratio, torch.Tensor) else type(ratio).__name__}")
        if ratio.shape != labels.shape and tuple(ratio.shape) != (num_sequences,):
            raise ValueError(f"importance_sampling_ratio must have the shape of labels {tuple(labels.shape)} (per "
                             f"token) or [B] = [{num_sequences}] (per sequence), got {tuple(ratio.shape)}")
        if ratio.device != labels.device:
            raise ValueError(f"importance_sampling_ratio is on {ratio.device}, labels on {labels.device}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must hold one number, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
        else:
            _check_number("num_items_in_batch", num_items_in_batch, lambda v: 0 <= v < math.inf,
                          "a finite number >= 0, a one-element tensor or None")


def _reference_head(hidden, weight, labels, bias, options: Options, spec: GRPOSpec, *, ref_logps, ref_hidden,
                    ref_weight, ref_bias):
    """The reference head ``(ref_hidden, ref_weight, ref_bias)`` to compute the reference model's
    per-token log-probs from (``ref_weight`` / ``ref_bias`` default to the policy's), checked and
    detached; None where they come as ``ref_logps`` or ``beta`` is 0, which reads no reference."""
    if ref_hidden is None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight and ref_bias are only used with ref_hidden")
        return None
    if ref_logps is not None:
        raise ValueError("give the reference model as ref_logps (per-token log-probs) or as ref_hidden, not both")
    if ref_weight is None:
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
    validation.check_tensors(ref_hidden, ref_weight, labels, ref_bias, dtypes=validation.REFERENCE_DTYPES,
                             sequence_level=True, packed=hidden.dim() == 2, name="ref_hidden",
                             sharded=options.process_group is not None)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have the vocabulary size of weight, V = {weight.shape[0]}, got shape "
                         f"{tuple(ref_weight.shape)}")
    if spec.beta == 0:
        return None
    return ref_hidden, ref_weight.detach(), None if ref_bias is None else ref_bias.detach()


def _grpo(logprobs, hidden, weight, labels, bias, spec: GRPOSpec, options: Options, *, ref_hidden, ref_weight,
          ref_bias, **tensors) -> GRPOOutput:
    """The body of :func:`grpo_loss` and its twin: ``logprobs`` is the path's ``linear_logprobs``."""
    # Both paths' dtypes here; the fused linear_logprobs refuses fp64 itself.
    num_sequences = validation.check_call(hidden, weight, labels, bias, options, sequence_level=True,
                                          dtypes=validation.REFERENCE_DTYPES)
    reference_head = _reference_head(hidden, weight, labels, bias, options, spec, ref_logps=tensors["ref_logps"],
                                     ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    _check_inputs(labels, num_sequences, spec, reference_head=reference_head is not None, **tensors)
    # The policy's pass first: it checks the labels (and, vocabulary-parallel, every rank's shard)
    # that the reference head's pass then reads unchecked.  The entropy comes from the same pass
    # (the `entropy` metric, the bonus, the entropy mask).
    out = logprobs.with_options(hidden, weight, labels, bias, return_entropy=True, options=options)
    logp, entropy = out.logp, out.entropy
    if reference_head is not None:
        with torch.no_grad():
            tensors["ref_logps"] = logprobs.with_options(*reference_head[:2], labels, reference_head[2],
                                                         options=dataclasses.replace(options, validate=False))
    targets = shift_labels(labels, options.ignore_index, options.cu_seqlens) if options.shift else labels
    return grpo_from_logprobs(logp, entropy, targets != options.ignore_index, spec=spec,
                              cu_seqlens=options.cu_seqlens, **tensors)


@takes_options
def reference_grpo_loss(hidden, weight, labels, bias=None, *, advantages, old_logps=None, ref_logps=None,
                        ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.0,
                        loss_type="dapo", epsilon_low=0.2, epsilon_high=None, delta=None,
                        importance_sampling_level="token", use_bias_correction_kl=True, max_completion_length=None,
                        num_items_in_batch=None, importance_sampling_ratio=None, sapo_temperature_pos=1.0,
                        sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                        vespo_lambda_neg=2.0, off_policy_mask_threshold=None, sampling_logps=None,
                        top_entropy_quantile=1.0, entropy_coef=0.0, options) -> GRPOOutput:
    """Reference of :func:`grpo_loss`: the same math on :func:`fused_pref.reference.linear_logprobs`."""
    spec, tensors = _arguments(locals())
    return _grpo(reference.linear_logprobs, hidden, weight, labels, bias, spec, options, **tensors)


@_public(reference_grpo_loss)
def grpo_loss(hidden, weight, labels, bias=None, *, advantages, old_logps=None, ref_logps=None, ref_hidden=None,
              ref_weight=None, ref_bias=None, beta=0.0,
              loss_type="dapo", epsilon_low=0.2, epsilon_high=None, delta=None, importance_sampling_level="token",
              use_bias_correction_kl=True, max_completion_length=None, num_items_in_batch=None,
              importance_sampling_ratio=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
              vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, off_policy_mask_threshold=None,
              sampling_logps=None, top_entropy_quantile=1.0, entropy_coef=0.0, options) -> GRPOOutput:
    """GRPO's policy loss (Shao et al., 2024) as TRL 1.16's ``GRPOTrainer`` computes it, every ``loss_type``.

    ``hidden`` ``[B, T, D]`` with completion ``labels`` ``[B, T]`` (prompt and padding ``ignore_index``:
    the labels are the completion mask), or packed ``[N, D]`` / ``[N]`` with ``cu_seqlens`` ``[B + 1]``;
    ``advantages`` ``[B]``; ``old_logps``, ``ref_logps``, ``sampling_logps`` fp tensors of the shape of
    ``labels`` (read at completion tokens only).  The reference model enters as ``ref_logps``, or as a
    reference head, as in :func:`fused_pref.dpo_loss`: ``ref_hidden`` (``hidden``'s layout, any ``D``)
    with ``ref_weight`` / ``ref_bias`` (default the policy's), scored without grad under the same
    options (``temperature`` included).  With ``logp`` the per-token log-probs of the labels
    (under ``temperature``, ``softcap``, ``shift`` ... as :func:`fused_pref.linear_logprobs`), ``m`` the
    mask, ``n_b`` the completion length of sequence ``b``, ``A`` its advantage and ``sg`` stop-gradient::

        r   = exp(logp - old)                          importance_sampling_level="token"
        r_b = exp(sum_t m (logp - old) / max(n_b, 1))  "sequence" (GSPO): one ratio per sequence
        old = sg(logp) when old_logps is None          (on-policy: r = 1)

    ==================================  =========================================================================
    grpo, bnpo, dr_grpo, dapo, luspo    ``l = -min(min(r, delta) A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A)``
    cispo                               ``l = -sg(min(r, epsilon_high)) A logp``
    sapo                                ``l = -(4 / tau) sigmoid(tau (r - 1)) A``, ``tau = sapo_temperature_pos``
                                        if ``A > 0`` else ``sapo_temperature_neg``
    vespo                               ``l = -sg(phi_b) A logp``, ``phi_b = exp(lam + k log w - lam w)``,
                                        ``log w = clamp(sum_t m clamp(logp - old, -20, 20) + log IS, log 1e-8,
                                        20)``, ``(k, lam) = vespo_k/lambda_pos`` if ``A >= 0`` else ``_neg``
    ==================================  =========================================================================

    then ``l`` times the off-policy mask, the entropy mask and ``importance_sampling_ratio`` (not
    vespo, which folds it into ``w``), plus ``beta * kl``, ``kl = exp(ref - logp) - (ref - logp) - 1``
    (times ``r`` before ``delta`` when ``use_bias_correction_kl``, TRL's default).  Averaged:

    ==================  =====================================================================================
    grpo, sapo          ``mean_b sum_t m l / max(n_b, 1)``
    bnpo                ``sum m l / max(sum m, 1)``
    dr_grpo             ``sum m l / (B * max_completion_length)`` (required)
    dapo, cispo, vespo  ``sum m l / num_items_in_batch`` (default ``max(sum m, 1)``)
    luspo               ``mean_b sum_t m l`` (each sequence weighed by its length)
    ==================  =====================================================================================

    and ``loss = that - entropy_coef * (mean entropy over the acting tokens)``.

    Defaults are TRL's: ``loss_type="dapo"``, ``beta=0.0`` (a reference required otherwise, and not
    read at 0), ``epsilon_low=0.2`` (TRL's ``epsilon``), ``epsilon_high=None`` (= ``epsilon_low``;
    cispo's ratio cap), ``delta=None`` (off), ``use_bias_correction_kl=True``, SAPO's ``1.0`` / ``1.05``,
    VESPO's ``k = 2, lambda = 3`` (``A >= 0``) and ``k = 3, lambda = 2``.  Hyper-parameters a loss type does
    not use are ignored, as in TRL's config.

    Per-process state, TRL's single-process values by default: ``num_items_in_batch`` is dapo / cispo /
    vespo's divisor as given (below 1 too; 0, for a batch without completion tokens, gives a loss of
    0), default this call's completion tokens; TRL divides by ``max(num_items_in_batch, 1) /
    num_processes * gradient_accumulation_steps / steps_per_generation``, so pass that to reproduce a
    distributed run.  ``top_entropy_quantile < 1`` keeps that fraction of this call's completion
    tokens, those of highest entropy (at or above its ``1 - top_entropy_quantile`` quantile; TRL
    gathers every process's first).  TRL's
    division by the gradient-accumulation steps of grpo, bnpo, dr_grpo, luspo and sapo is left to the
    caller.  ``importance_sampling_ratio``: the sampler correction (TRL's vLLM ``importance_sampling_ratio``,
    per token or ``[B]``).  ``off_policy_mask_threshold``: drop sequences with ``A < 0`` whose mean
    ``sampling_logps - logp`` (``sampling_logps`` default ``old``) exceeds it (DeepSeek-V3.2).

    Returns a :class:`GRPOOutput`; ``.metrics()`` gives TRL's logged names.

    >>> out = fused_pref.grpo_loss(h, lm_head.weight, labels, advantages=adv, old_logps=old, loss_type="grpo")
    >>> out.loss.backward()
    """
    spec, tensors = _arguments(locals())
    return _grpo(functional.linear_logprobs, hidden, weight, labels, bias, spec, options, **tensors)
