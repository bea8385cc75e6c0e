"""The plain-PyTorch definition of every public function: logits materialized in fp32 (fp64 for
fp64 inputs), ``log_softmax``, ``gather``, masked sums, and each loss written as TRL writes it.

Slow and memory-hungry by design, and part of the library: it shares each signature with
``fused_pref.functional`` so users can check parity in their own CI.  Shifted and packed layouts
are computed the obvious way, by slicing each sequence.  Every option is accepted and checked as
the fused path checks it; ``backend`` is then ignored (this module always computes in PyTorch), and
so are ``backward``, ``deterministic`` and ``workspace_bytes`` (its backward is PyTorch's autograd).
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from . import arguments, kto, preference, validation
from .distributed import gather_shards, resolve_shard
from .options import Options, takes_options
from .outputs import PreferenceOutput, TokenLogprobs, cross_entropy_output, preference_output
from .segments import reduce_token_losses, reduce_weighted_losses, token_weights


def _logits(hidden, weight, bias, softcap, temperature=1.0):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _whole_vocabulary(weight, bias, options):
    """The whole lm_head: under vocabulary parallelism, every rank's shard gathered in vocabulary
    order (each rank's gradient is its own rows of the replicated gradient)."""
    shard = resolve_shard(weight, options)
    if shard is None:
        return weight, bias
    return gather_shards(weight, shard), gather_shards(bias, shard)


def _spans(labels, cu_seqlens):
    """(start, end) of each sequence in the flattened tokens."""
    if cu_seqlens is None:
        T = labels.shape[-1]
        if labels.dim() != 2:
            return [(0, labels.numel())]
        return [(r * T, (r + 1) * T) for r in range(labels.shape[0])]
    cu = cu_seqlens.tolist()
    # Read here before anything indexes with them (validation's own check comes after the shift).
    validation.check_cu_seqlens_values(cu, labels.numel())
    return list(zip(cu[:-1], cu[1:]))


def _checked(hidden, weight, labels, bias, options, **call):
    """The reference's own checks (fp64 allowed) and the whole vocabulary's ``(weight, bias)``."""
    validation.check_call(hidden, weight, labels, bias, options, dtypes=validation.REFERENCE_DTYPES, **call)
    return _whole_vocabulary(weight, bias, options)


def _targets(labels, options):
    """What each position predicts, shape of ``labels``: the label itself, or with ``shift`` the
    next one of its sequence (``ignore_index`` at each sequence's last position)."""
    flat_labels = labels.reshape(-1)
    targets = torch.full_like(flat_labels, options.ignore_index)
    for start, end in _spans(labels, options.cu_seqlens):
        if options.shift and end - start > 1:
            targets[start:end - 1] = flat_labels[start + 1:end]
        elif not options.shift:
            targets[start:end] = flat_labels[start:end]
    return targets.view(labels.shape)


def _token_logprobs(hidden, weight, labels, bias, options, *, mean_over_sequences=False, token_stats=False):
    """Per-token (logp, valid, sum of logits over the vocabulary), each of the shape of ``labels``:
    with ``shift``, entry t of a sequence is hidden[t]'s prediction of labels[t + 1].  With
    ``token_stats`` also (targets, entropy, argmax): what each position predicts, the softmax's
    entropy (0 where ignored) and its argmax (-1 where ignored)."""
    ignore_index, cu_seqlens = options.ignore_index, options.cu_seqlens
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    targets = _targets(labels, options)
    valid = validation.check_labels(targets, weight.shape[0], ignore_index=ignore_index, validate=options.validate,
                                    mean_over_sequences=mean_over_sequences, cu_seqlens=cu_seqlens).valid
    z = _logits(flat_h, weight, bias, options.softcap, options.temperature).view(*labels.shape, weight.shape[0])
    log_softmax = z.log_softmax(dim=-1)
    picked = log_softmax.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    out = torch.where(valid, picked, 0.0), valid, torch.where(valid, z.sum(dim=-1), 0.0)
    if not token_stats:
        return out
    entropy = -(log_softmax.exp() * log_softmax).sum(dim=-1)
    return *out, targets, torch.where(valid, entropy, 0.0), torch.where(valid, z.argmax(dim=-1), -1)


def _per_sequence(values, labels, cu_seqlens):
    flat = values.reshape(-1)
    return torch.stack([flat[start:end].sum() for start, end in _spans(labels, cu_seqlens)])


@takes_options
def linear_logprobs(hidden, weight, labels, bias=None, *, return_entropy=False, return_token_accuracy=False,
                    return_argmax=False, options):
    """Reference of :func:`fused_pref.linear_logprobs`."""
    weight, bias = _checked(hidden, weight, labels, bias, options)
    flags = {"return_entropy": return_entropy, "return_token_accuracy": return_token_accuracy,
             "return_argmax": return_argmax}
    validation.check_token_stats(flags)
    if not any(flags.values()):
        return _token_logprobs(hidden, weight, labels, bias, options)[0]
    logp, valid, _, targets, entropy, argmax = _token_logprobs(hidden, weight, labels, bias, options,
                                                               token_stats=True)
    return TokenLogprobs(logp, entropy if return_entropy else None,
                         (argmax == targets) & valid if return_token_accuracy else None,
                         argmax if return_argmax else None)


def _sequence_logps(hidden, weight, labels, bias, options, reduction):
    """Per-sequence (log-probs under ``reduction``, summed log-probs, valid counts, sums of logits)."""
    logp, valid, logit_sums = _token_logprobs(hidden, weight, labels, bias, options,
                                              mean_over_sequences=reduction == "mean")
    sums = _per_sequence(logp, labels, options.cu_seqlens)
    counts = _per_sequence(valid.long(), labels, options.cu_seqlens)
    logps = sums / counts.clamp(min=1) if reduction == "mean" else sums
    return logps, sums, counts, _per_sequence(logit_sums, labels, options.cu_seqlens)


@takes_options
def sequence_logprobs(hidden, weight, labels, bias=None, *, reduction="sum", options):
    """Reference of :func:`fused_pref.sequence_logprobs` (``backward`` names the fused path's strategy:
    the same math here, refused where the fused call refuses it)."""
    needs_gradient = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                     for t in (hidden, weight, bias))
    weight, bias = _checked(hidden, weight, labels, bias, options, sequence_level=True, reduction=reduction,
                            kind="sequence", needs_gradient=needs_gradient)
    return _sequence_logps(hidden, weight, labels, bias, options, reduction)[0]


