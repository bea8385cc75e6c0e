"""Liger-Kernel's fused-linear loss classes, computed by fused_pref: switch by changing one import.

    - from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    + from fused_pref.compat.liger import LigerFusedLinearDPOLoss

Each class takes Liger's constructor arguments (names, order, defaults) and ``forward`` signature,
weight first: ``forward(lin_weight, _input, target, bias=None, ...)`` with ``_input`` ``[2B, T, D]``
(B chosen sequences, then their B rejected ones) and ``target`` ``[2B, T]`` (already shifted,
``ignore_index`` on prompt and padding).  The preference losses return ``(loss, aux)``::

    aux = (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards[, log_odds_ratio, log_odds_chosen])   # last two: ORPO

and ``LigerFusedLinearCrossEntropyLoss`` returns the loss tensor.  The math is that of the
fused_pref function named below (its docstring has the formula); arguments map as follows.

===============================  ==================================================================
Liger                            fused_pref
===============================  ==================================================================
``_input, lin_weight, target``   ``hidden, weight, labels`` (and ``bias``)
``ignore_index, beta, gamma``    same names
``compute_nll_loss, alpha``      ``sft_weight = alpha if compute_nll_loss else 0`` (the NLL of the
                                 chosen tokens); ORPO's NLL weight is 1, as in Liger
``average_log_prob``             DPO: ``dpo_loss(length_normalize=...)``, the reference log-probs
                                 reduced alike; CPO: with it, CPO is ``simpo_loss(gamma=0)``.
                                 SimPO and ORPO always average, as Liger's base class does
``label_smoothing``              same name: SimPO, CPO; DPO ``robust`` and ``exo_pair`` only
``loss_type, discopop_tau``      ``dpo_loss(loss_type=..., discopop_tau=...)``
``use_ref_model, ref_input,``    ``dpo_loss(ref_logps=...)``: ``ref_input @ ref_weight.T + ref_bias``
``ref_weight, ref_bias``         reduced like the policy, without grad (``ref_bias=None``: no bias);
                                 zeros when ``use_ref_model=False`` (Liger's reference-free DPO)
``reduction, softcap`` (CE)      ``linear_cross_entropy(reduction=..., softcap=...)``
``ce_weight`` (CE)               same name on ``linear_cross_entropy``: per-class weights
``lse_square_scale``,            same names on ``linear_cross_entropy``: the z-loss, label
``label_smoothing`` (CE)         smoothing (with ``ce_weight``: not under ``softcap`` yet)
``return_z_loss``,               same names on ``linear_cross_entropy``: a ``CrossEntropyOutput``
``return_token_accuracy``,       with Liger's fields
``return_predicted_tokens``
``preference_labels``, ``kl``    ``kto_loss(desirable=..., kl=...)``; without ``kl``, TRL's
(KTO)                            ``apo_zero_unpaired`` (what Liger computes then)
``compiled, chunk_size``         nothing (see below)
===============================  ==================================================================

``aux`` follows Liger's definitions, two of which differ from :class:`fused_pref.PreferenceOutput`:
``chosen_logits_mean`` is the mean logit over *every* position of the chosen half, prompt and
padding included (``sum / (B * T * V)``), not over valid tokens only; ``log_odds_ratio`` and
``log_odds_chosen`` are 0-d means over pairs.  ``nll_loss`` is 0 when ``compute_nll_loss=False``.
Logps and rewards are ``[B]``.  Both logit means come from linearity, ``sum_v z_v = h . sum_v w_v
+ sum_v b_v``, in O(B T D + V D): no logits are formed for them either.

No-op arguments, accepted at any value: ``compiled`` (whether Liger ``torch.compile``-s its chunk
loop) and ``chunk_size`` (how many pairs, or CE rows, Liger materialises logits for at a time).
Both only trade Liger's memory against its speed; fused_pref never materialises the logits, so
there is nothing to tune, and the result is the same up to fp32 summation order.

Unsupported, raising ``NotImplementedError`` when set to a value that would change the result:
ORPO ``compute_nll_loss=False`` and ``forward(nll_target=...)``; cross-entropy
``use_token_scaling``, ``label_smoothing`` with ``ce_weight`` and ``softcap`` (``ValueError``) and
``accum_dtype`` other than None /
``torch.float32`` (fused_pref always accumulates in fp32).  Liger ignores some hyper-parameters
outside the setting that uses them; here they must stay at their defaults there (``ValueError``),
so that a value that does nothing never looks as if it did: ``alpha`` without
``compute_nll_loss``, DPO ``label_smoothing`` outside ``robust`` / ``exo_pair`` (elsewhere in
fused_pref and TRL it means cDPO) and ``discopop_tau`` outside ``discopop``.

Extra keyword-only arguments of every class: ``validate=True`` and ``backend="auto"``, as in
:mod:`fused_pref.functional`.  Numerics: fused_pref accumulates in fp32 throughout, where Liger
forms logits in the input dtype; the two agree to fp32 rounding for fp32 inputs.
"""

