"""What a preference loss is made of, shared by the fused path and the reference.

A loss is a head over per-sequence log-probs (see ``kernels/pref_head.py`` for every formula),
the reduction those log-probs use ("sum" or "mean" over valid tokens), whether a reference
model enters, and an optional NLL term on the chosen tokens.  ``PreferenceSpec`` carries exactly
that; ``dpo_spec`` & co. build it from the public arguments and validate them.
"""

from dataclasses import dataclass

import torch

from . import validation

# TRL DPOTrainer's loss types.  "bco_pair" is TRL 1.x's stateless form; TRL 0.x subtracted a
# running mean of the rewards across steps, trainer state that a loss function cannot hold.
DPO_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "hinge", "ipo", "sppo_hard", "nca_pair", "bco_pair",
                  "aot", "aot_pair", "apo_zero", "apo_down", "discopop")
# Those that sort the log-ratios over the whole batch: each pair's gradient depends on every pair's.
SORTING_LOSS_TYPES = ("aot", "aot_pair")


@dataclass(frozen=True)
class PreferenceSpec:
    head: str                  # a LOSS_IDS key of kernels/pref_head.py
    reduction: str             # "sum" or "mean" log-probs per sequence
    beta: float
    gamma: float = 0.0
    label_smoothing: float = 0.0
    tau: float = 1.0
    sft_weight: float = 0.0    # weight of the NLL of the chosen tokens added to the loss
    sort: str | None = None    # "aot" / "aot_pair": sort log-ratios over the batch first
    uses_reference: bool = False

    def __post_init__(self):
        # The numbers reach a kernel launch, which takes Python floats: a NumPy scalar handed to a
        # Liger-compatible module's constructor (which calls the functions' .with_options) is one.
        for name in ("beta", "gamma", "label_smoothing", "tau", "sft_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))


def simpo_spec(*, beta, gamma, label_smoothing, sft_weight):
    validation.check_hyper(beta=beta, label_smoothing=label_smoothing, gamma=gamma, sft_weight=sft_weight)
    return PreferenceSpec("sigmoid", "mean", beta, gamma, label_smoothing, sft_weight=sft_weight)


def cpo_spec(*, beta, label_smoothing, sft_weight):
    validation.check_hyper(beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight)
    return PreferenceSpec("sigmoid", "sum", beta, 0.0, label_smoothing, sft_weight=sft_weight)


def orpo_spec(*, beta):
    validation.check_hyper(beta=beta, label_smoothing=0.0)
    # ORPO's loss is NLL(chosen) - beta * mean log s(log-odds): the NLL always has weight 1.
    return PreferenceSpec("odds_ratio", "mean", beta, sft_weight=1.0)


def dpo_spec(*, loss_type, beta, label_smoothing, sft_weight, length_normalize, discopop_tau):
    validation.check_hyper(beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight)
    validation.check_dpo_hyper(loss_type=loss_type, label_smoothing=label_smoothing, length_normalize=length_normalize,
                               discopop_tau=discopop_tau, loss_types=DPO_LOSS_TYPES)
    if length_normalize is None:
        # TRL averages the log-probs over completion tokens for IPO only.
        length_normalize = loss_type == "ipo"
    sort = loss_type if loss_type in SORTING_LOSS_TYPES else None
    head = "sigmoid" if sort else loss_type
    return PreferenceSpec(head, "mean" if length_normalize else "sum", beta, 0.0, label_smoothing,
                          tau=discopop_tau, sft_weight=sft_weight, sort=sort, uses_reference=True)


def odds_ratio_metrics(chosen, rejected) -> dict:
    """ORPO's logged quantities, as TRL's ORPOTrainer names them (per pair; means are taken later)."""
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    return {"log_odds_ratio": torch.nn.functional.logsigmoid(log_odds), "log_odds_chosen": log_odds}
