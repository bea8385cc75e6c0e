"""fused_pref: preference and cross-entropy losses over ``hidden @ lm_head.T`` that never
materialize the ``[tokens, vocab]`` logits.  Triton kernels on CUDA (and on the CPU under
``TRITON_INTERPRET=1``), with a plain-PyTorch twin of every function in ``fused_pref.reference``.
"""

from . import reference
from .functional import (cpo_loss, dpo_loss, kto_loss, linear_cross_entropy, linear_logprobs, orpo_loss,
                         sequence_logprobs, simpo_loss)
from .grpo import GRPOOutput, grpo_loss
from .kto import KTOOutput
from .modules import (FusedCPOLoss, FusedDPOLoss, FusedGRPOLoss, FusedKTOLoss, FusedLinearCrossEntropyLoss,
                      FusedORPOLoss, FusedSimPOLoss)
from .outputs import PreferenceOutput

__version__ = "0.1.0"

__all__ = [
    "FusedCPOLoss",
    "FusedDPOLoss",
    "FusedGRPOLoss",
    "FusedKTOLoss",
    "FusedLinearCrossEntropyLoss",
    "FusedORPOLoss",
    "FusedSimPOLoss",
    "GRPOOutput",
    "KTOOutput",
    "PreferenceOutput",
    "cpo_loss",
    "dpo_loss",
    "grpo_loss",
    "kto_loss",
    "linear_cross_entropy",
    "linear_logprobs",
    "orpo_loss",
    "reference",
    "sequence_logprobs",
    "simpo_loss",
]