@takes_options
def linear_cross_entropy(hidden, weight, labels, bias=None, *, reduction="mean", ce_weight=None, label_smoothing=0.0,
                         lse_square_scale=0.0, return_z_loss=False, return_token_accuracy=False,
                         return_predicted_tokens=False, options):
    """Reference of :func:`fused_pref.linear_cross_entropy`."""
    arguments.linear_cross_entropy(reduction=reduction, ce_weight=ce_weight, label_smoothing=label_smoothing,
                                   lse_square_scale=lse_square_scale, return_z_loss=return_z_loss,
                                   return_token_accuracy=return_token_accuracy,
                                   return_predicted_tokens=return_predicted_tokens, options=options)
    weight, bias = _checked(hidden, weight, labels, bias, options, reduction=reduction, kind="cross_entropy")
    validation.check_class_weights(ce_weight, weight.shape[0], labels)
    stats = return_token_accuracy or return_predicted_tokens
    logp, valid, _, *more = _token_logprobs(hidden, weight, labels, bias, options, token_stats=stats)
    targets = _targets(labels, options)
    weights = token_weights(valid, targets, ce_weight)
    losses = -logp * weights
    z_terms = None
    if label_smoothing > 0 or lse_square_scale > 0:
        z = _logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias, options.softcap, options.temperature)
        picked = torch.where(valid, targets, 0).reshape(-1)
        if label_smoothing > 0:
            # F.cross_entropy's own smoothing, class weights included (already weighted per token).
            class_weight = None if ce_weight is None else ce_weight.detach().to(z.dtype)
            smoothed = F.cross_entropy(z, picked, weight=class_weight, label_smoothing=label_smoothing,
                                       reduction="none")
            losses = torch.where(valid, smoothed.view(valid.shape), 0.0)
        z_terms = torch.where(valid, lse_square_scale * z.logsumexp(dim=-1).view(valid.shape) ** 2, 0.0)
    loss = reduce_weighted_losses(losses, weights, reduction)
    z_loss = None if z_terms is None else reduce_token_losses(z_terms, valid.to(z_terms.dtype), reduction)
    if z_loss is not None:
        loss = loss + z_loss
    if not (stats or return_z_loss):
        return loss
    if return_z_loss and z_loss is None:
        z_loss = torch.zeros_like(loss)
    argmax = more[2] if stats else None
    return cross_entropy_output(loss, argmax, targets, valid, reduction, token_accuracy=return_token_accuracy,
                                predicted_tokens=return_predicted_tokens,
                                z_loss=z_loss.detach() if return_z_loss else None)