# Matched against linkedin/Liger-Kernel (read through the public code index; nothing copied):
#   chunked_loss/dpo_loss.py, fused_linear_preference.py: v0.8.2 (tag commit 000be609), the release
#     after PR #1204 (loss types hinge/bco_pair/robust/exo_pair/discopop, label_smoothing,
#     discopop_tau) and PR #1194 (alpha); read as vendored, with its v0.8.2 header, by TRL.
#   chunked_loss/cpo_loss.py @ 9a5d7ba53baf496cfb49f068e47454a5b0a24f1b
#   chunked_loss/orpo_loss.py @ 1472843a0eaaaa613b3394261a86b3be1227dbd9 (nll_target, chunk_size)
#   chunked_loss/simpo_loss.py @ 323fcefbf8675d3c66031d36d5ea9cfb3c463926 (arguments, defaults), with
#     the later (loss, chosen_rewards, rejected_rewards) return of its indexed successors; the
#     trailing chunk_size=1 that CPO/DPO/ORPO have is accepted too (a no-op either way).
#   transformers/fused_linear_cross_entropy.py: the 2026 version with return_predicted_tokens and
#     chunk_size (backend-selected Function, build_flce_apply_args).

import dataclasses
import inspect
import math

import torch

from .. import functional, validation
from ..options import Options
from .liger_grpo import LigerFusedLinearGRPOLoss

__all__ = [
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearCrossEntropyLoss",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearGRPOLoss",
    "LigerFusedLinearKTOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearSimPOLoss",
]

# Liger v0.8.2's DPO loss types.  "ipo" is refused by Liger itself (it wants per-sample lengths).
LIGER_DPO_LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                        "apo_zero", "apo_down", "discopop")


def _check_alpha(alpha, compute_nll_loss):
    validation.check_flag("compute_nll_loss", compute_nll_loss)
    if not validation.is_number(alpha) or not 0.0 <= alpha < math.inf:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if not compute_nll_loss and alpha != 1.0:
        raise ValueError(f"alpha={alpha!r} weighs the NLL term, which compute_nll_loss=False leaves out "
                         "(Liger ignores alpha then); set compute_nll_loss=True or leave alpha at 1.0")


