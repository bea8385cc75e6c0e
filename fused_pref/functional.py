"""The public functions.  Each validates its inputs, picks the path (Triton or reference) and, on the
Triton path, never materializes the ``[tokens, vocab]`` logits, forward or backward.

Every function also takes the keywords of :class:`fused_pref.options.Options` (``ignore_index``,
``softcap``, ``temperature``, ``shift``, ``cu_seqlens``, ``process_group``, ``vocab_start``,
``backward``, ``plan``, ``deterministic``, ``workspace_bytes``, ``validate``, ``backend``), checked
once into one object; its hyper-parameters' checks that need no tensor are in
:mod:`fused_pref.arguments`.

Device policy (``backend="auto"``): CUDA tensors take the Triton kernels; CPU tensors take them when
``TRITON_INTERPRET=1`` was set before ``fused_pref`` was imported (Triton's interpreter), otherwise
the reference path, with a one-time warning.  ``backend="triton"`` or ``"reference"`` forces a path.

Layouts, for every function: padded ``hidden [R, T, D]`` with ``labels [R, T]``, or packed
(padding-free) ``hidden [N, D]`` with ``labels [N]`` and ``cu_seqlens [R + 1]`` (sequence ``r`` is
tokens ``cu_seqlens[r] .. cu_seqlens[r+1]``).  ``shift=True`` takes labels aligned with the input
ids, as Hugging Face models do: ``hidden[t]`` predicts ``labels[t + 1]`` of the same sequence and the
last position of each sequence predicts nothing; per-token outputs keep the shape of ``labels``
(entry ``t`` belongs to ``hidden[t]``, and the last position of each sequence is 0).

Vocabulary parallelism: with ``process_group``, ``weight`` (and ``bias``) is this rank's contiguous
shard of the vocabulary, starting at ``vocab_start`` (default ``rank * weight.shape[0]``, the
``torch.chunk`` split); labels are global ids; every rank gets the whole result and the full
``d_hidden``, and its own shard's ``d_weight`` / ``d_bias``; per-token statistics and
cross-entropy's extra terms are the whole vocabulary's too.  See :mod:`fused_pref.distributed`.
"""

import functools
from dataclasses import dataclass, replace

import torch

from . import arguments, kto, ops, preference, reference, validation
from .autograd import GradientsInForward, LinearLogprobs, LogprobParams, PreferenceHead
from .distributed import from_dtensors, resolve_shard, shard_rows, shard_start
from .kernels import active_plan
from .kernels.tiles import stats_plan
from .options import Options, takes_options, use_triton
from .outputs import PreferenceOutput, TokenLogprobs, cross_entropy_output, preference_output
from .segments import (reduce_token_losses, reduce_weighted_losses, sequence_sums, shift_labels, token_weights,
                       weights_divisor)


def _public(twin):
    """The Triton path ``impl`` as a public function: the options as keywords (``takes_options``),
    DTensor arguments as the call they describe (``distributed.from_dtensors``), and the reference
    ``twin`` (same signature) run instead where the device policy says so."""
    def decorate(impl):
        @functools.wraps(impl)
        def dispatch(*args, options: Options, **kwargs):
            args, kwargs, options = from_dtensors(args, kwargs, options)
            hidden = args[0] if args else kwargs.get("hidden")
            if use_triton(hidden, options):
                return impl(*args, **kwargs, options=options)
            validation.check_dtype("hidden", hidden)  # the kernels' dtypes, whichever path runs
            return twin.with_options(*args, **kwargs, options=options)
        return takes_options(dispatch)
    return decorate


@dataclass
class _Tokens:
    logp: torch.Tensor          # fp32, shape of labels, 0 where ignored
    valid: torch.Tensor         # bool, shape of labels (after the shift)
    logit_sum: torch.Tensor     # fp32 per-token sum of logits over the vocabulary (or empty)
    vocab_size: object          # int, or a 0-d tensor for a sharded vocabulary
    targets: torch.Tensor       # the labels each position predicts (after the shift)
    entropy: torch.Tensor       # fp32 per-token entropy (or empty)
    argmax: torch.Tensor        # int64 per-token argmax, -1 where ignored (or empty)
    lse: torch.Tensor           # fp32 per-token log-sum-exp, 0 where ignored (or empty)


@dataclass
class _Rows:
    """A call's tokens as the kernels take them."""
    hidden: torch.Tensor        # [R, T, D] (a 2-D hidden gains a leading 1)
    labels: torch.Tensor        # int64 [R*T], relative to this rank's vocabulary shard
    valid: torch.Tensor         # bool [R*T]
    rows: torch.Tensor          # int32 valid-first index, cut to the valid count when validation synced
    n_valid: torch.Tensor       # int32 [1], on the device
    checked: validation.Checked
    targets: torch.Tensor       # the labels after the shift, shape of labels
    vocab_size: object          # the whole vocabulary's: an int, or a 0-d tensor for a sharded one
    shard: object               # this rank's VocabShard under vocabulary parallelism, else None