def _pair_losses(spec: preference.PreferenceSpec, chosen, rejected, ref_chosen, ref_rejected):
    """TRL's per-pair losses, term for term (DPOTrainer.dpo_loss, CPOTrainer, ORPOTrainer)."""
    beta, eps = spec.beta, spec.label_smoothing
    logsig = F.logsigmoid
    if spec.head == "odds_ratio":
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        return -beta * logsig(log_odds)
    if ref_chosen is None:
        ref_chosen = ref_rejected = torch.zeros_like(chosen)
    a, b = chosen - ref_chosen, rejected - ref_rejected
    if spec.sort == "aot":
        u = torch.sort(chosen - rejected).values - torch.sort(ref_chosen - ref_rejected).values
    elif spec.sort == "aot_pair":
        u = torch.sort(a).values - torch.sort(b).values
    else:
        u = a - b
    x = beta * u - spec.gamma
    if spec.head == "sigmoid":
        return -logsig(x) * (1 - eps) - logsig(-x) * eps
    if spec.head == "robust":
        return (-logsig(x) * (1 - eps) + logsig(-x) * eps) / (1 - 2 * eps)
    if spec.head == "exo_pair":
        return x.sigmoid() * (logsig(x) - math.log(1 - eps)) + (-x).sigmoid() * (logsig(-x) - math.log(eps))
    if spec.head == "hinge":
        return torch.relu(1 - x)
    if spec.head == "ipo":
        return (u - 1 / (2 * beta)) ** 2
    if spec.head == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if spec.head == "nca_pair":
        return -logsig(beta * a) - 0.5 * logsig(-beta * a) - 0.5 * logsig(-beta * b)
    if spec.head == "bco_pair":
        return -logsig(beta * a) - logsig(-beta * b)
    if spec.head == "apo_zero":
        return (1 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)
    if spec.head == "apo_down":
        return torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * u))
    if spec.head == "discopop":
        modulation = torch.sigmoid(x / spec.tau)
        # TRL writes exp(-x) * modulation, which is inf * 0 = NaN for x below -88 in fp32; the
        # same product as one exponential stays finite.
        return -logsig(x) * (1 - modulation) + torch.exp(logsig(x / spec.tau) - x)
    raise AssertionError(f"no reference for head {spec.head!r}")


def _preference(spec, logps, sums, counts, logit_sums, ref_logps, vocab_size, stats=None) -> PreferenceOutput:
    B = logps.shape[0] // 2
    ref_chosen, ref_rejected = (None, None) if ref_logps is None else (ref_logps[:B], ref_logps[B:])
    loss = _pair_losses(spec, logps[:B], logps[B:], ref_chosen, ref_rejected).mean()
    nll = None
    if spec.sft_weight:
        nll = -sums[:B].sum() / counts[:B].sum().clamp(min=1)
        loss = loss + spec.sft_weight * nll
    rewards = spec.beta * (logps - (0.0 if ref_logps is None else ref_logps))
    extra = preference.odds_ratio_metrics(logps[:B].detach(), logps[B:].detach()) if spec.head == "odds_ratio" else None
    return preference_output(loss, logps, rewards, logit_sums, counts, vocab_size, nll_loss=nll, extra=extra,
                             **(stats or {}))


def _token_metrics(hidden, weight, labels, bias, options, token_metrics):
    """Per-sequence sums of the entropy and counts of argmax hits (``preference_output``'s), or None
    (``token_metrics`` checked by the caller, ``fused_pref.arguments``)."""
    if not token_metrics:
        return None
    _, valid, _, targets, entropy, argmax = _token_logprobs(hidden, weight, labels, bias, options, token_stats=True)
    return dict(entropy_sums=_per_sequence(entropy, labels, options.cu_seqlens),
                correct_counts=_per_sequence(((argmax == targets) & valid).long(), labels, options.cu_seqlens))


def _reference_free(spec, hidden, weight, labels, bias, options: Options, token_metrics) -> PreferenceOutput:
    weight, bias = _checked(hidden, weight, labels, bias, options, sequence_level=True, pairs=True)
    stats = _token_metrics(hidden, weight, labels, bias, options, token_metrics)
    logps, sums, counts, logit_sums = _sequence_logps(hidden, weight, labels, bias, options, spec.reduction)
    return _preference(spec, logps, sums, counts, logit_sums, None, weight.shape[0], stats)


@takes_options
def simpo_loss(hidden, weight, labels, bias=None, *, beta=2.0, gamma=1.0, label_smoothing=0.0, sft_weight=0.0,
               token_metrics=False, options) -> PreferenceOutput:
    """Reference of :func:`fused_pref.simpo_loss`."""
    spec = arguments.simpo_loss(beta=beta, gamma=gamma, label_smoothing=label_smoothing, sft_weight=sft_weight,
                                token_metrics=token_metrics, options=options)
    return _reference_free(spec, hidden, weight, labels, bias, options, token_metrics)


