"""Liger-Kernel's ``LigerFusedLinearGRPOLoss`` computed by :func:`fused_pref.grpo.grpo_loss`: switch by
changing one import.

    - from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    + from fused_pref.compat.liger import LigerFusedLinearGRPOLoss

The constructor and ``forward`` take Liger 0.8.5's arguments (names, order, defaults; note that here,
unlike Liger's preference losses, the input comes before the weight) and ``forward`` returns what
Liger's does, ``(loss, metrics)`` with ``metrics = (kl, clip_ratio)``, or ``(clip_ratio,)`` when
``beta == 0``.  Arguments map as follows; the loss is the one :func:`fused_pref.grpo.grpo_loss`
documents, whose formulas Liger shares.

==========================================  ===========================================================
Liger                                       fused_pref
==========================================  ===========================================================
``_input, lin_weight, bias``                ``hidden`` ``[B, T, D]``, ``weight``, ``bias``
``selected_token_ids, attention_mask``      ``labels``: the ids where the mask is nonzero, else
                                            ``ignore_index`` (the mask must be 0/1; checked unless
                                            ``validate=False``)
``advantages, old_per_token_logps``         ``advantages``, ``old_logps``
``ref_per_token_logps``, or ``ref_input``   ``ref_logps``; from ``ref_input @ ref_weight.T + ref_bias``
with ``ref_weight, ref_bias``               (no grad, at ``temperature``) when only those are given
``use_ref_model=False``                     no KL term: Liger's reference is then the policy itself
                                            (``logp.detach()``), whose KL and its gradient are 0
``vllm_is_ratio`` ``[B]``, ``[B, 1]``,      ``importance_sampling_ratio`` ``[B]`` or ``[B, T]``, read at
``[B, T]``                                  completion tokens only (Liger's vespo also sums its log
                                            over the padding: keep it 1 there)
``num_items_in_batch``                      dapo / cispo / vespo's divisor: it divided by the world
                                            size, or every rank's completion tokens (all-reduced)
                                            divided by it, as Liger
``beta, epsilon_low, epsilon_high, delta,   same names (``use_bias_correction_kl`` defaults to False
loss_type, importance_sampling_level,       here, as in Liger; TRL's default and ``grpo_loss``'s is
max_completion_length, sapo_*, vespo_*,     True)
use_bias_correction_kl, temperature``
``compiled, chunk_size``                    nothing: how Liger trades its memory for speed
==========================================  ===========================================================

The metrics are Liger's: ``kl``, the KL term's mean over completion tokens (0 without
``use_ref_model``); ``clip_ratio``, the fraction of completion tokens whose ratio is clipped, for
the clipped loss types ``(r < 1 - epsilon_low and A < 0) or (r > 1 + epsilon_high and A > 0)`` on the
ratio *before* ``delta``'s clamp, for cispo ``r > epsilon_high and A > 0``, for sapo and vespo 0.  At
``importance_sampling_level="sequence"`` a clipped sequence counts once per completion token.
(TRL counts after the clamp, and sequence-level ratios per sequence: see ``GRPOOutput.stats``.)

Refused as Liger refuses them (``ValueError``): ``importance_sampling_level="sequence"`` with cispo,
sapo or vespo; dr_grpo without ``max_completion_length``; ``use_ref_model=True`` without a reference;
``sapo_temperature_*`` or ``delta`` <= 0.  Not supported (``NotImplementedError``): ``loss_type="luspo"``
at ``importance_sampling_level="token"``, with a reference KL term, or with a per-token
``vllm_is_ratio``: there Liger sums the per-token loss over every position, padding included, which
agrees with TRL 1.16's masked sum only when the per-token loss is one value per sequence.

Extra keyword-only arguments: ``validate=True`` and ``backend="auto"``, as in :mod:`fused_pref.functional`.
Numerics: fused_pref accumulates in fp32 throughout, where Liger forms bf16 inputs' logits in bf16.
"""

# Matched against liger-kernel 0.8.5 as installed (chunked_loss/grpo_loss.py, fused_linear_ppo.py).

import inspect
import warnings

import torch

from .. import functional, grpo, validation
from ..options import Options

__all__ = ["LigerFusedLinearGRPOLoss"]

# The loss types whose normaliser is a token count Liger shares across ranks.
_TOKEN_NORMALISED = ("dapo", "cispo", "vespo")


