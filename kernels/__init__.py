"""Triton kernels of fused_pref, installed as ``fused_pref.kernels``.

One kernel family: ``linear_lse`` (forward: per-token log-sum-exp and target logit over the whole
vocabulary), ``linear_grad`` (backward: the softmax-minus-onehot tile for one vocabulary chunk) and
``pref_head`` (the per-pair log-sigmoid loss and its derivative).  Logit tiles are computed by the
one helper in ``tiles.py`` so forward and backward round identically.
"""

from .linear_grad import linear_grad_chunk
from .linear_lse import linear_lse_forward
from .pref_head import preference_head_forward
from .tiles import KERNELS_INTERPRETED, TileConfig, interpreter_problem

__all__ = [
    "KERNELS_INTERPRETED",
    "TileConfig",
    "interpreter_problem",
    "linear_grad_chunk",
    "linear_lse_forward",
    "preference_head_forward",
]