@takes_options
def cpo_loss(hidden, weight, labels, bias=None, *, beta=0.1, label_smoothing=0.0, sft_weight=1.0,
             token_metrics=False, options) -> PreferenceOutput:
    """Reference of :func:`fused_pref.cpo_loss`."""
    spec = arguments.cpo_loss(beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight,
                              token_metrics=token_metrics, options=options)
    return _reference_free(spec, hidden, weight, labels, bias, options, token_metrics)


@takes_options
def orpo_loss(hidden, weight, labels, bias=None, *, beta=0.1, token_metrics=False, options) -> PreferenceOutput:
    """Reference of :func:`fused_pref.orpo_loss`."""
    spec = arguments.orpo_loss(beta=beta, token_metrics=token_metrics, options=options)
    return _reference_free(spec, hidden, weight, labels, bias, options, token_metrics)


@takes_options
def dpo_loss(hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_weight=0.0, length_normalize=None,
             discopop_tau=0.05, token_metrics=False, options) -> PreferenceOutput:
    """Reference of :func:`fused_pref.dpo_loss`."""
    spec = arguments.dpo_loss(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, sft_weight=sft_weight,
                              length_normalize=length_normalize, discopop_tau=discopop_tau,
                              token_metrics=token_metrics, options=options)
    whole_weight, whole_bias = _checked(hidden, weight, labels, bias, options, sequence_level=True, pairs=True)
    num_sequences = labels.shape[0] if options.cu_seqlens is None else options.cu_seqlens.numel() - 1
    ref_weight, ref_bias = validation.check_dpo_reference(
        hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
        ref_bias=ref_bias, num_sequences=num_sequences, dtypes=validation.REFERENCE_DTYPES,
        sharded=options.process_group is not None)
    if ref_weight is not None:
        ref_weight, ref_bias = _whole_vocabulary(ref_weight, ref_bias, options)
    stats = _token_metrics(hidden, whole_weight, labels, whole_bias, options, token_metrics)
    logps, sums, counts, logit_sums = _sequence_logps(hidden, whole_weight, labels, whole_bias, options,
                                                      spec.reduction)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = _sequence_logps(ref_hidden, ref_weight, labels, ref_bias, replace(options, validate=False),
                                        spec.reduction)[0]
    return _preference(spec, logps, sums, counts, logit_sums, ref_logps.detach().to(logps.dtype),
                       whole_weight.shape[0], stats)


@takes_options
def kto_loss(hidden, weight, labels, bias=None, *, desirable, ref_logps=None, ref_hidden=None, ref_weight=None,
             ref_bias=None, kl=None, beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
             token_metrics=False, options) -> kto.KTOOutput:
    """Reference of :func:`fused_pref.kto_loss`."""
    spec = arguments.kto_loss(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                              undesirable_weight=undesirable_weight, token_metrics=token_metrics, options=options)
    whole_weight, whole_bias = _checked(hidden, weight, labels, bias, options, sequence_level=True)
    num_sequences = labels.shape[0] if options.cu_seqlens is None else options.cu_seqlens.numel() - 1
    kto.check_unpaired(desirable, kl, num_sequences, hidden.device, spec)
    ref_weight, ref_bias = validation.check_dpo_reference(
        hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
        ref_bias=ref_bias, num_sequences=num_sequences, dtypes=validation.REFERENCE_DTYPES, loss="kto_loss", rows="R",
        sharded=options.process_group is not None)
    if ref_weight is not None:
        ref_weight, ref_bias = _whole_vocabulary(ref_weight, ref_bias, options)
    stats = _token_metrics(hidden, whole_weight, labels, whole_bias, options, token_metrics)
    logps, _, counts, logit_sums = _sequence_logps(hidden, whole_weight, labels, whole_bias, options, "sum")
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = _sequence_logps(ref_hidden, ref_weight, labels, ref_bias, replace(options, validate=False),
                                        "sum")[0]
    ref_logps = ref_logps.detach().to(logps.dtype)
    loss = kto.kto_losses(logps, ref_logps, desirable, kl, spec).mean()
    return kto.kto_output(loss, logps, ref_logps, desirable, kl, logit_sums, counts, whole_weight.shape[0], spec,
                          None if stats is None else stats["entropy_sums"])


# GRPO's twin lives beside its fused path in grpo.py, which imports this module: imported last.
from .grpo import reference_grpo_loss as grpo_loss  # noqa: E402, F401  (a re-export)