def _world_size():
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


def _token_normaliser(mask, num_items_in_batch):
    """Liger's divisor for dapo / cispo / vespo: ``num_items_in_batch`` (the generation batch's tokens),
    else every rank's completion tokens, per rank."""
    if num_items_in_batch is not None:
        total = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device).reshape(())
    else:
        total = mask.sum(dtype=torch.float32)
        if _world_size() > 1:
            torch.distributed.all_reduce(total)
    return total / _world_size()


def _clip_ratio(logps, old_logps, mask, advantages, spec: grpo.GRPOSpec):
    """Liger's ``clip_ratio`` (see the module docstring), from the detached per-token log-probs."""
    with torch.no_grad():
        log_ratio = torch.where(mask, logps - (logps if old_logps is None else old_logps.float()), 0.0)
        if spec.importance_sampling_level == "sequence":
            log_ratio = (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
        ratio, advantages = torch.exp(log_ratio), advantages.float().unsqueeze(-1)
        if spec.loss_type == "cispo":
            clipped = (ratio > spec.epsilon_high) & (advantages > 0)
        elif spec.loss_type in grpo.CLIPPED_LOSS_TYPES:
            clipped = (((ratio < 1 - spec.epsilon_low) & (advantages < 0))
                       | ((ratio > 1 + spec.epsilon_high) & (advantages > 0)))
        else:
            clipped = torch.zeros_like(ratio, dtype=torch.bool)
        return (clipped & mask).sum(dtype=torch.float32) / mask.sum(dtype=torch.float32).clamp(min=1)


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """Liger's GRPO loss over :func:`fused_pref.grpo.grpo_loss`; see the module docstring.

    ``forward(_input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
    ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
    vllm_is_ratio=None, num_items_in_batch=None)`` returns ``(loss, metrics)``.
    """

    def __init__(self, beta=0.04, compiled=True, use_ref_model=True, chunk_size=1, epsilon_low=0.2,
                 epsilon_high=0.2, loss_type="dapo", max_completion_length=None, importance_sampling_level="token",
                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, temperature=1.0, delta=None,
                 use_bias_correction_kl=False, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                 vespo_lambda_neg=2.0, *, validate=True, backend="auto"):
        super().__init__()
        validation.check_flag("compiled", compiled)
        validation.check_flag("use_ref_model", use_ref_model)
        validation.check_positive_int("chunk_size", chunk_size)
        if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
            raise ValueError(f"importance_sampling_level='sequence' is not supported for loss_type={loss_type!r} "
                             "(Liger refuses it): use importance_sampling_level='token'")
        if loss_type == "luspo" and importance_sampling_level != "sequence":
            raise NotImplementedError("loss_type='luspo' at importance_sampling_level='token' is not supported: "
                                      "Liger sums its per-token loss over the padding too (see "
                                      "fused_pref.compat.liger_grpo); use importance_sampling_level='sequence', "
                                      "or fused_pref.grpo_loss for TRL's luspo")
        # Every hyper-parameter checked once, here, by the spec the loss will use.
        self.spec = grpo.GRPOSpec(loss_type=loss_type, beta=beta, epsilon_low=epsilon_low,
                                  epsilon_high=epsilon_high, delta=delta,
                                  importance_sampling_level=importance_sampling_level,
                                  use_bias_correction_kl=use_bias_correction_kl,
                                  max_completion_length=max_completion_length,
                                  sapo_temperature_pos=sapo_temperature_pos,
                                  sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos,
                                  vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                                  vespo_lambda_neg=vespo_lambda_neg)
        self.options = Options(temperature=temperature, validate=validate, backend=backend)
        self.beta, self.compiled, self.use_ref_model, self.chunk_size = beta, compiled, use_ref_model, chunk_size
        self.epsilon_low, self.epsilon_high, self.loss_type = epsilon_low, epsilon_high, loss_type
        self.max_completion_length, self.importance_sampling_level = max_completion_length, importance_sampling_level
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.temperature, self.delta, self.use_bias_correction_kl = temperature, delta, use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.validate, self.backend = validate, backend

    def extra_repr(self):
        # Liger's constructor arguments, in its order.
        names = [p.name for p in inspect.signature(type(self).__init__).parameters.values()
                 if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in names)

    def _labels(self, _input, selected_token_ids, attention_mask):
        if not isinstance(_input, torch.Tensor) or _input.dim() != 3:
            raise ValueError("_input must be a [B, T, D] tensor, got "
                             f"{tuple(_input.shape) if isinstance(_input, torch.Tensor) else type(_input).__name__}")
        for name, value in (("selected_token_ids", selected_token_ids), ("attention_mask", attention_mask)):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(_input.shape[:2]):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a tensor of shape _input.shape[:2] = {tuple(_input.shape[:2])}, "
                                 f"got {got}")
        # Liger multiplies each token's loss by the mask: only a 0/1 mask is a completion mask.
        if self.validate and not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise NotImplementedError("attention_mask holds values other than 0 and 1: per-token loss weights are "
                                      "not supported, only a completion mask")
        mask = attention_mask != 0
        return torch.where(mask, selected_token_ids, self.options.ignore_index), mask

    def _reference(self, labels, ref_per_token_logps, ref_input, ref_weight, ref_bias):
        """The reference log-probs the KL term needs, or None when there is no KL term."""
        if not self.use_ref_model:
            return None
        if ref_per_token_logps is None and ref_input is None:
            raise ValueError("use_ref_model=True needs ref_per_token_logps ([B, T]) or ref_input with ref_weight; "
                             "pass one, or construct with use_ref_model=False")
        if ref_per_token_logps is not None:
            if ref_input is not None:
                warnings.warn("Both ref_per_token_logps and ref_input are given; using ref_per_token_logps, as "
                              "Liger does", stacklevel=3)
            return ref_per_token_logps
        if self.beta == 0:
            return None  # not read: no need to run the reference forward
        if ref_weight is None:
            raise ValueError("ref_input needs ref_weight ([V, D_ref])")
        with torch.no_grad():
            return functional.linear_logprobs.with_options(ref_input, ref_weight, labels, ref_bias,
                                                           options=self.options)

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):
        labels, mask = self._labels(_input, selected_token_ids, attention_mask)
        ref_logps = self._reference(labels, ref_per_token_logps, ref_input, ref_weight, ref_bias)
        with_kl = self.beta != 0 and ref_logps is not None
        if vllm_is_ratio is not None and vllm_is_ratio.dim() == 2 and vllm_is_ratio.shape[-1] == 1:
            vllm_is_ratio = vllm_is_ratio.squeeze(-1)
        if self.loss_type == "luspo" and (with_kl or (vllm_is_ratio is not None and vllm_is_ratio.dim() == 2)):
            raise NotImplementedError("loss_type='luspo' with a reference KL term or a per-token vllm_is_ratio is "
                                      "not supported: Liger sums its per-token loss over the padding too (see "
                                      "fused_pref.compat.liger_grpo); fused_pref.grpo_loss computes TRL's luspo")
        normaliser = (_token_normaliser(mask, num_items_in_batch) if self.loss_type in _TOKEN_NORMALISED
                      else None)
        spec = self.spec
        out = grpo.grpo_loss.with_options(
            _input, lin_weight, labels, bias, advantages=advantages, old_logps=old_per_token_logps,
            ref_logps=ref_logps if with_kl else None, beta=spec.beta if with_kl else 0.0, loss_type=spec.loss_type,
            epsilon_low=spec.epsilon_low, epsilon_high=spec.epsilon_high, delta=spec.delta,
            importance_sampling_level=spec.importance_sampling_level,
            use_bias_correction_kl=spec.use_bias_correction_kl, max_completion_length=spec.max_completion_length,
            num_items_in_batch=normaliser, importance_sampling_ratio=vllm_is_ratio,
            sapo_temperature_pos=spec.sapo_temperature_pos, sapo_temperature_neg=spec.sapo_temperature_neg,
            vespo_k_pos=spec.vespo_k_pos, vespo_lambda_pos=spec.vespo_lambda_pos, vespo_k_neg=spec.vespo_k_neg,
            vespo_lambda_neg=spec.vespo_lambda_neg, options=self.options)
        clip_ratio = _clip_ratio(out.logps, old_per_token_logps, mask, advantages, spec)
        if self.beta == 0:
            return out.loss, (clip_ratio,)
        kl = out.stats["kl"].float() if with_kl else torch.zeros((), device=_input.device)
        return out.loss, (kl, clip_ratio)
