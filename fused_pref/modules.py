"""``nn.Module`` wrappers: hyper-parameters and options in ``__init__``, the batch in ``forward``.

Each module calls the function of the same name in :mod:`fused_pref.functional`, whose docstring
gives the math and the arguments.  The constructor takes the loss's hyper-parameters and every
option of :class:`fused_pref.options.Options` but the per-batch ``cu_seqlens``, which ``forward``
takes (as it takes DPO's reference inputs), and checks them as the function does
(:mod:`fused_pref.arguments`): a wrong value raises when the module is built, not at the first batch.
"""

import dataclasses
import inspect

import torch

from . import arguments, functional, grpo, validation
from .options import PER_BATCH, Options, option_parameters


class _FusedLoss(torch.nn.Module):
    function = None  # the functional.* callable the module wraps
    check = None     # the function's checks of its hyper-parameters (arguments.*)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The constructor's ``**options`` as the keywords they are, in its signature.
        init = inspect.signature(cls.__init__)
        own = [p for p in init.parameters.values() if p.kind is not p.VAR_KEYWORD]
        cls.__init__.__signature__ = init.replace(parameters=own + option_parameters(exclude=PER_BATCH))

    def __init__(self, hyper: dict, options: dict):
        super().__init__()
        given = set(options) & set(PER_BATCH)
        if given:
            raise TypeError(f"{type(self).__name__} takes {sorted(given)} in forward, not in its constructor")
        self.hyper = validation.python_scalars(hyper)
        self.options = Options(**options)
        type(self).check(**self.hyper, options=self.options)

    def _call(self, hidden, weight, labels, bias, cu_seqlens, **batch):
        options = dataclasses.replace(self.options, cu_seqlens=cu_seqlens)
        return type(self).function.with_options(hidden, weight, labels, bias, **self.hyper, **batch, options=options)

    def forward(self, hidden, weight, labels, bias=None, *, cu_seqlens=None):
        return self._call(hidden, weight, labels, bias, cu_seqlens)

    def extra_repr(self):
        defaults = Options()
        options = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(Options)
                   if f.name not in PER_BATCH and getattr(self.options, f.name) != getattr(defaults, f.name)}
        return ", ".join(f"{k}={v!r}" for k, v in {**self.hyper, **options}.items())


class FusedSimPOLoss(_FusedLoss):
    """:func:`fused_pref.simpo_loss` as a module; ``forward`` returns a ``PreferenceOutput``."""

    function = functional.simpo_loss
    check = staticmethod(arguments.simpo_loss)

    def __init__(self, beta=2.0, gamma=1.0, label_smoothing=0.0, sft_weight=0.0, token_metrics=False, **options):
        super().__init__(dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing, sft_weight=sft_weight,
                              token_metrics=token_metrics), options)


class FusedCPOLoss(_FusedLoss):
    """:func:`fused_pref.cpo_loss` as a module; ``forward`` returns a ``PreferenceOutput``."""

    function = functional.cpo_loss
    check = staticmethod(arguments.cpo_loss)

    def __init__(self, beta=0.1, label_smoothing=0.0, sft_weight=1.0, token_metrics=False, **options):
        super().__init__(dict(beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight,
                              token_metrics=token_metrics), options)


class FusedORPOLoss(_FusedLoss):
    """:func:`fused_pref.orpo_loss` as a module; ``forward`` returns a ``PreferenceOutput``."""

    function = functional.orpo_loss
    check = staticmethod(arguments.orpo_loss)

    def __init__(self, beta=0.1, token_metrics=False, **options):
        super().__init__(dict(beta=beta, token_metrics=token_metrics), options)


