"""KTO's math on per-sequence log-probs, shared by the fused path and the reference, and its output.

KTO (Ethayarajh et al., 2024) as TRL's KTOTrainer computes it (``KTOTrainer._compute_loss``, TRL
1.16): sequences are unpaired, each labelled desirable or undesirable, with summed log-probs
``S`` under the policy and ``Ref`` under the reference model, and ``r = S - Ref``::

    kto                desirable:  1 - s(beta (r - kl))      undesirable:  1 - s(beta (kl - r))
    apo_zero_unpaired  desirable:  1 - s(beta r)             undesirable:  s(beta r)

each times ``desirable_weight`` or ``undesirable_weight``, and ``loss`` their mean over sequences.
``kl`` is KTO's reference point: TRL estimates it without gradient from mismatched (prompt,
completion) pairs of the batch, ``mean(S_KL - Ref_KL)`` over them (gathered over processes),
clamped at 0; it is a constant of the loss.  The per-sequence loss is O(R) PyTorch: its gradient
reaches the fused backward kernel as each token's ``dLoss/dlogp``.
"""

import math
from dataclasses import dataclass

import torch

from . import validation
from .outputs import pytree_output

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class KTOSpec:
    loss_type: str
    beta: float
    desirable_weight: float
    undesirable_weight: float


def kto_spec(*, loss_type, beta, desirable_weight, undesirable_weight) -> KTOSpec:
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    validation.check_hyper(beta=beta, label_smoothing=0.0)
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not validation.is_number(value) or not 0.0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return KTOSpec(loss_type, float(beta), float(desirable_weight), float(undesirable_weight))


def check_unpaired(desirable, kl, num_sequences, device, spec: KTOSpec):
    """``desirable``: a bool ``[R]`` on ``device``; ``kl``: a finite number or 0-d tensor, or None
    (0, and only for ``apo_zero_unpaired``, which has no reference point)."""
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        raise TypeError("desirable must be a bool torch.Tensor [R] (True: a desirable completion), got "
                        + (str(desirable.dtype) if isinstance(desirable, torch.Tensor) else type(desirable).__name__))
    if tuple(desirable.shape) != (num_sequences,):
        raise ValueError(f"desirable must be [R] = [{num_sequences}], got shape {tuple(desirable.shape)}")
    if desirable.device != device:
        raise ValueError(f"desirable is on {desirable.device}, hidden on {device}")
    if kl is None:
        if spec.loss_type == "kto":
            raise ValueError("loss_type='kto' needs kl, the reference point: mean(S_KL - Ref_KL) over mismatched "
                             "completions, without gradient, clamped at 0 (TRL's KTOTrainer); pass 0.0 to drop it")
        return
    if isinstance(kl, torch.Tensor):
        if kl.numel() != 1 or not kl.dtype.is_floating_point:
            raise ValueError(f"kl must be a number or a one-element floating tensor, got shape {tuple(kl.shape)} "
                             f"{kl.dtype}")
    elif not validation.is_number(kl) or not -math.inf < kl < math.inf:     # traceable (check_hyper)
        raise ValueError(f"kl must be a finite number or a one-element tensor, got {kl!r}")
    if spec.loss_type == "apo_zero_unpaired":
        raise ValueError("loss_type='apo_zero_unpaired' has no KL reference point: leave kl=None")


def kto_losses(logps, ref_logps, desirable, kl, spec: KTOSpec) -> torch.Tensor:
    """Per-sequence weighted losses ``[R]`` (see the module docstring)."""
    logratios = logps - ref_logps
    beta = spec.beta
    # s(x) as exp(log s(x)), 1 - s(x) as s(-x): their gradient s(x) s(-x) then keeps fp32's relative
    # precision.  TRL's 1 - s(x), and s(x)'s own backward s (1 - s), cancel in 1 - s: at |x| = 15
    # (rewards 15 apart are common) the gradient of that sequence came out 20% off.
    if spec.loss_type == "kto":
        kl = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach().reshape(())
        margins = beta * torch.where(desirable, kl - logratios, logratios - kl)
    else:
        margins = torch.where(desirable, -beta * logratios, beta * logratios)
    losses = torch.exp(torch.nn.functional.logsigmoid(margins))
    return torch.where(desirable, spec.desirable_weight * losses, spec.undesirable_weight * losses)


