"""Each loss's arguments that need no tensor, checked in one place: by its function (fused and
reference) at every call, before its tensors, and by its module (``fused_pref.modules``) when built,
so that a wrong value raises there and not at the first batch.  Each, named as its function, takes
that function's hyper-parameters by name and the call's ``Options``, and returns the loss's spec
where it has one.  GRPO's module checks ``grpo.module_spec`` (grpo.py builds on
fused_pref.functional, which imports this module); its function checks the spec first and the
refused ``backward="in_forward"`` with its tensors.
"""

from . import kto, preference, validation
from .options import Options


def _pair_loss(spec: preference.PreferenceSpec, token_metrics, options: Options) -> preference.PreferenceSpec:
    validation.check_pair_loss_in_forward(options, spec.sort)
    validation.check_token_stats({"token_metrics": token_metrics})
    return spec


def simpo_loss(*, beta, gamma, label_smoothing, sft_weight, token_metrics, options) -> preference.PreferenceSpec:
    spec = preference.simpo_spec(beta=beta, gamma=gamma, label_smoothing=label_smoothing, sft_weight=sft_weight)
    return _pair_loss(spec, token_metrics, options)


def cpo_loss(*, beta, label_smoothing, sft_weight, token_metrics, options) -> preference.PreferenceSpec:
    spec = preference.cpo_spec(beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight)
    return _pair_loss(spec, token_metrics, options)


def orpo_loss(*, beta, token_metrics, options) -> preference.PreferenceSpec:
    return _pair_loss(preference.orpo_spec(beta=beta), token_metrics, options)


def dpo_loss(*, beta, loss_type, label_smoothing, sft_weight, length_normalize, discopop_tau, token_metrics,
             options) -> preference.PreferenceSpec:
    spec = preference.dpo_spec(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                               sft_weight=sft_weight, length_normalize=length_normalize, discopop_tau=discopop_tau)
    return _pair_loss(spec, token_metrics, options)


def kto_loss(*, beta, loss_type, desirable_weight, undesirable_weight, token_metrics, options) -> kto.KTOSpec:
    spec = kto.kto_spec(loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
                        undesirable_weight=undesirable_weight)
    # Its gradient needs the whole batch: backward="in_forward" is refused.
    validation.check_gradient_in_forward(options, None, None)
    validation.check_token_stats({"token_metrics": token_metrics})
    return spec


def linear_cross_entropy(*, reduction, ce_weight, label_smoothing, lse_square_scale, return_z_loss,
                         return_token_accuracy, return_predicted_tokens, options) -> None:
    validation.check_reduction(reduction, "cross_entropy")
    validation.check_gradient_in_forward(options, "cross_entropy", reduction)
    # The vocabulary's size and the labels' device are the call's, checked then.
    validation.check_class_weights(ce_weight, None, None)
    validation.check_cross_entropy_terms(label_smoothing, lse_square_scale, return_z_loss, ce_weight, options)
    validation.check_token_stats({"return_token_accuracy": return_token_accuracy,
                                  "return_predicted_tokens": return_predicted_tokens})
