"""``nn.Module`` wrappers: hyper-parameters in ``__init__``, the batch in ``forward``.

Each module calls the function of the same name in :mod:`fused_pref.functional`, whose docstring
gives the math and the arguments.  Per-batch tensors (``cu_seqlens``, DPO's reference inputs) are
``forward`` arguments.
"""

import torch

from . import functional


class _FusedLoss(torch.nn.Module):
    function = None  # the functional.* callable the module wraps

    def __init__(self, *, ignore_index, softcap, shift, process_group, vocab_start, backward, deterministic,
                 validate, backend, **hyper):
        super().__init__()
        self.options = dict(**hyper, ignore_index=ignore_index, softcap=softcap, shift=shift,
                            process_group=process_group, vocab_start=vocab_start, backward=backward,
                            deterministic=deterministic, validate=validate, backend=backend)

    def forward(self, hidden, weight, labels, bias=None, *, cu_seqlens=None):
        return type(self).function(hidden, weight, labels, bias, cu_seqlens=cu_seqlens, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedSimPOLoss(_FusedLoss):
    """:func:`fused_pref.simpo_loss` as a module; ``forward`` returns a ``PreferenceOutput``."""

    function = staticmethod(functional.simpo_loss)

    def __init__(self, beta=2.0, gamma=1.0, label_smoothing=0.0, sft_weight=0.0, *, ignore_index=-100,
                 softcap=None, shift=False, process_group=None, vocab_start=None, backward="auto",
                 deterministic=None, validate=True, backend="auto"):
        super().__init__(beta=beta, gamma=gamma, label_smoothing=label_smoothing, sft_weight=sft_weight,
                         ignore_index=ignore_index, softcap=softcap, shift=shift, process_group=process_group,
                         vocab_start=vocab_start, backward=backward, deterministic=deterministic,
                         validate=validate, backend=backend)


class FusedCPOLoss(_FusedLoss):
    """:func:`fused_pref.cpo_loss` as a module; ``forward`` returns a ``PreferenceOutput``."""

    function = staticmethod(functional.cpo_loss)

    def __init__(self, beta=0.1, label_smoothing=0.0, sft_weight=1.0, *, ignore_index=-100, softcap=None,
                 shift=False, process_group=None, vocab_start=None, backward="auto", deterministic=None,
                 validate=True, backend="auto"):
        super().__init__(beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight, ignore_index=ignore_index,
                         softcap=softcap, shift=shift, process_group=process_group, vocab_start=vocab_start,
                         backward=backward, deterministic=deterministic, validate=validate, backend=backend)


class FusedORPOLoss(_FusedLoss):
    """:func:`fused_pref.orpo_loss` as a module; ``forward`` returns a ``PreferenceOutput``."""

    function = staticmethod(functional.orpo_loss)

    def __init__(self, beta=0.1, *, ignore_index=-100, softcap=None, shift=False, process_group=None,
                 vocab_start=None, backward="auto", deterministic=None, validate=True, backend="auto"):
        super().__init__(beta=beta, ignore_index=ignore_index, softcap=softcap, shift=shift,
                         process_group=process_group, vocab_start=vocab_start, backward=backward,
                         deterministic=deterministic, validate=validate, backend=backend)


class FusedLinearCrossEntropyLoss(_FusedLoss):
    """:func:`fused_pref.linear_cross_entropy` as a module; ``forward`` returns the loss tensor."""

    function = staticmethod(functional.linear_cross_entropy)

    def __init__(self, reduction="mean", *, ignore_index=-100, softcap=None, shift=False, process_group=None,
                 vocab_start=None, backward="auto", deterministic=None, validate=True, backend="auto"):
        super().__init__(reduction=reduction, ignore_index=ignore_index, softcap=softcap, shift=shift,
                         process_group=process_group, vocab_start=vocab_start, backward=backward,
                         deterministic=deterministic, validate=validate, backend=backend)


class FusedDPOLoss(_FusedLoss):
    """:func:`fused_pref.dpo_loss` as a module; ``forward(hidden, weight, labels, bias=None, *,
    ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, cu_seqlens=None)`` returns a
    ``PreferenceOutput``."""

    function = staticmethod(functional.dpo_loss)

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_weight=0.0, length_normalize=None,
                 discopop_tau=0.05, *, ignore_index=-100, softcap=None, shift=False, process_group=None,
                 vocab_start=None, backward="auto", deterministic=None, validate=True, backend="auto"):
        super().__init__(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, sft_weight=sft_weight,
                         length_normalize=length_normalize, discopop_tau=discopop_tau, ignore_index=ignore_index,
                         softcap=softcap, shift=shift, process_group=process_group, vocab_start=vocab_start,
                         backward=backward, deterministic=deterministic, validate=validate, backend=backend)

    def forward(self, hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, cu_seqlens=None):
        return functional.dpo_loss(hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden,
                                   ref_weight=ref_weight, ref_bias=ref_bias, cu_seqlens=cu_seqlens, **self.options)