@pytree_output
@dataclass
class KTOOutput:
    """``loss`` is a differentiable scalar; the rest is detached, per sequence ``[R]`` unless noted.

    ``logps`` the summed log-probs, ``rewards`` ``beta * (logps - Ref)``, ``desirable`` the labels,
    ``kl`` the reference point used (0-d; 0 for ``apo_zero_unpaired``), ``logit_sums`` each
    sequence's sum of logits over the vocabulary and its valid tokens, ``counts`` its valid
    tokens, ``vocab_size``; with ``token_metrics=True``, ``entropy_sums`` each sequence's sum of
    the per-token entropy.  ``metrics()`` gives TRL KTOTrainer's logged values for this batch.
    """

    loss: torch.Tensor
    logps: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor
    kl: torch.Tensor
    logit_sums: torch.Tensor
    counts: torch.Tensor
    vocab_size: object
    entropy_sums: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """TRL's names: ``kl``, ``rewards/chosen`` / ``rejected`` and ``logps/chosen`` / ``rejected``
        (means over the desirable / undesirable sequences, when there are any), ``rewards/margins``
        (when both are), ``logits/chosen`` / ``rejected`` (means over their valid tokens and the
        vocabulary), ``entropy`` (over every valid token, with ``token_metrics``).  One host sync."""
        halves = {"chosen": self.desirable, "rejected": ~self.desirable}
        counts, sums = self.counts.float(), self.logit_sums.float()
        values = {"kl": self.kl.reshape(())}
        numbers = {name: mask.sum() for name, mask in halves.items()}
        tokens = {name: counts[mask].sum() for name, mask in halves.items()}
        for name, mask in halves.items():
            values[f"rewards/{name}"] = self.rewards[mask].sum()
            values[f"logps/{name}"] = self.logps[mask].sum()
            values[f"logits/{name}"] = sums[mask].sum() / self.vocab_size
        if self.entropy_sums is not None:
            values["entropy"] = self.entropy_sums.float().sum()
        stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]
                              + [numbers["chosen"].float(), numbers["rejected"].float(),
                                 tokens["chosen"], tokens["rejected"], counts.sum()]).tolist()
        raw = dict(zip(values, stacked))
        n_chosen, n_rejected, t_chosen, t_rejected, t_all = stacked[len(values):]
        out = {"kl": raw["kl"]}
        if self.entropy_sums is not None:
            out["entropy"] = raw["entropy"] / t_all if t_all > 0 else 0.0
        for name, tokens_, number in (("chosen", t_chosen, n_chosen), ("rejected", t_rejected, n_rejected)):
            if tokens_ > 0:
                out[f"logits/{name}"] = raw[f"logits/{name}"] / tokens_
            if number > 0:
                out[f"rewards/{name}"] = raw[f"rewards/{name}"] / number
                out[f"logps/{name}"] = raw[f"logps/{name}"] / number
        if n_chosen > 0 and n_rejected > 0:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def kto_output(loss, logps, ref_logps, desirable, kl, logit_sums, counts, vocab_size, spec: KTOSpec,
               entropy_sums=None) -> KTOOutput:
    kl = torch.zeros((), device=logps.device) if kl is None else torch.as_tensor(kl, device=logps.device)
    logps = logps.detach()
    return KTOOutput(loss, logps, spec.beta * (logps - ref_logps), desirable, kl.detach().float().reshape(()),
                     logit_sums.detach(), counts, vocab_size,
                     None if entropy_sums is None else entropy_sums.detach())