class FusedLinearCrossEntropyLoss(_FusedLoss):
    """:func:`fused_pref.linear_cross_entropy` as a module; ``forward`` returns the loss tensor (a
    ``CrossEntropyOutput`` with ``return_z_loss``, ``return_token_accuracy`` or ``return_predicted_tokens``)."""

    function = functional.linear_cross_entropy
    check = staticmethod(arguments.linear_cross_entropy)

    def __init__(self, reduction="mean", ce_weight=None, label_smoothing=0.0, lse_square_scale=0.0, return_z_loss=False,
                 return_token_accuracy=False, return_predicted_tokens=False, **options):
        super().__init__(dict(reduction=reduction, ce_weight=ce_weight, label_smoothing=label_smoothing,
                              lse_square_scale=lse_square_scale, return_z_loss=return_z_loss,
                              return_token_accuracy=return_token_accuracy,
                              return_predicted_tokens=return_predicted_tokens), options)
        # A buffer, as nn.CrossEntropyLoss's weight: .to(), .cuda() and state_dict() carry it.
        self.register_buffer("ce_weight", self.hyper.pop("ce_weight"))

    def forward(self, hidden, weight, labels, bias=None, *, cu_seqlens=None):
        return self._call(hidden, weight, labels, bias, cu_seqlens, ce_weight=self.ce_weight)


class FusedDPOLoss(_FusedLoss):
    """:func:`fused_pref.dpo_loss` as a module; ``forward(hidden, weight, labels, bias=None, *,
    ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, cu_seqlens=None)`` returns a
    ``PreferenceOutput``."""

    function = functional.dpo_loss
    check = staticmethod(arguments.dpo_loss)

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_weight=0.0, length_normalize=None,
                 discopop_tau=0.05, token_metrics=False, **options):
        super().__init__(dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, sft_weight=sft_weight,
                              length_normalize=length_normalize, discopop_tau=discopop_tau,
                              token_metrics=token_metrics), options)

    def forward(self, hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, cu_seqlens=None):
        return self._call(hidden, weight, labels, bias, cu_seqlens, ref_logps=ref_logps, ref_hidden=ref_hidden,
                          ref_weight=ref_weight, ref_bias=ref_bias)


class FusedKTOLoss(_FusedLoss):
    """:func:`fused_pref.kto_loss` as a module; ``forward(hidden, weight, labels, bias=None, *,
    desirable, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, kl=None,
    cu_seqlens=None)`` returns a ``KTOOutput``."""

    function = functional.kto_loss
    check = staticmethod(arguments.kto_loss)

    def __init__(self, beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0, token_metrics=False,
                 **options):
        super().__init__(dict(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                              undesirable_weight=undesirable_weight, token_metrics=token_metrics), options)

    def forward(self, hidden, weight, labels, bias=None, *, desirable, ref_logps=None, ref_hidden=None,
                ref_weight=None, ref_bias=None, kl=None, cu_seqlens=None):
        return self._call(hidden, weight, labels, bias, cu_seqlens, desirable=desirable, ref_logps=ref_logps,
                          ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, kl=kl)


class FusedGRPOLoss(_FusedLoss):
    """:func:`fused_pref.grpo_loss` as a module: its hyper-parameters (and the options) in the
    constructor, the batch in ``forward(hidden, weight, labels, bias=None, *, advantages,
    old_logps=None, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
    importance_sampling_ratio=None, sampling_logps=None, num_items_in_batch=None, cu_seqlens=None)``,
    which returns a ``GRPOOutput``."""

    function = grpo.grpo_loss
    check = staticmethod(grpo.module_spec)

    def __init__(self, loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=None, delta=None,
                 importance_sampling_level="token", use_bias_correction_kl=True, max_completion_length=None,
                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                 vespo_k_neg=3.0, vespo_lambda_neg=2.0, off_policy_mask_threshold=None, top_entropy_quantile=1.0,
                 entropy_coef=0.0, **options):
        super().__init__({name: value for name, value in locals().items() if name in grpo.HYPERPARAMETERS}, options)

    def forward(self, hidden, weight, labels, bias=None, *, advantages, old_logps=None, ref_logps=None,
                ref_hidden=None, ref_weight=None, ref_bias=None, importance_sampling_ratio=None, sampling_logps=None,
                num_items_in_batch=None, cu_seqlens=None):
        return self._call(hidden, weight, labels, bias, cu_seqlens, advantages=advantages, old_logps=old_logps,
                          ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                          importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
                          num_items_in_batch=num_items_in_batch)