def _check_pairs(_input, target):
    # The messages of fused_pref.functional name hidden / labels: name Liger's arguments here first.
    if not isinstance(_input, torch.Tensor) or _input.dim() != 3:
        raise ValueError("_input must be a [2B, T, D] tensor (B chosen sequences, then B rejected), got "
                         f"{tuple(_input.shape) if isinstance(_input, torch.Tensor) else type(_input).__name__}")
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(_input.shape[:2]):
        raise ValueError(f"target must be a tensor of shape _input.shape[:2] = {tuple(_input.shape[:2])}, got "
                         f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")


def _liger_repr(module):
    """The Liger constructor arguments the module keeps, in signature order."""
    names = [p.name for p in inspect.signature(type(module).__init__).parameters.values()
             if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self" and hasattr(module, p.name)]
    return ", ".join(f"{name}={getattr(module, name)!r}" for name in names)


def _column_sum(weight):
    """``weight.sum(dim=0)`` accumulated in fp32, ``[D]``, a sixteenth of the vocabulary at a time: a
    whole-weight ``sum(dtype=torch.float32)`` would copy a bf16 lm_head to fp32 first on the CPU
    (2.1 GB at Llama-3-8B's head).  On CUDA a block sums without any copy."""
    blocks = weight.split(-(-weight.shape[0] // 16))
    return torch.stack([block.sum(dim=0, dtype=torch.float32) for block in blocks]).sum(dim=0)


def _logits_totals(_input, lin_weight, bias):
    """Each sequence's logits summed over every position and the vocabulary, ``[R]`` fp32, as Liger
    sums them: ``z . 1 = h . (sum_v w_v) + sum_v b_v`` by linearity, no logits formed."""
    with torch.no_grad():
        T = _input.shape[1]
        totals = _input.detach().sum(dim=1, dtype=torch.float32) @ _column_sum(lin_weight.detach())
        if bias is not None:
            totals = totals + T * bias.detach().sum(dtype=torch.float32)
        return totals


def _logits_means(_input, lin_weight, bias):
    """Liger's chosen / rejected logits means: over ``B * T * V`` elements per half."""
    R, T, _ = _input.shape
    B, V = R // 2, lin_weight.shape[0]
    totals = _logits_totals(_input, lin_weight, bias)
    return totals[:B].sum() / (B * T * V), totals[B:].sum() / (B * T * V)


class _LigerPreferenceLoss(torch.nn.Module):
    """What the preference classes share: the no-op knobs, the options and Liger's aux tuple."""

    def __init__(self, *, ignore_index, beta, compiled, chunk_size, validate, backend):
        super().__init__()
        validation.check_flag("compiled", compiled)
        validation.check_positive_int("chunk_size", chunk_size)
        # Checked once, here, and handed to every call as it is.
        self.options = Options(ignore_index=ignore_index, validate=validate, backend=backend)
        self.ignore_index, self.beta = ignore_index, beta
        self.compiled, self.chunk_size = compiled, chunk_size     # no-ops: see the module docstring
        self.validate, self.backend = validate, backend

    def _aux(self, out, lin_weight, _input, target, bias, *, nll, reduction):
        """Liger's aux order.  ``nll``: whether Liger computes the NLL term (else it reports 0)."""
        B = out.chosen_logps.shape[0]
        if not nll:
            nll_loss = torch.zeros((), device=_input.device)
        elif out.nll_loss is not None:
            nll_loss = out.nll_loss
        else:
            # alpha=0 with compute_nll_loss: Liger still reports the NLL, which the loss left out.
            # It is -sum(chosen token logps) / count, recovered from the per-sequence logps.
            counts = (target[:B] != self.ignore_index).sum(-1).float()
            sums = out.chosen_logps * counts if reduction == "mean" else out.chosen_logps
            nll_loss = -sums.sum() / counts.sum().clamp(min=1)
        chosen_mean, rejected_mean = _logits_means(_input, lin_weight, bias)
        return (out.chosen_logps, out.rejected_logps, chosen_mean, rejected_mean, nll_loss,
                out.chosen_rewards, out.rejected_rewards)

    def extra_repr(self):
        return _liger_repr(self)


class LigerFusedLinearSimPOLoss(_LigerPreferenceLoss):
    """Liger's SimPO loss: :func:`fused_pref.simpo_loss` with ``sft_weight = alpha`` under
    ``compute_nll_loss``; log-probs averaged over valid tokens.  Note Liger's defaults (``beta=0.1``,
    ``gamma=0.5``, NLL on) differ from ``fused_pref.simpo_loss``'s.

    ``forward(lin_weight, _input, target, bias=None)`` returns ``(loss, aux)``, see the module docstring.
    """

    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
                 compiled=True, gamma=0.5, chunk_size=1, *, validate=True, backend="auto"):
        super().__init__(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                         validate=validate, backend=backend)
        _check_alpha(alpha, compute_nll_loss)
        validation.check_hyper(beta=beta, label_smoothing=label_smoothing, gamma=gamma)
        self.alpha, self.label_smoothing, self.gamma = alpha, label_smoothing, gamma
        self.compute_nll_loss = compute_nll_loss

    def forward(self, lin_weight, _input, target, bias=None):
        _check_pairs(_input, target)
        out = functional.simpo_loss.with_options(_input, lin_weight, target, bias, beta=self.beta, gamma=self.gamma,
                                                 label_smoothing=self.label_smoothing,
                                                 sft_weight=self.alpha if self.compute_nll_loss else 0.0,
                                                 options=self.options)
        return out.loss, self._aux(out, lin_weight, _input, target, bias, nll=self.compute_nll_loss, reduction="mean")


class LigerFusedLinearCPOLoss(_LigerPreferenceLoss):
    """Liger's CPO loss: :func:`fused_pref.cpo_loss` (summed log-probs) with ``sft_weight = alpha``
    under ``compute_nll_loss``; with ``average_log_prob=True`` it is :func:`fused_pref.simpo_loss`
    with ``gamma=0``, which is the same loss on averaged log-probs.

    ``forward(lin_weight, _input, target, bias=None)`` returns ``(loss, aux)``, see the module docstring.
    """

    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
                 compiled=True, average_log_prob=False, chunk_size=1, *, validate=True, backend="auto"):
        super().__init__(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                         validate=validate, backend=backend)
        _check_alpha(alpha, compute_nll_loss)
        validation.check_flag("average_log_prob", average_log_prob)
        validation.check_hyper(beta=beta, label_smoothing=label_smoothing)
        self.alpha, self.label_smoothing, self.compute_nll_loss = alpha, label_smoothing, compute_nll_loss
        self.average_log_prob = average_log_prob

    def forward(self, lin_weight, _input, target, bias=None):
        _check_pairs(_input, target)
        hyper = dict(beta=self.beta, label_smoothing=self.label_smoothing,
                     sft_weight=self.alpha if self.compute_nll_loss else 0.0)
        if self.average_log_prob:
            out = functional.simpo_loss.with_options(_input, lin_weight, target, bias, gamma=0.0, **hyper,
                                                     options=self.options)
        else:
            out = functional.cpo_loss.with_options(_input, lin_weight, target, bias, **hyper, options=self.options)
        reduction = "mean" if self.average_log_prob else "sum"
        return out.loss, self._aux(out, lin_weight, _input, target, bias, nll=self.compute_nll_loss,
                                   reduction=reduction)


class LigerFusedLinearORPOLoss(_LigerPreferenceLoss):
    """Liger's ORPO loss: :func:`fused_pref.orpo_loss` (NLL of the chosen tokens plus the odds-ratio
    term, log-probs averaged).  ``aux`` ends with ``log_odds_ratio`` and ``log_odds_chosen``, 0-d
    means over pairs.  ``compute_nll_loss=False`` and ``nll_target`` raise ``NotImplementedError``.

    ``forward(lin_weight, _input, target, bias=None, nll_target=None)`` returns ``(loss, aux)``.
    """

    def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=True, compiled=True, chunk_size=1, *,
                 validate=True, backend="auto"):
        super().__init__(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                         validate=validate, backend=backend)
        validation.check_flag("compute_nll_loss", compute_nll_loss)
        if not compute_nll_loss:
            raise NotImplementedError("compute_nll_loss=False (ORPO without its NLL term) is not supported: "
                                      "fused_pref.orpo_loss always adds the NLL of the chosen tokens")
        validation.check_hyper(beta=beta, label_smoothing=0.0)
        self.compute_nll_loss = compute_nll_loss

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        if nll_target is not None:
            raise NotImplementedError("nll_target is not supported: fused_pref.orpo_loss takes the NLL of the "
                                      "chosen half of target itself")
        _check_pairs(_input, target)
        out = functional.orpo_loss.with_options(_input, lin_weight, target, bias, beta=self.beta, options=self.options)
        aux = self._aux(out, lin_weight, _input, target, bias, nll=True, reduction="mean")
        return out.loss, (*aux, out.extra["log_odds_ratio"].mean(), out.extra["log_odds_chosen"].mean())


class LigerFusedLinearDPOLoss(_LigerPreferenceLoss):
    """Liger's DPO loss: :func:`fused_pref.dpo_loss` with the reference log-probs taken from
    ``ref_input @ ref_weight.T + ref_bias`` (no grad; ``ref_bias=None`` means no bias), or zero when
    ``use_ref_model=False``; ``length_normalize = average_log_prob``; ``sft_weight = alpha`` under
    ``compute_nll_loss``.  ``loss_type``: Liger's.

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)``
    returns ``(loss, aux)``; without ``use_ref_model`` the reference arguments are not read, as in Liger.
    """

    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, compute_nll_loss=False, compiled=True,
                 use_ref_model=True, average_log_prob=False, chunk_size=1, loss_type="sigmoid",
                 label_smoothing=0.0, discopop_tau=0.05, *, validate=True, backend="auto"):
        super().__init__(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                         validate=validate, backend=backend)
        _check_alpha(alpha, compute_nll_loss)
        validation.check_flag("use_ref_model", use_ref_model)
        validation.check_flag("average_log_prob", average_log_prob)
        if loss_type not in LIGER_DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of Liger's {LIGER_DPO_LOSS_TYPES}, got {loss_type!r} "
                             "(fused_pref.dpo_loss has ipo, aot and aot_pair too)")
        validation.check_hyper(beta=beta, label_smoothing=label_smoothing)
        if loss_type == "exo_pair" and not label_smoothing > 0:
            raise ValueError("loss_type='exo_pair' needs label_smoothing > 0, as in Liger (log(eps) is -inf at 0)")
        if loss_type == "robust" and not label_smoothing < 0.5:
            raise ValueError(f"loss_type='robust' needs label_smoothing in [0, 0.5), got {label_smoothing!r}")
        if loss_type not in ("robust", "exo_pair") and label_smoothing != 0.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} has no effect on loss_type={loss_type!r} in "
                             "Liger (only robust and exo_pair use it); leave it at 0.0, or use "
                             "fused_pref.dpo_loss(label_smoothing=...) for cDPO's smoothed sigmoid")
        if not (validation.is_number(discopop_tau) and 0 < discopop_tau < math.inf):
            raise ValueError(f"discopop_tau must be a positive number, got {discopop_tau!r}")
        if loss_type != "discopop" and discopop_tau != 0.05:
            raise ValueError(f"discopop_tau={discopop_tau!r} only affects loss_type='discopop'; leave it at 0.05")
        self.alpha, self.compute_nll_loss, self.use_ref_model = alpha, compute_nll_loss, use_ref_model
        self.average_log_prob, self.loss_type = average_log_prob, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        _check_pairs(_input, target)
        reduction = "mean" if self.average_log_prob else "sum"
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("use_ref_model=True needs ref_input ([2B, T, D_ref]) and ref_weight ([V, D_ref]); "
                                 "pass them, or construct with use_ref_model=False for reference-free DPO")
            if not isinstance(ref_input, torch.Tensor) or tuple(ref_input.shape[:-1]) != tuple(target.shape):
                raise ValueError(f"ref_input must be [2B, T, D_ref] with [2B, T] = {tuple(target.shape)}")
            with torch.no_grad():
                # validate=False: the policy call below checks the same labels.
                ref_logps = functional.sequence_logprobs.with_options(
                    ref_input, ref_weight, target, ref_bias, reduction=reduction,
                    options=dataclasses.replace(self.options, validate=False))
        else:
            ref_logps = torch.zeros(target.shape[0], device=_input.device)
        out = functional.dpo_loss.with_options(_input, lin_weight, target, bias, ref_logps=ref_logps, beta=self.beta,
                                               loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                               sft_weight=self.alpha if self.compute_nll_loss else 0.0,
                                               length_normalize=self.average_log_prob,
                                               discopop_tau=self.discopop_tau, options=self.options)
        return out.loss, self._aux(out, lin_weight, _input, target, bias, nll=self.compute_nll_loss,
                                   reduction=reduction)