def _rows(hidden, weight, labels, options: Options, shard, *, mean_over_sequences=False) -> _Rows:
    if options.shift:
        labels = shift_labels(labels, options.ignore_index, options.cu_seqlens)
    whole = shard is not None and validation.reads_back(options.validate)
    vocab_size = int(shard.total) if whole else weight.shape[0]
    checked = validation.check_labels(labels, vocab_size, ignore_index=options.ignore_index,
                                      validate=options.validate, mean_over_sequences=mean_over_sequences,
                                      cu_seqlens=options.cu_seqlens)
    hidden3 = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    # A vocabulary shard sees labels relative to its first row; labels it does not own fall
    # outside [0, V_local) and match no column of its kernels.
    labels_flat = labels.reshape(-1).long() - (0 if shard is None else shard.start)
    valid_flat = checked.valid.reshape(-1)
    # Valid rows first, in order: kernels read only the first n_valid and skip the rest on the
    # device.  When validation synchronised anyway, the index is cut to the exact count.
    rows = torch.argsort(~valid_flat, stable=True).to(torch.int32)
    if checked.n_valid is not None:
        rows = rows[: checked.n_valid]
    n_valid = valid_flat.sum(dtype=torch.int32).reshape(1)
    return _Rows(hidden3, labels_flat, valid_flat, rows, n_valid, checked, labels,
                 weight.shape[0] if shard is None else shard.total, shard)


def _block_vocab(r: _Rows, weight) -> int:
    """The vocabulary width that sizes ``backward="in_forward"``'s blocks: ``weight``'s rows, or
    under vocabulary parallelism the largest shard's, so that every rank cuts the same blocks and
    makes the same collectives (a host read when validation made none)."""
    return weight.shape[0] if r.shard is None else int(r.shard.widest)


def _token_logprobs(hidden, weight, labels, bias, options: Options, *, mean_over_sequences=False,
                    logit_sum=False, token_stats=False, lse_terms=False, class_weight=None,
                    rows: _Rows | None = None) -> _Tokens:
    """``class_weight``: ``[V]`` per-class weights (the whole vocabulary's, under vocabulary
    parallelism too: checked against it there), which weigh the logit sum.  ``rows``: the tokens as
    a call on the same ``labels`` laid them out, taken for ``hidden`` instead of checked again: a
    reference model's pass reuses the policy's, validated or not (the "cublas" plan's products then
    cover the valid rows only, when the policy's were counted)."""
    shard = resolve_shard(weight, options)
    if class_weight is not None and shard is not None:
        validation.check_class_weight_size(class_weight, shard.total, shard.size)
        class_weight = shard_rows(class_weight, shard)
    if not logit_sum:
        class_weight = None
    if rows is None:
        r = _rows(hidden, weight, labels, options, shard, mean_over_sequences=mean_over_sequences)
    else:
        r = replace(rows, hidden=hidden if hidden.dim() == 3 else hidden.unsqueeze(0))
    # Statistics and per-row weights in the backward run a plan built and checked with them.
    plan = options.plan or active_plan()
    plan = stats_plan(plan) if token_stats or lse_terms else plan
    params = LogprobParams(options, plan, shard, logit_sum, token_stats, lse_terms)
    class_weight = None if class_weight is None else class_weight.detach().float().contiguous()
    logp, sums, entropy, argmax, lse = LinearLogprobs.apply(r.hidden, weight, bias, r.labels, r.valid, r.rows,
                                                            r.n_valid, class_weight, params)
    shape = r.checked.valid.shape

    def shaped(t, asked):
        return t.view(shape) if asked else t

    return _Tokens(logp.view(shape), r.checked.valid, shaped(sums, logit_sum),
                   weight.shape[0] if shard is None else shard.total, r.targets, shaped(entropy, token_stats),
                   shaped(argmax, token_stats), shaped(lse, lse_terms))


