"""The results that are more than a tensor: a preference loss's (the loss, per-pair log-probs and
rewards, TRL's metrics) and per-token log-probs with their statistics."""

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree


def pytree_output(cls):
    """Register a result dataclass with torch's pytree, so that what looks for a result's tensors
    finds the ones inside: the hooks that FSDP2 and DeepSpeed put on the output layer, whose
    forward ``integrations.hf`` runs the loss as (:func:`fused_pref.integrations.hf.run_as_output_layer`)."""
    if cls not in pytree.SUPPORTED_NODES:      # registered already (torch.export.register_dataclass)
        pytree.register_dataclass(cls)
    return cls


@pytree_output
@dataclass
class TokenLogprobs:
    """What :func:`fused_pref.linear_logprobs` returns when a statistic is asked for, each of the
    shape of ``labels`` (None unless asked for):

    ``logp``: fp32 log-probabilities of the labels, 0 at ignored positions (as without statistics).
    ``entropy``: fp32 entropy of the softmax the log-probs come from, ``lse - sum_v p_v z_v``; 0 at
    ignored positions.  Differentiable: an entropy bonus or penalty gets its exact gradient through
    the same backward kernel as the log-probs.
    ``token_accuracy``: bool, whether the label is the argmax (the first column holding the max, as
    ``torch.argmax``); False at ignored positions.  Its mean over valid tokens is TRL's
    ``mean_token_accuracy``.
    ``argmax``: int64 argmax column, -1 at ignored positions.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    argmax: torch.Tensor | None = None


@pytree_output
@dataclass
class CrossEntropyOutput:
    """What :func:`fused_pref.linear_cross_entropy` returns when ``return_z_loss``,
    ``return_token_accuracy`` or ``return_predicted_tokens`` is set, with Liger-Kernel's field
    names: ``loss`` as without them (the z-loss included); ``z_loss`` the z-loss term, detached,
    reduced as the loss (0 when ``lse_square_scale`` is 0); ``token_accuracy`` the fraction (0-d
    fp32) of valid tokens whose label is the argmax (TRL's ``mean_token_accuracy``; 0 when none is
    valid), or under ``reduction="none"`` each token's 1.0 or 0.0 (fp32, shape of ``labels``, 0
    where ignored), as Liger-Kernel's; ``predicted_tokens`` the per-token argmax (int64, shape of ``labels``, -1 where
    ignored).  Fields not asked for are None."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None


def cross_entropy_output(loss, argmax, targets, valid, reduction, *, token_accuracy: bool, predicted_tokens: bool,
                         z_loss=None) -> CrossEntropyOutput:
    """The output from a loss, the per-token argmax (-1 where ignored; empty when neither statistic
    is asked for), targets and valid mask, the loss's reduction, and the z-loss term if asked for."""
    correct = None
    if token_accuracy:
        correct = ((argmax == targets) & valid).float()
        if reduction != "none":
            correct = correct.sum() / valid.sum().clamp(min=1)
    return CrossEntropyOutput(loss, z_loss, correct, argmax if predicted_tokens else None)


@pytree_output
@dataclass
class PreferenceOutput:
    """``loss`` is a differentiable scalar; every other field is detached.

    ``chosen_logps`` / ``rejected_logps`` are ``[B]``, summed or length-averaged as the loss uses
    them; rewards are ``beta * (logps - ref)`` for losses with a reference model and ``beta * logps``
    for reference-free ones; ``chosen_logits_mean`` / ``rejected_logits_mean`` are 0-d: the mean
    logit over the vocabulary and over the valid tokens of all chosen (rejected) sequences.
    ``nll_loss`` is the mean NLL of the chosen tokens when the loss includes it; ``extra`` holds
    loss-specific metrics under their trainer's names (ORPO's ``log_odds_ratio``, ``log_odds_chosen``).
    With ``token_metrics=True``, TRL DPOTrainer's two per-token metrics, 0-d fp32: ``entropy``, the
    softmax's entropy averaged over the valid tokens of every sequence, and ``mean_token_accuracy``,
    the fraction of the chosen sequences' valid tokens whose label is the argmax (0 when none is valid).
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logits_mean: torch.Tensor
    rejected_logits_mean: torch.Tensor
    nll_loss: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    entropy: torch.Tensor | None = None
    mean_token_accuracy: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """Means over pairs under TRL's names (one host sync)."""
        values = {
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(),
            # TRL counts strict wins: a tie is not an accurate pair.
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float().mean(),
            "rewards/margins": (self.chosen_rewards - self.rejected_rewards).mean(),
            "logps/chosen": self.chosen_logps.mean(),
            "logps/rejected": self.rejected_logps.mean(),
            "logits/chosen": self.chosen_logits_mean,
            "logits/rejected": self.rejected_logits_mean,
        }
        if self.nll_loss is not None:
            values["nll_loss"] = self.nll_loss
        values.update({name: value.mean() for name, value in self.extra.items()})
        values.update({name: value for name, value in (("entropy", self.entropy),
                                                       ("mean_token_accuracy", self.mean_token_accuracy))
                       if value is not None})
        numbers = torch.stack([v.detach().float() for v in values.values()]).tolist()
        return dict(zip(values, numbers))


def preference_output(loss, logps, rewards, logit_sums, counts, vocab_size, *, nll_loss=None,
                      extra=None, entropy_sums=None, correct_counts=None) -> PreferenceOutput:
    """Assemble the output from per-sequence ``logps``, ``rewards``, sums of logits over vocabulary
    and valid tokens, and valid-token ``counts``, all ``[2B]`` with the chosen sequences first; with
    ``entropy_sums`` and ``correct_counts``, the per-sequence sums of the entropy and counts of argmax hits too."""
    B = logps.shape[0] // 2
    logps, rewards, sums, counts = logps.detach(), rewards.detach(), logit_sums.detach().float(), counts.float()

    def logits_mean(part):
        return sums[part].sum() / (counts[part].sum().clamp(min=1) * vocab_size)

    chosen, rejected = slice(0, B), slice(B, 2 * B)
    return PreferenceOutput(
        loss=loss,
        chosen_logps=logps[chosen], rejected_logps=logps[rejected],
        chosen_rewards=rewards[chosen], rejected_rewards=rewards[rejected],
        chosen_logits_mean=logits_mean(chosen), rejected_logits_mean=logits_mean(rejected),
        nll_loss=None if nll_loss is None else nll_loss.detach(),
        extra={k: v.detach() for k, v in (extra or {}).items()},
        entropy=None if entropy_sums is None else entropy_sums.detach().float().sum() / counts.sum().clamp(min=1),
        mean_token_accuracy=None if correct_counts is None else
        correct_counts[chosen].float().sum() / counts[chosen].sum().clamp(min=1),
    )