class LigerFusedLinearKTOLoss(torch.nn.Module):
    """Liger's KTO loss: :func:`fused_pref.kto_loss` on summed log-probs, unweighted.  With ``kl``
    it is ``loss_type="kto"`` with that reference point; without, Liger computes ``1 - s(beta r)``
    on desirable and ``1 - s(-beta r) = s(beta r)`` on undesirable sequences, TRL's
    ``apo_zero_unpaired``.  The reference log-probs come from ``ref_input @ ref_weight.T +
    ref_bias`` without grad, or are zero without ``use_ref_model`` (Liger's default here).

    ``forward(_input, lin_weight, target, bias=None, preference_labels=None, ref_input=None,
    ref_weight=None, ref_bias=None, kl=None)``, ``_input`` first as in Liger's KTO, ``[R, T, D]``,
    returns ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
    chosen_rewards_sum, rejected_rewards_sum))``: sums over each side's sequences, the logits over
    every position (prompt and padding included) and the vocabulary, as Liger's.
    ``average_log_prob=True`` raises ``NotImplementedError``: TRL's KTO sums the log-probs.
    """

    def __init__(self, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=False, average_log_prob=False,
                 chunk_size=1, *, validate=True, backend="auto"):
        super().__init__()
        validation.check_flag("compiled", compiled)
        validation.check_flag("use_ref_model", use_ref_model)
        validation.check_flag("average_log_prob", average_log_prob)
        validation.check_positive_int("chunk_size", chunk_size)
        validation.check_hyper(beta=beta, label_smoothing=0.0)
        if average_log_prob:
            raise NotImplementedError("average_log_prob=True is not supported: fused_pref.kto_loss sums the "
                                      "log-probs, as TRL's KTOTrainer")
        self.options = Options(ignore_index=ignore_index, validate=validate, backend=backend)
        self.ignore_index, self.beta, self.use_ref_model, self.average_log_prob = (ignore_index, beta, use_ref_model,
                                                                                   average_log_prob)
        self.compiled, self.chunk_size = compiled, chunk_size     # no-ops: see the module docstring
        self.validate, self.backend = validate, backend

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None, ref_weight=None,
                ref_bias=None, kl=None):
        if preference_labels is None:
            raise ValueError("preference_labels ([R] bool, True for a desirable completion) is required")
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("use_ref_model=True needs ref_input ([R, T, D_ref]) and ref_weight ([V, D_ref])")
            reference = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
        else:
            reference = dict(ref_logps=torch.zeros(target.shape[0], device=_input.device))
        out = functional.kto_loss.with_options(_input, lin_weight, target, bias, desirable=preference_labels, kl=kl,
                                               beta=self.beta, loss_type="kto" if kl is not None else
                                               "apo_zero_unpaired", options=self.options, **reference)
        desirable = out.desirable.float()
        totals = _logits_totals(_input, lin_weight, bias)
        sides = (desirable, 1 - desirable)
        return out.loss, tuple((values * side).sum() for values in (out.logps, totals, out.rewards)
                               for side in sides)

    def extra_repr(self):
        return _liger_repr(self)


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """Liger's fused linear cross-entropy: :func:`fused_pref.linear_cross_entropy`.

    ``forward(lin_weight, _input, target, bias=None)``, ``_input`` ``[N, D]`` (or ``[R, T, D]``),
    returns the loss (``reduction``: ``"mean"`` over valid tokens, ``"sum"``, ``"none"``), or with
    ``return_token_accuracy`` / ``return_predicted_tokens`` a ``CrossEntropyOutput`` with Liger's
    fields (``fused_pref.outputs.CrossEntropyOutput``).  Supported: ``ignore_index``, ``reduction``,
    ``softcap``, ``ce_weight``, ``lse_square_scale``, ``label_smoothing``, ``return_z_loss``,
    ``return_token_accuracy``, ``return_predicted_tokens``; no-ops: ``chunk_size``,
    ``accum_dtype`` None or ``torch.float32``.  Everything else raises ``NotImplementedError`` away
    from its default.
    """

    def __init__(self, ce_weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
                 reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None, use_token_scaling=False,
                 return_token_accuracy=False, return_predicted_tokens=False, chunk_size=None, *, validate=True,
                 backend="auto"):
        super().__init__()
        self.options = Options(ignore_index=ignore_index, softcap=softcap, validate=validate, backend=backend)
        validation.check_reduction(reduction, "cross_entropy")
        validation.check_positive_int("chunk_size", chunk_size, allow_none=True)
        unsupported = (  # (name, value, whether it changes the result, what it would need)
            ("use_token_scaling", use_token_scaling, bool(use_token_scaling), "per-token probability scaling"),
            ("accum_dtype", accum_dtype, accum_dtype not in (None, torch.float32),
             "accumulation dtype but fp32"),
        )
        for name, value, is_set, what in unsupported:
            if is_set:
                shown = "<tensor>" if isinstance(value, torch.Tensor) else repr(value)
                raise NotImplementedError(f"{name}={shown} is not supported: fused_pref.linear_cross_entropy has no "
                                          f"{what}")
        validation.check_class_weights(ce_weight, None, None)
        validation.check_cross_entropy_terms(label_smoothing, lse_square_scale, return_z_loss, ce_weight, self.options)
        validation.check_token_stats({"return_token_accuracy": return_token_accuracy,
                                      "return_predicted_tokens": return_predicted_tokens})
        self.ignore_index, self.reduction, self.softcap = ignore_index, reduction, softcap
        self.return_token_accuracy, self.return_predicted_tokens = return_token_accuracy, return_predicted_tokens
        self.ce_weight, self.lse_square_scale, self.label_smoothing = ce_weight, lse_square_scale, label_smoothing
        self.return_z_loss = return_z_loss
        self.accum_dtype, self.chunk_size = accum_dtype, chunk_size   # no-ops: see the module docstring
        self.validate, self.backend = validate, backend

    def forward(self, lin_weight, _input, target, bias=None):
        return functional.linear_cross_entropy.with_options(_input, lin_weight, target, bias, reduction=self.reduction,
                                                            ce_weight=self.ce_weight,
                                                            label_smoothing=self.label_smoothing,
                                                            lse_square_scale=self.lse_square_scale,
                                                            return_z_loss=self.return_z_loss,
                                                            return_token_accuracy=self.return_token_accuracy,
                                                            return_predicted_tokens=self.return_predicted_tokens,
                                                            options=self.options)

    def extra_repr(self):
        return _liger_repr(self)
