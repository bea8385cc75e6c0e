"""``nn.Module`` wrappers: hyper-parameters in ``__init__``, the tensors in ``forward``.

See :func:`fused_pref.simpo_loss` and :func:`fused_pref.dpo_loss` for the math and the arguments.
"""

import torch

from . import functional


class FusedSimPOLoss(torch.nn.Module):
    """SimPO as a module; ``forward(hidden, weight, labels, bias=None)`` returns a ``PreferenceOutput``."""

    def __init__(self, beta=2.0, gamma=1.0, label_smoothing=0.0, *, ignore_index=-100, softcap=None,
                 validate=True, backend="auto"):
        super().__init__()
        self.options = dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing, ignore_index=ignore_index,
                            softcap=softcap, validate=validate, backend=backend)

    def forward(self, hidden, weight, labels, bias=None):
        return functional.simpo_loss(hidden, weight, labels, bias, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedDPOLoss(torch.nn.Module):
    """DPO as a module; ``forward(hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None,
    ref_weight=None, ref_bias=None)`` returns a ``PreferenceOutput``."""

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, *, ignore_index=-100,
                 softcap=None, validate=True, backend="auto"):
        super().__init__()
        self.options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                            ignore_index=ignore_index, softcap=softcap, validate=validate, backend=backend)

    def forward(self, hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None,
                ref_bias=None):
        return functional.dpo_loss(hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden,
                                   ref_weight=ref_weight, ref_bias=ref_bias, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
