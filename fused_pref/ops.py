"""The kernels as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` sees each launch
as one opaque node with a known output shape instead of tracing into Triton's launcher.  A custom
op's schema takes tensors and scalars only: ``forward`` and ``backward`` are where a call's
``LogprobParams`` (its ``Options`` included) are flattened into them, ``gradient_in_forward`` is
``backward="in_forward"``'s (their cuBLAS products and block kernel as one node each, its
gradient-free log-probs too), and ``head`` is for
a ``PreferenceSpec``: the one place that knows which option each kernel reads.  They also hand the
kernels a bias they can read at ``b_ptr + v`` (``unit_stride_bias``): a strided or expanded one is
copied once per call, not in every launch.

``torch.library.triton_op`` / ``wrap_triton`` would let Inductor see inside, but they need real
device pointers and fail under the interpreter that CI runs on (DESIGN.md section 7); plain
``custom_op`` works on both, at the price of an opaque node.
"""

import functools

import torch

from .distributed import group_name, group_named
from .gradient_in_forward import cross_entropy_and_gradients, logprobs_by_blocks, preference_and_gradients
from .kernels import linear_grad_backward, linear_lse_forward, preference_head_forward
from .kernels.tiles import unit_stride_bias


def _autocast_off(impl):
    """``impl`` with ``torch.autocast`` off on its tensors' device.  Its products are fp32 by design
    (fp32 logits and accumulators); an eager call under autocast would otherwise run them in the
    autocast dtype, and a compiled one (where the op is opaque) would not.  Dtypes are the caller's:
    ``integrations.hf`` casts to the autocast dtype as ``nn.Linear`` would."""
    @functools.wraps(impl)
    def run(*args, **kwargs):
        device = next(t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return impl(*args, **kwargs)
    return run


@torch.library.custom_op("fused_pref::linear_lse", mutates_args=())
@_autocast_off
def linear_lse(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               rows: torch.Tensor, n_valid: torch.Tensor, softcap: float | None, temperature: float,
               logit_sum: bool, token_stats: bool, workspace_bytes: int, plan: str,
               class_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor]:
    lse, target, sums, entropy, argmax, max_logit = linear_lse_forward(
        hidden, weight, bias, labels, rows, n_valid, softcap=softcap, temperature=temperature, logit_sum=logit_sum,
        token_stats=token_stats, workspace_bytes=workspace_bytes, plan=plan, class_weight=class_weight)
    # A custom op returns tensors only: an empty tensor stands for "not requested".
    return (lse, target, sums if logit_sum else lse.new_empty(0), entropy if token_stats else lse.new_empty(0),
            argmax if token_stats else labels.new_empty(0), max_logit if token_stats else lse.new_empty(0))


@linear_lse.register_fake
def _(hidden, weight, bias, labels, rows, n_valid, softcap, temperature, logit_sum, token_stats, workspace_bytes,
      plan, class_weight):
    n = hidden.shape[0] * hidden.shape[1]
    out = hidden.new_empty(n, dtype=torch.float32)
    return (out, torch.empty_like(out), hidden.new_empty(n if logit_sum else 0, dtype=torch.float32),
            hidden.new_empty(n if token_stats else 0, dtype=torch.float32),
            labels.new_empty(n if token_stats else 0, dtype=torch.int64),
            hidden.new_empty(n if token_stats else 0, dtype=torch.float32))


@torch.library.custom_op("fused_pref::linear_grad", mutates_args=())
@_autocast_off
def linear_grad(grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, rows: torch.Tensor, n_valid: torch.Tensor, lse: torch.Tensor,
                target: torch.Tensor, softcap: float | None, temperature: float, needs: list[bool], workspace_bytes: int,
                plan: str, grad_lse: torch.Tensor | None, grad_logit_sum: torch.Tensor | None,
                grad_entropy: torch.Tensor | None, mean_z: torch.Tensor | None,
                class_weight: torch.Tensor | None) -> list[torch.Tensor]:
    grads = linear_grad_backward(grad_logp, hidden, weight, bias, labels, rows, n_valid, lse, target, softcap=softcap,
                                 temperature=temperature, needs=tuple(needs), workspace_bytes=workspace_bytes,
                                 plan=plan, grad_lse=grad_lse, grad_logit_sum=grad_logit_sum,
                                 grad_entropy=grad_entropy, mean_z=mean_z, class_weight=class_weight)
    # A custom op returns tensors only: an empty tensor, of the fake's dtype, stands for "not requested".
    dtypes = (hidden.dtype, weight.dtype, weight.dtype if bias is None else bias.dtype)
    return [g if g is not None else hidden.new_empty(0, dtype=dtype) for g, dtype in zip(grads, dtypes)]


@linear_grad.register_fake
def _(grad_logp, hidden, weight, bias, labels, rows, n_valid, lse, target, softcap, temperature, needs, workspace_bytes,
      plan, grad_lse, grad_logit_sum, grad_entropy, mean_z, class_weight):
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    dtypes = (hidden.dtype, weight.dtype, weight.dtype if bias is None else bias.dtype)
    return [hidden.new_empty(shape if need else (0,), dtype=dtype)
            for shape, dtype, need in zip(shapes, dtypes, needs)]


@torch.library.custom_op("fused_pref::cross_entropy_in_forward", mutates_args=())
@_autocast_off
def cross_entropy_in_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor, row_scale: torch.Tensor,
                             needs: list[bool], softcap: float | None, temperature: float,
                             workspace_bytes: int, token_stats: bool, group: str | None, block_vocab: int,
                             vocab_start: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    loss, argmax, *grads = cross_entropy_and_gradients(hidden, weight, bias, labels, valid, rows, row_scale,
                                                       tuple(needs), softcap=softcap, temperature=temperature,
                                                       workspace_bytes=workspace_bytes, token_stats=token_stats,
                                                       group=group_named(group), block_vocab=block_vocab,
                                                       vocab_start=vocab_start)
    return loss, labels.new_empty(0) if argmax is None else argmax, _stored_gradients(grads, hidden)


def _stored_gradients(grads, hidden):
    # An empty tensor stands for a gradient not asked for, in the dtype the fake gives it.
    dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
    return [g if g is not None else hidden.new_empty(0, dtype=dtype) for g in grads]


def _fake_stored_gradients(hidden, weight, needs):
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
    return [hidden.new_empty(shape if need else (0,), dtype=dtype) for shape, need in zip(shapes, needs)]


@cross_entropy_in_forward.register_fake
def _(hidden, weight, bias, labels, valid, rows, row_scale, needs, softcap, temperature, workspace_bytes, token_stats,
      group, block_vocab, vocab_start):
    return (hidden.new_empty((), dtype=torch.float32), labels.new_empty(labels.numel() if token_stats else 0),
            _fake_stored_gradients(hidden, weight, needs))


@torch.library.custom_op("fused_pref::preference_in_forward", mutates_args=())
@_autocast_off
def preference_in_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                          valid: torch.Tensor, rows: torch.Tensor, cu_seqlens: torch.Tensor | None,
                          ref_logps: torch.Tensor | None, needs: list[bool], head: str, reduction: str, beta: float,
                          gamma: float, label_smoothing: float, tau: float, sft_weight: float, softcap: float | None,
                          temperature: float, workspace_bytes: int, token_stats: bool, group: str | None,
                          block_vocab: int, vocab_start: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    logp, sums, stats, *grads = preference_and_gradients(
        hidden, weight, bias, labels, valid, rows, cu_seqlens, ref_logps, tuple(needs), head=head, reduction=reduction,
        beta=beta, gamma=gamma, label_smoothing=label_smoothing, tau=tau, sft_weight=sft_weight, softcap=softcap,
        temperature=temperature, workspace_bytes=workspace_bytes, token_stats=token_stats, group=group_named(group),
        block_vocab=block_vocab, vocab_start=vocab_start)
    entropy, argmax = stats if token_stats else (logp.new_empty(0), logp.new_empty(0, dtype=torch.int64))
    return logp, sums, entropy, argmax, _stored_gradients(grads, hidden)


@preference_in_forward.register_fake
def _(hidden, weight, bias, labels, valid, rows, cu_seqlens, ref_logps, needs, head, reduction, beta, gamma,
      label_smoothing, tau, sft_weight, softcap, temperature, workspace_bytes, token_stats, group, block_vocab,
      vocab_start):
    logp = hidden.new_empty(hidden.shape[0] * hidden.shape[1], dtype=torch.float32)
    n = logp.numel() if token_stats else 0
    return (logp, torch.empty_like(logp), logp.new_empty(n), logp.new_empty(n, dtype=torch.int64),
            _fake_stored_gradients(hidden, weight, needs))


@torch.library.custom_op("fused_pref::logprobs_in_blocks", mutates_args=())
@_autocast_off
def logprobs_in_blocks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                       valid: torch.Tensor, rows: torch.Tensor, softcap: float | None, temperature: float,
                       workspace_bytes: int, group: str | None, block_vocab: int) -> torch.Tensor:
    return logprobs_by_blocks(hidden, weight, bias, labels, valid, rows, softcap=softcap, temperature=temperature,
                              workspace_bytes=workspace_bytes, group=group_named(group), block_vocab=block_vocab)