@_public(reference.linear_logprobs)
def linear_logprobs(hidden, weight, labels, bias=None, *, return_entropy=False, return_token_accuracy=False,
                    return_argmax=False, options):
    """Per-token log-probabilities of ``labels`` under ``softmax(hidden @ weight.T + bias)``.

    ``hidden`` ``[N, D]`` or ``[R, T, D]`` (fp32, bf16 or fp16; strided views are read in place),
    ``weight`` ``[V, D]`` and ``bias`` ``[V]`` of the same dtype, ``labels`` of shape
    ``hidden.shape[:-1]`` with values in ``[0, V)`` or ``ignore_index``.  Returns fp32 of the shape
    of ``labels``, 0 at ignored positions::

        z = hidden @ weight.T + bias;  z = softcap * tanh(z / softcap) if softcap
        logp[i] = z[i, labels[i]] - logsumexp(z[i])

    ``shift`` / ``cu_seqlens``: see the module docstring (``cu_seqlens`` only marks where packed
    sequences end for the shift).  ``validate=False`` skips the value checks that need a host
    sync (label range, ``cu_seqlens`` values).

    ``return_entropy``, ``return_token_accuracy``, ``return_argmax``: per-token statistics of the
    same softmax, from the same forward pass (merged across vocabulary splits with the log-sum-exp;
    off, the kernels are compiled without them): with any of them the result is a
    :class:`fused_pref.outputs.TokenLogprobs` instead of a tensor.

    >>> logp = fused_pref.linear_logprobs(h, lm_head.weight, labels)   # [B, T]
    >>> out = fused_pref.linear_logprobs(h, lm_head.weight, labels, return_entropy=True)   # out.entropy
    """
    validation.check_call(hidden, weight, labels, bias, options)
    flags = {"return_entropy": return_entropy, "return_token_accuracy": return_token_accuracy,
             "return_argmax": return_argmax}
    validation.check_token_stats(flags)
    stats = any(flags.values())
    tokens = _token_logprobs(hidden, weight, labels, bias, options, token_stats=stats)
    if not stats:
        return tokens.logp
    return TokenLogprobs(tokens.logp, tokens.entropy if return_entropy else None,
                         (tokens.argmax == tokens.targets) & tokens.valid if return_token_accuracy else None,
                         tokens.argmax if return_argmax else None)


def _sequence_logps(tokens: _Tokens, reduction, cu_seqlens):
    """Per-sequence (log-probs under ``reduction``, summed log-probs, valid-token counts)."""
    sums = sequence_sums(tokens.logp, cu_seqlens)
    counts = sequence_sums(tokens.valid, cu_seqlens)
    # Validation rejects empty sequences under "mean"; with validate=False one gives 0, not NaN.
    logps = sums / counts.clamp(min=1) if reduction == "mean" else sums
    return logps, sums, counts


@_public(reference.sequence_logprobs)
def sequence_logprobs(hidden, weight, labels, bias=None, *, reduction="sum", options):
    """Per-sequence log-probabilities ``[R]`` (fp32) of ``labels``.

    ``hidden`` ``[R, T, D]`` with ``labels`` ``[R, T]``, or packed ``[N, D]`` / ``[N]`` with
    ``cu_seqlens``.  ``reduction="sum"`` adds the token log-probs (DPO); ``"mean"`` divides by the
    number of valid tokens of each sequence (SimPO's length normalisation; a sequence with no valid
    token is an error under validation).  Other arguments as :func:`linear_logprobs`.

    ``backward="in_forward"`` where no gradient is needed (under ``torch.no_grad``, or no input
    requiring one: a reference model's pass) computes the log-probs as that mode's forward does,
    cuBLAS's fp32 logits of blocks of rows and one pass over each (README "Gradient in the
    forward"); a call that needs gradients refuses it.

    >>> logps = fused_pref.sequence_logprobs(h, lm_head.weight, labels, reduction="mean")   # [R]
    """
    needs_gradient = any(_needs_gradients(hidden, weight, bias))
    validation.check_call(hidden, weight, labels, bias, options, sequence_level=True, reduction=reduction,
                          kind="sequence", needs_gradient=needs_gradient)
    mean = reduction == "mean"
    if options.backward == "in_forward":
        r = _rows(hidden, weight, labels, options, resolve_shard(weight, options), mean_over_sequences=mean)
        tokens = _tokens_in_blocks(r, hidden, weight, bias, options)
    else:
        tokens = _token_logprobs(hidden, weight, labels, bias, options, mean_over_sequences=mean)
    return _sequence_logps(tokens, reduction, options.cu_seqlens)[0]


