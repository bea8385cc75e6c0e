"""The result of a preference loss: the loss, per-pair log-probs and rewards, and TRL's metrics."""

from dataclasses import dataclass

import torch


@dataclass
class PreferenceOutput:
    """``loss`` is a differentiable scalar; every other field is detached.

    ``chosen_logps`` / ``rejected_logps`` are ``[B]``, summed or length-averaged as the loss uses
    them; rewards are ``beta * (logps - ref)`` for DPO and ``beta * logps`` for reference-free
    losses; ``chosen_logits_mean`` / ``rejected_logits_mean`` are 0-d: the mean logit over the
    vocabulary and over the valid tokens of all chosen (rejected) sequences.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logits_mean: torch.Tensor
    rejected_logits_mean: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Means over pairs under TRL DPOTrainer's names (one host sync)."""
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
        numbers = torch.stack([v.detach().float() for v in values.values()]).tolist()
        return dict(zip(values, numbers))


def preference_output(loss, logps, rewards, token_logit_sums, valid, vocab_size) -> PreferenceOutput:
    """Assemble the output from per-sequence ``logps`` and ``rewards`` ``[2B]`` (chosen first),
    per-sequence sums of logits over vocabulary and valid tokens ``[2B]`` and the valid mask ``[2B, T]``."""
    B = logps.shape[0] // 2
    logps, rewards = logps.detach(), rewards.detach()
    counts = valid.sum(dim=-1).float()
    sums = token_logit_sums.detach().float()

    def logits_mean(part):
        return sums[part].sum() / (counts[part].sum().clamp(min=1) * vocab_size)

    chosen, rejected = slice(0, B), slice(B, 2 * B)
    return PreferenceOutput(
        loss=loss,
        chosen_logps=logps[chosen], rejected_logps=logps[rejected],
        chosen_rewards=rewards[chosen], rejected_rewards=rewards[rejected],
        chosen_logits_mean=logits_mean(chosen), rejected_logits_mean=logits_mean(rejected),
    )
