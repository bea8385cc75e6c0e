"""Triton kernels of fused_pref, installed as ``fused_pref.kernels``; the library imports them from here.

Each module is one kernel stage with its launcher below it:

- ``linear_lse``: the forward, per-token log-sum-exp and target logit over the whole vocabulary
  (``linear_lse_forward``);
- ``linear_grad``: the default backward, V-chunked, a ``dz`` workspace of at most
  ``WORKSPACE_BYTES`` and two cuBLAS products per chunk (``linear_grad_backward``);
- ``cross_entropy_block``: each row's ``-logp`` (and sum of logits, and token statistics) and ``dz`` over a
  block of fp32 logits that cuBLAS wrote, for the gradient-in-forward mode (``fused_pref.gradient_in_forward``)
  and the "cublas" tile plan's forward (its lse and target logit apart);
- ``products``: cuBLAS products added into fp32 accumulators (``d_hidden`` over the backward's
  chunks, ``d_weight`` over the gradient-in-forward mode's blocks), on CUDA;
- ``pref_head``: the per-pair preference loss and its derivatives (``preference_head_forward``);
- ``tiles``: what they share, the tile plans among it (``tile_plan`` picks one for the calls made
  inside it, ``active_plan`` names the one in force).  The logits tile ``softcap(h @ w.T + b) / T``
  has one helper, so forward and backward round identically; ``KERNELS_INTERPRETED`` says whether Triton's interpreter runs
  the kernels, ``interpreter_problem`` why it cannot with the installed versions.

Each stage module also states its ahead-of-time builds beside its launcher (``aot_specs``), which
``python -m fused_pref kernels`` (``fused_pref/tools/aot.py``) compiles for sm_80 and sm_90.
"""

from .linear_grad import linear_grad_backward
from .linear_lse import linear_lse_forward
from .pref_head import preference_head_forward
from .tiles import (DEFAULT_PLAN, KERNELS_INTERPRETED, WORKSPACE_BYTES, active_plan, interpreter_problem, tile_plan,
                    triton_interprets)

__all__ = [
    "DEFAULT_PLAN",
    "KERNELS_INTERPRETED",
    "WORKSPACE_BYTES",
    "active_plan",
    "interpreter_problem",
    "linear_grad_backward",
    "linear_lse_forward",
    "preference_head_forward",
    "tile_plan",
    "triton_interprets",
]