@_public(reference.linear_cross_entropy)
def linear_cross_entropy(hidden, weight, labels, bias=None, *, reduction="mean", ce_weight=None, label_smoothing=0.0,
                         lse_square_scale=0.0, return_z_loss=False, return_token_accuracy=False,
                         return_predicted_tokens=False, options):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, without the logits.

    Equals ``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=..., reduction=...,
    weight=ce_weight, label_smoothing=...)`` in fp32, except that a batch with no valid label gives
    0 (not NaN) under ``"mean"``.  ``reduction``: ``"mean"`` over valid tokens (default), ``"sum"``,
    or ``"none"`` (fp32, shape of ``labels``, 0 at ignored positions).  Other arguments as
    :func:`linear_logprobs`.

    ``ce_weight``: per-class weights ``[V]`` (``F.cross_entropy``'s ``weight``; Liger-Kernel's name):
    each token's loss times its label's weight, ``"mean"`` divided by the valid tokens' weights (0
    when they sum to 0).  Not differentiable.  Under vocabulary parallelism, still the whole
    vocabulary's ``[V]``, the same on every rank.

    ``label_smoothing`` (eps, in [0, 1]): the target is ``1 - eps`` on the label plus ``eps / V``
    on every class, as ``F.cross_entropy``: per token ``(1 - eps) c_label (lse - z_label) + eps
    sum_v c_v (lse - z_v) / V`` (``c`` = ``ce_weight``, or 1), the class-weighted sum of logits from
    the same forward; ``"mean"`` divides by the valid tokens' ``c_label``.  With ``ce_weight``, not
    under a ``softcap`` yet.

    ``lse_square_scale`` (s >= 0): PaLM's z-loss, ``s * lse^2`` per valid token added to the loss,
    reduced as Liger-Kernel does (``"mean"`` over valid tokens, unweighted by ``ce_weight``).
    ``return_z_loss``: also return that term (detached; it is already inside ``loss``).

    ``return_z_loss``, ``return_token_accuracy``, ``return_predicted_tokens`` (Liger-Kernel's names):
    the result is a :class:`fused_pref.outputs.CrossEntropyOutput` with the z-loss, the fraction of
    valid tokens whose label is the argmax (under ``reduction="none"``, each token's 0 or 1) and/or
    the per-token argmax, from the same forward pass.

    The gradients of the smoothing and z-loss terms go through the same backward kernel as the
    log-probs, as per-row weights on ``p`` and on every column.

    >>> loss = fused_pref.linear_cross_entropy(h, lm_head.weight, labels, shift=True)   # SFT
    >>> out = fused_pref.linear_cross_entropy(h, w, labels, lse_square_scale=1e-4, return_z_loss=True)
    """
    arguments.linear_cross_entropy(reduction=reduction, ce_weight=ce_weight, label_smoothing=label_smoothing,
                                   lse_square_scale=lse_square_scale, return_z_loss=return_z_loss,
                                   return_token_accuracy=return_token_accuracy,
                                   return_predicted_tokens=return_predicted_tokens, options=options)
    validation.check_call(hidden, weight, labels, bias, options, reduction=reduction, kind="cross_entropy")
    # A sharded vocabulary's size is known once the shards are: _token_logprobs checks it then.
    validation.check_class_weights(ce_weight, None if options.process_group is not None else weight.shape[0], labels)
    stats = return_token_accuracy or return_predicted_tokens
    if options.backward == "in_forward":
        loss, argmax, r = _cross_entropy_in_forward(hidden, weight, labels, bias, reduction, ce_weight, options, stats)
        if not (stats or return_z_loss):
            return loss
        # No z-loss term runs in this mode (refused above): its value is 0, as the default path's without one.
        return cross_entropy_output(loss, argmax.view(r.checked.valid.shape) if stats else argmax, r.targets,
                                    r.checked.valid, reduction, token_accuracy=return_token_accuracy,
                                    predicted_tokens=return_predicted_tokens,
                                    z_loss=torch.zeros_like(loss) if return_z_loss else None)
    lse_terms = label_smoothing > 0 or lse_square_scale > 0
    tokens = _token_logprobs(hidden, weight, labels, bias, options, token_stats=stats, lse_terms=lse_terms,
                             logit_sum=label_smoothing > 0, class_weight=ce_weight)
    weights = token_weights(tokens.valid, tokens.targets, ce_weight)
    losses = -tokens.logp * weights
    if label_smoothing > 0:
        # H(u, p) against the uniform target, each class at its weight c_v (1 without ce_weight):
        # sum_v c_v (lse - z_v) / V = (C lse - sum_v c_v z_v) / V, 0 where ignored.
        total = tokens.vocab_size if ce_weight is None else ce_weight.detach().float().sum()
        uniform = (total * tokens.lse - tokens.logit_sum) / tokens.vocab_size
        losses = (1 - label_smoothing) * losses + label_smoothing * uniform
    loss = reduce_weighted_losses(losses, weights, reduction)
    z_loss = None
    if lse_square_scale > 0:
        z_loss = reduce_token_losses(lse_square_scale * tokens.lse.square(), tokens.valid.float(), reduction)
        loss = loss + z_loss
    if not (stats or return_z_loss):
        return loss
    if return_z_loss and z_loss is None:
        z_loss = torch.zeros_like(loss)
    return cross_entropy_output(loss, tokens.argmax, tokens.targets, tokens.valid, reduction,
                                token_accuracy=return_token_accuracy, predicted_tokens=return_predicted_tokens,
                                z_loss=z_loss.detach() if return_z_loss else None)


def _needs_gradients(*tensors) -> tuple[bool, ...]:
    # Not-a-tensor arguments reach here before validation's type checks name them (sequence_logprobs).
    grad = torch.is_grad_enabled()
    return tuple(grad and isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _with_gradients(loss, r: _Rows, weight, bias, needs, grads):
    """``loss`` carrying the gradients the forward computed (``backward="in_forward"``)."""
    return GradientsInForward.apply(loss, r.hidden, weight, bias, *(g if need else None for g, need in zip(grads, needs)))


def _cross_entropy_in_forward(hidden, weight, labels, bias, reduction, ce_weight, options: Options, token_stats):
    """``backward="in_forward"``: the loss with the gradients computed in its forward
    (``gradient_in_forward``), or none under ``no_grad`` or when no input needs one; with
    ``token_stats`` the per-token argmax (flat, -1 at ignored rows), else empty; and the tokens."""
    r = _rows(hidden, weight, labels, options, resolve_shard(weight, options))
    if ce_weight is not None:
        validation.check_class_weight_size(ce_weight, r.vocab_size, weight.shape[0])
    # Each row's share of the loss: its weight, divided by their sum under "mean".
    row_scale = token_weights(r.valid, r.targets.reshape(-1), ce_weight)
    if reduction == "mean":
        total = row_scale.sum()
        row_scale = row_scale / weights_divisor(total)
    needs = _needs_gradients(hidden, weight, bias)
    with torch.no_grad():
        vocab_start = _argmax_offset(r, token_stats)
        loss, argmax, grads = ops.gradient_in_forward(r.hidden, weight, bias, r.labels, r.valid, r.rows, row_scale,
                                                      needs, options, _block_vocab(r, weight), token_stats, vocab_start)
    return _with_gradients(loss, r, weight, bias, needs, grads), argmax, r


def _argmax_offset(r: _Rows, token_stats: bool):
    """A shard's first vocabulary id, for the argmax merged across the ranks (None where not needed)."""
    return shard_start(r.shard, r.hidden.device) if r.shard is not None and token_stats else None


def _preference_in_forward(spec, r: _Rows, weight, bias, options: Options, ref_logps,
                           token_metrics=False) -> PreferenceOutput:
    """``backward="in_forward"`` for a pair loss over the tokens ``r``: the log-probs (and with
    ``token_metrics`` the per-token entropy and argmax) and the gradients from blocks of whole pairs
    (``gradient_in_forward.preference_and_gradients``), the output assembled from them as the
    default path does, its loss carrying the gradients (every other field is detached anyway)."""
    needs = _needs_gradients(r.hidden, weight, bias)
    with torch.no_grad():
        vocab_start = _argmax_offset(r, token_metrics)
        logp, logit_sum, entropy, argmax, grads = ops.preference_gradient_in_forward(
            r.hidden, weight, bias, r.labels, r.valid, r.rows, ref_logps, needs, spec, options, _block_vocab(r, weight),
            token_metrics, vocab_start)
        shape = r.checked.valid.shape
        empty = logp.new_empty(0)
        stats = (entropy.view(shape), argmax.view(shape)) if token_metrics else (empty, empty)
        tokens = _Tokens(logp.view(shape), r.checked.valid, logit_sum.view(shape), r.vocab_size, r.targets,
                         *stats, empty)
        out = _preference(tokens, spec, ref_logps, options.cu_seqlens, token_metrics)
    return replace(out, loss=_with_gradients(out.loss, r, weight, bias, needs, grads))


def _tokens_in_blocks(r: _Rows, hidden, weight, bias, options: Options) -> _Tokens:
    """Per-token log-probs without gradients under ``backward="in_forward"``: that mode's cuBLAS
    products (``gradient_in_forward.logprobs_by_blocks``) over the rows ``r`` of the same labels (a
    reference model's over the policy's, the valid rows checked once)."""
    hidden = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    logp = ops.logprobs_without_gradients(hidden, weight, bias, r.labels, r.valid, r.rows, options,
                                          _block_vocab(r, weight))
    shape = r.checked.valid.shape
    empty = logp.new_empty(0)
    return _Tokens(logp.view(shape), r.checked.valid, empty, r.vocab_size, r.targets, empty, empty, empty)


def _preference(tokens: _Tokens, spec: preference.PreferenceSpec, ref_logps, cu_seqlens,
                token_metrics=False) -> PreferenceOutput:
    logps, sums, counts = _sequence_logps(tokens, spec.reduction, cu_seqlens)
    B = logps.shape[0] // 2
    chosen, rejected = logps[:B], logps[B:]
    ref_chosen, ref_rejected = (None, None) if ref_logps is None else (ref_logps[:B], ref_logps[B:])
    if spec.sort == "aot":
        # AOT: sort the policy and reference log-ratios over the batch, then a sigmoid head on their difference.
        chosen, rejected = torch.sort(chosen - rejected).values, torch.zeros_like(chosen)
        ref_chosen, ref_rejected = torch.sort(ref_chosen - ref_rejected).values, torch.zeros_like(ref_chosen)
    elif spec.sort == "aot_pair":
        chosen = torch.sort(chosen - ref_chosen).values
        rejected = torch.sort(rejected - ref_rejected).values
        ref_chosen = ref_rejected = None
    loss = PreferenceHead.apply(chosen, rejected, ref_chosen, ref_rejected, spec).mean()
    nll = None
    if spec.sft_weight:
        # The NLL of the chosen tokens only adds to the per-token weight g: no second vocabulary pass.
        nll = -sums[:B].sum() / counts[:B].sum().clamp(min=1)
        loss = loss + spec.sft_weight * nll
    margin = logps.detach() - (0.0 if ref_logps is None else ref_logps)
    extra = preference.odds_ratio_metrics(logps[:B].detach(), logps[B:].detach()) if spec.head == "odds_ratio" else None
    stats = {}
    if token_metrics:
        correct = (tokens.argmax == tokens.targets) & tokens.valid
        stats = dict(entropy_sums=sequence_sums(tokens.entropy.detach(), cu_seqlens),
                     correct_counts=sequence_sums(correct, cu_seqlens))
    return preference_output(loss, logps, spec.beta * margin, sequence_sums(tokens.logit_sum, cu_seqlens), counts,
                             tokens.vocab_size, nll_loss=nll, extra=extra, **stats)


def _reference_free(spec: preference.PreferenceSpec, hidden, weight, labels, bias, options,
                    token_metrics) -> PreferenceOutput:
    """The body of every reference-free preference loss on the Triton path."""
    validation.check_call(hidden, weight, labels, bias, options, sequence_level=True, pairs=True)
    if options.backward == "in_forward":
        r = _rows(hidden, weight, labels, options, resolve_shard(weight, options),
                  mean_over_sequences=spec.reduction == "mean")
        return _preference_in_forward(spec, r, weight, bias, options, None, token_metrics)
    tokens = _token_logprobs(hidden, weight, labels, bias, options, mean_over_sequences=spec.reduction == "mean",
                             logit_sum=True, token_stats=token_metrics)
    return _preference(tokens, spec, None, options.cu_seqlens, token_metrics)


@_public(reference.simpo_loss)
def simpo_loss(hidden, weight, labels, bias=None, *, beta=2.0, gamma=1.0, label_smoothing=0.0, sft_weight=0.0,
               token_metrics=False, options) -> PreferenceOutput:
    """SimPO (Meng et al., 2024): reference-free, length-normalised preference loss.

    ``hidden`` ``[2B, T, D]`` and ``labels`` ``[2B, T]`` (or packed, with ``cu_seqlens`` ``[2B+1]``)
    hold B chosen sequences then their B rejected ones (pair j is sequences j and j+B).  With ``S``
    the mean token log-prob of a sequence::

        x_j  = beta * (S[j] - S[j+B]) - gamma
        loss = mean_j  -(1 - eps) * log sigmoid(x_j) - eps * log sigmoid(-x_j)  +  sft_weight * NLL(chosen)

    Defaults ``beta=2.0``, ``gamma=1.0`` (the reward margin), ``label_smoothing=0.0`` (eps),
    ``sft_weight=0.0`` (CPO-SimPO's NLL on the chosen tokens when > 0).  Rewards are ``beta * S``.
    Returns a :class:`PreferenceOutput`; ``.metrics()`` gives TRL's names.  ``token_metrics=True``
    (every preference loss takes it) adds TRL DPOTrainer's ``entropy`` and ``mean_token_accuracy``,
    from the same forward pass (the forward then also sums each tile's ``p z`` and tracks its argmax).

    >>> out = fused_pref.simpo_loss(h, lm_head.weight, labels, beta=2.5, gamma=1.4)
    >>> out.loss.backward()
    """
    spec = arguments.simpo_loss(beta=beta, gamma=gamma, label_smoothing=label_smoothing, sft_weight=sft_weight,
                                token_metrics=token_metrics, options=options)
    return _reference_free(spec, hidden, weight, labels, bias, options, token_metrics)


@_public(reference.cpo_loss)
def cpo_loss(hidden, weight, labels, bias=None, *, beta=0.1, label_smoothing=0.0, sft_weight=1.0,
             token_metrics=False, options) -> PreferenceOutput:
    """CPO (Xu et al., 2024) as TRL's CPOTrainer with ``loss_type="sigmoid"``: reference-free, summed.

    Layout as :func:`simpo_loss`.  With ``S`` the summed token log-probs::

        x_j  = beta * (S[j] - S[j+B])
        loss = mean_j  -(1 - eps) * log sigmoid(x_j) - eps * log sigmoid(-x_j)  +  sft_weight * NLL(chosen)

    Defaults ``beta=0.1``, ``label_smoothing=0.0``, ``sft_weight=1.0`` (TRL's ``cpo_alpha``).
    Rewards are ``beta * S``.

    >>> out = fused_pref.cpo_loss(h, lm_head.weight, labels)
    """
    spec = arguments.cpo_loss(beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight,
                              token_metrics=token_metrics, options=options)
    return _reference_free(spec, hidden, weight, labels, bias, options, token_metrics)


@_public(reference.orpo_loss)
def orpo_loss(hidden, weight, labels, bias=None, *, beta=0.1, token_metrics=False, options) -> PreferenceOutput:
    """ORPO (Hong et al., 2024) as TRL's ORPOTrainer: NLL plus an odds-ratio term, no reference model.

    Layout as :func:`simpo_loss`.  With ``S`` the mean token log-prob of a sequence::

        v_j  = (S[j] - S[j+B]) - (log(1 - exp S[j]) - log(1 - exp S[j+B]))
        loss = NLL(chosen) - beta * mean_j log sigmoid(v_j)

    Default ``beta=0.1`` (the paper's lambda).  Rewards are ``beta * S``; ``metrics()`` adds
    ``nll_loss``, ``log_odds_ratio`` and ``log_odds_chosen``.

    >>> out = fused_pref.orpo_loss(h, lm_head.weight, labels)
    """
    spec = arguments.orpo_loss(beta=beta, token_metrics=token_metrics, options=options)
    return _reference_free(spec, hidden, weight, labels, bias, options, token_metrics)


@_public(reference.dpo_loss)
def dpo_loss(hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_weight=0.0, length_normalize=None,
             discopop_tau=0.05, token_metrics=False, options) -> PreferenceOutput:
    """DPO (Rafailov et al., 2023) and its variants, each as TRL's DPOTrainer defines it.

    Layout as :func:`simpo_loss`.  The reference model enters either as ``ref_logps`` ``[2B]``
    (precomputed, reduced like the policy's) or as ``ref_hidden`` (``hidden``'s layout, any ``D``)
    with ``ref_weight`` ``[V, D_ref]`` and ``ref_bias`` (without ``ref_weight``, the policy's
    ``weight`` and, unless ``ref_bias`` is given, its ``bias``), from which the library computes
    the log-probs with the fused forward under ``no_grad``.  With ``S``, ``Ref`` the per-sequence
    log-probs, ``a = S[j] - Ref[j]``, ``b = S[j+B] - Ref[j+B]``, ``u = a - b``,
    ``eps = label_smoothing``, ``s`` the sigmoid:

    ==========  ====================================================================
    sigmoid     ``-(1-eps) log s(beta u) - eps log s(-beta u)``   (cDPO when eps > 0)
    robust      ``(-(1-eps) log s(beta u) + eps log s(-beta u)) / (1 - 2 eps)``
    exo_pair    ``s(beta u) (log s(beta u) - log(1-eps)) + s(-beta u) (log s(-beta u) - log eps)``, eps > 0
    hinge       ``relu(1 - beta u)``
    ipo         ``(u - 1/(2 beta))^2``, on length-averaged log-probs
    sppo_hard   ``(a - 1/(2 beta))^2 + (b + 1/(2 beta))^2``
    nca_pair    ``-log s(beta a) - log s(-beta a)/2 - log s(-beta b)/2``
    aot         sigmoid on ``sort_batch(S[c] - S[r]) - sort_batch(Ref[c] - Ref[r])``
    aot_pair    sigmoid on ``sort_batch(a) - sort_batch(b)`` (TRL 1.x's ``aot_unpaired``)
    apo_zero    ``1 - s(beta a) + s(beta b)``
    apo_down    ``s(beta a) + 1 - s(beta u)``
    discopop    ``-log s(beta u) (1 - m) + exp(-beta u) m``, ``m = s(beta u / discopop_tau)``
    ==========  ====================================================================

    ``loss = mean_j loss_j + sft_weight * NLL(chosen)`` (RPO's ``rpo_alpha`` when > 0).
    ``length_normalize``: average the log-probs over valid tokens (Liger's ``average_log_prob``);
    None means TRL's choice, True for ``ipo`` only.  Defaults ``beta=0.1``, ``discopop_tau=0.05``.
    Rewards are ``beta * (S - Ref)``.

    >>> out = fused_pref.dpo_loss(h, lm_head.weight, labels, ref_hidden=h_ref, loss_type="ipo")
    """
    spec = arguments.dpo_loss(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, sft_weight=sft_weight,
                              length_normalize=length_normalize, discopop_tau=discopop_tau,
                              token_metrics=token_metrics, options=options)
    num_sequences = validation.check_call(hidden, weight, labels, bias, options, sequence_level=True, pairs=True)
    ref_weight, ref_bias = validation.check_dpo_reference(
        hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
        ref_bias=ref_bias, num_sequences=num_sequences, sharded=options.process_group is not None)
    mean = spec.reduction == "mean"
    # The policy's tokens first: their labels are checked there, and are the reference model's too.
    r = _rows(hidden, weight, labels, options, resolve_shard(weight, options), mean_over_sequences=mean)
    if options.backward != "in_forward":
        tokens = _token_logprobs(hidden, weight, labels, bias, options, logit_sum=True, token_stats=token_metrics,
                                 rows=r)
    if ref_logps is None:
        with torch.no_grad():
            if options.backward == "in_forward":
                ref_tokens = _tokens_in_blocks(r, ref_hidden, ref_weight, ref_bias, options)
            else:
                ref_tokens = _token_logprobs(ref_hidden, ref_weight, labels, ref_bias,
                                             replace(options, validate=False, backward="auto"), rows=r)
            ref_logps = _sequence_logps(ref_tokens, spec.reduction, options.cu_seqlens)[0]
    ref_logps = ref_logps.detach().float()
    if options.backward == "in_forward":
        return _preference_in_forward(spec, r, weight, bias, options, ref_logps, token_metrics)
    return _preference(tokens, spec, ref_logps, options.cu_seqlens, token_metrics)


@_public(reference.kto_loss)
def kto_loss(hidden, weight, labels, bias=None, *, desirable, ref_logps=None, ref_hidden=None, ref_weight=None,
             ref_bias=None, kl=None, beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
             token_metrics=False, options) -> kto.KTOOutput:
    """KTO (Ethayarajh et al., 2024) as TRL's KTOTrainer: unpaired sequences, each desirable or not.

    ``hidden`` ``[R, T, D]`` and ``labels`` ``[R, T]`` (or packed, with ``cu_seqlens`` ``[R+1]``), any
    order; ``desirable`` bool ``[R]``.  The reference model enters as for :func:`dpo_loss`:
    ``ref_logps`` ``[R]`` (summed) or ``ref_hidden`` with ``ref_weight`` / ``ref_bias``.  With ``S``,
    ``Ref`` the summed log-probs and ``r = S - Ref``, per sequence (``s`` the sigmoid)::

        kto                desirable: 1 - s(beta (r - kl))     undesirable: 1 - s(beta (kl - r))
        apo_zero_unpaired  desirable: 1 - s(beta r)            undesirable: s(beta r)

    times ``desirable_weight`` / ``undesirable_weight``; ``loss`` is their mean.  ``kl``: KTO's
    reference point, a number or one-element tensor, treated as a constant (TRL computes it from
    mismatched completions without gradient: ``(sequence_logprobs(kl_hidden, w, kl_labels) -
    ref_kl_logps).mean().clamp(min=0)``); required for ``kto``, absent for ``apo_zero_unpaired``.
    Defaults ``beta=0.1``, weights 1.  Returns a :class:`fused_pref.kto.KTOOutput`, whose
    ``metrics()`` are TRL's; ``token_metrics=True`` adds the ``entropy``.

    >>> out = fused_pref.kto_loss(h, lm_head.weight, labels, desirable=is_good, ref_logps=ref, kl=kl)
    """
    spec = arguments.kto_loss(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                              undesirable_weight=undesirable_weight, token_metrics=token_metrics, options=options)
    num_sequences = validation.check_call(hidden, weight, labels, bias, options, sequence_level=True)
    kto.check_unpaired(desirable, kl, num_sequences, hidden.device, spec)
    ref_weight, ref_bias = validation.check_dpo_reference(
        hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
        ref_bias=ref_bias, num_sequences=num_sequences, loss="kto_loss", rows="R",
        sharded=options.process_group is not None)
    r = _rows(hidden, weight, labels, options, resolve_shard(weight, options))
    tokens = _token_logprobs(hidden, weight, labels, bias, options, logit_sum=True, token_stats=token_metrics, rows=r)
    logps, _, counts = _sequence_logps(tokens, "sum", options.cu_seqlens)
    if ref_logps is None:
        with torch.no_grad():
            ref_tokens = _token_logprobs(ref_hidden, ref_weight, labels, ref_bias, replace(options, validate=False),
                                         rows=r)
            ref_logps = _sequence_logps(ref_tokens, "sum", options.cu_seqlens)[0]
    ref_logps = ref_logps.detach().float()
    loss = kto.kto_losses(logps, ref_logps, desirable, kl, spec).mean()
    entropy_sums = sequence_sums(tokens.entropy.detach(), options.cu_seqlens) if token_metrics else None
    return kto.kto_output(loss, logps, ref_logps, desirable, kl, sequence_sums(tokens.logit_sum, options.cu_seqlens),
                          counts, tokens.vocab_size, spec, entropy_sums)