@logprobs_in_blocks.register_fake
def _(hidden, weight, bias, labels, valid, rows, softcap, temperature, workspace_bytes, group, block_vocab):
    return hidden.new_empty(hidden.shape[0] * hidden.shape[1], dtype=torch.float32)


@torch.library.custom_op("fused_pref::preference_head", mutates_args=())
@_autocast_off
def preference_head(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, loss: str, beta: float, gamma: float,
                    label_smoothing: float, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(preference_head_forward(chosen, rejected, ref_chosen, ref_rejected, loss=loss, beta=beta,
                                         gamma=gamma, label_smoothing=label_smoothing, tau=tau))


@preference_head.register_fake
def _(chosen, rejected, ref_chosen, ref_rejected, loss, beta, gamma, label_smoothing, tau):
    out = chosen.new_empty(chosen.shape, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out)


def forward(hidden, weight, bias, labels, rows, n_valid, params, class_weight=None):
    """``(lse, target, logit sums, entropy, argmax, max logit)`` per token (the last four empty
    unless asked for; the logit sums weighted by ``class_weight`` when given): ``linear_lse`` with
    ``params`` flattened."""
    return linear_lse(hidden, weight, unit_stride_bias(bias), labels, rows, n_valid, params.options.softcap,
                      params.options.temperature, params.logit_sum, params.token_stats,
                      params.options.workspace_bytes, params.plan, class_weight)


def backward(grad_logp, hidden, weight, bias, labels, rows, n_valid, lse, target, needs, params, grad_lse=None,
             grad_logit_sum=None, grad_entropy=None, mean_z=None, class_weight=None):
    """``[d_hidden, d_weight, d_bias]`` (empty where not in ``needs``): ``linear_grad`` with ``params``
    flattened (``lse`` and ``target`` the forward's); with ``grad_lse``, ``grad_logit_sum`` (of the ``class_weight``-weighted sum),
    ``grad_entropy`` (and ``mean_z``) also their parts."""
    return linear_grad(grad_logp, hidden, weight, unit_stride_bias(bias), labels, rows, n_valid, lse, target,
                       params.options.softcap,
                       params.options.temperature, list(needs), params.options.workspace_bytes, params.plan,
                       grad_lse, grad_logit_sum, grad_entropy, mean_z, class_weight)


def gradient_in_forward(hidden, weight, bias, labels, valid, rows, row_scale, needs, options, block_vocab,
                        token_stats=False, vocab_start=None):
    """``(loss, argmax, [d_hidden, d_weight, d_bias])`` (the argmax empty unless ``token_stats``, a
    gradient where not in ``needs``; under vocabulary parallelism ``weight``'s shard's, ``block_vocab``
    the largest shard's rows, ``vocab_start`` its first id): ``cross_entropy_in_forward`` with
    ``options`` flattened."""
    return cross_entropy_in_forward(hidden, weight, unit_stride_bias(bias), labels, valid, rows, row_scale, list(needs),
                                    options.softcap, options.temperature, options.workspace_bytes, token_stats,
                                    group_name(options.process_group), block_vocab, vocab_start)


def preference_gradient_in_forward(hidden, weight, bias, labels, valid, rows, ref_logps, needs, spec, options,
                                   block_vocab, token_stats=False, vocab_start=None):
    """``(logp, logit sums, entropy, argmax, [d_hidden, d_weight, d_bias])`` of a pair loss (the
    statistics empty unless ``token_stats``, a gradient where not in ``needs``; ``vocab_start`` a
    shard's first id, a device scalar): ``preference_in_forward`` with ``spec`` and ``options``
    flattened."""
    return preference_in_forward(hidden, weight, unit_stride_bias(bias), labels, valid, rows, options.cu_seqlens,
                                 ref_logps, list(needs),
                                 spec.head, spec.reduction, spec.beta, spec.gamma, spec.label_smoothing, spec.tau,
                                 spec.sft_weight, options.softcap, options.temperature, options.workspace_bytes,
                                 token_stats, group_name(options.process_group), block_vocab, vocab_start)


def logprobs_without_gradients(hidden, weight, bias, labels, valid, rows, options, block_vocab):
    """Per-token log-probs by ``backward="in_forward"``'s products, none of its gradients (a DPO's
    reference model): ``logprobs_in_blocks`` with ``options`` flattened."""
    return logprobs_in_blocks(hidden, weight, unit_stride_bias(bias), labels, valid, rows, options.softcap,
                              options.temperature,
                              options.workspace_bytes, group_name(options.process_group), block_vocab)


def head(chosen, rejected, ref_chosen, ref_rejected, spec):
    """Per-pair ``(losses, d_chosen, d_rejected)``: ``preference_head`` with ``spec`` flattened."""
    return preference_head(chosen, rejected, ref_chosen, ref_rejected, spec.head, spec.beta, spec.gamma,
                           spec.label_smoothing, spec.tau)
