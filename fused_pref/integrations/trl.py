"""TRL's DPO, KTO, GRPO and CPO/SimPO training on our fused kernels: ``FusedDPOTrainer``,
``FusedKTOTrainer``, ``FusedGRPOTrainer``, ``FusedCPOTrainer``.

    from fused_pref.integrations.trl import FusedDPOTrainer      # instead of trl.DPOTrainer
    trainer = FusedDPOTrainer(model, ref_model=ref, args=DPOConfig(...), train_dataset=...,
                              processing_class=tokenizer)
    trainer.train()

Each is TRL's own trainer (written against TRL 1.16: ``trl.DPOTrainer``, ``trl.KTOTrainer`` and
``trl.experimental.cpo.CPOTrainer``) with one method overridden, the one that turns a collated
batch into the loss and the logged metrics: ``DPOTrainer.compute_loss`` (the transformers Trainer
hook, which DPOTrainer implements), ``KTOTrainer._compute_loss``,
``GRPOTrainer._get_per_token_logps_and_entropies`` and ``CPOTrainer.get_batch_loss_metrics``.  Data preparation,
collation, the reference model (a separate model, a PEFT adapter switched off, or log-probs
precomputed by TRL), optimisation and logging stay TRL's.  The override runs the model through
its (wrapped) forward with ``fused_pref=...`` (:func:`fused_pref.integrations.hf.add_fused_forward`)
so DDP, FSDP and DeepSpeed see an ordinary forward, then calls ``fused_pref.dpo_loss`` /
``cpo_loss`` / ``simpo_loss`` on the final hidden states: no ``[tokens, vocab]`` logits.

Logged metrics keep TRL's names and definitions: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
``logits/chosen``, ``logits/rejected``, and ``num_tokens``, ``entropy`` and ``mean_token_accuracy``
(DPO; the last two from the fused forward, ``token_metrics=True``) or ``nll_loss`` (CPO); KTO's
``kl``, ``entropy``, ``num_tokens`` and the rewards, logps and logits of its two sides.  KTO's
reference point ``kl`` is TRL's: the policy's and the reference's summed log-probs of the batch's
mismatched completions, through our fused forward without gradient.
CPOTrainer's ``logits/*`` averages the logits over
every position of the batch (prompt, padding and the final position included), which only the
full logits give; ours is the mean over completion tokens, DPOTrainer's definition.

``fused_options`` (a keyword of every trainer) passes ``backward``, ``plan``, ``workspace_bytes`` and
``validate`` to every fused call of a step: the loss's, and the passes without gradients (DPO's and
KTO's reference model, KTO's KL completions, GRPO's old policy and reference model), so
``validate=False`` leaves a step without validation's host reads, and under ``backward="in_forward"``
DPO's reference model runs that mode's cuBLAS products too (``sequence_logprobs`` without gradients):
``fused_options={"backward": "in_forward",
"workspace_bytes": 2**30}`` has DPO's and CPO's loss compute its gradients in the forward (6NDV
instead of 8NDV, README "Gradient in the forward"; not KTO's or GRPO's, whose gradients need the
whole batch, refused when the trainer is built).  A tile plan applies to whatever runs inside it,
``with tile_plan("cublas"): trainer.train()``, or to every fused call through
``fused_options={"plan": "cublas"}``; under "wide" and "widest" calls with per-token
statistics (DPO's and KTO's token metrics, GRPO's entropy) run the default plan's tiles, under
"cublas" its own (``tiles.stats_plan``).

Options whose math our losses do not have raise ``NotImplementedError`` when the trainer is built,
rather than train something else: more than one preference loss type
(MPO-style mixtures; one type plus ``"sft"`` is supported), ``f_divergence_type`` other than
``"reverse_kl"``, ``ld_alpha``, ``use_weighting``, MoE router auxiliary losses (DPO, KTO),
vision-language datasets (DPO, KTO); CPO's ``hinge`` and ``ipo`` loss types, AlphaPO's ``alpha``, encoder-decoder models.
"""

import contextlib
import warnings

import torch

import fused_pref
from fused_pref.options import Options
from fused_pref.preference import PreferenceSpec, cpo_spec, dpo_spec, simpo_spec

from .hf import add_fused_forward

try:
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as error:   # pragma: no cover - depends on the environment
    raise ImportError("fused_pref.integrations.trl needs TRL >= 1.16 (trl.DPOTrainer computing its loss in "
                      "compute_loss, trl.experimental.cpo): pip install 'trl>=1.16' (from a clone of "
                      "this repository: pip install -e '.[trl]')") from error

try:
    from accelerate.utils import is_peft_model
except ImportError:   # pragma: no cover
    def is_peft_model(model):
        return hasattr(model, "peft_config")

# TRL DPOTrainer loss_type -> (our dpo_loss loss_type, extra arguments).  TRL 1.16 reads
# label_smoothing only in these four; its "sigmoid" ignores it (ours would make it cDPO), so it is
# passed only where TRL uses it.  TRL divides IPO's and sigmoid_norm's summed log-ratios by the
# completion length: our length_normalize averages the policy's and the reference's log-probs over
# the scored tokens, the same number except where a completion starts at position 0, which TRL
# counts but cannot score (the README says so).
_DPO_LOSSES = {
    "sigmoid": ("sigmoid", {}),
    "sigmoid_norm": ("sigmoid", {"length_normalize": True}),
    "hinge": ("hinge", {}),
    "ipo": ("ipo", {}),
    "exo_pair": ("exo_pair", {}),
    "nca_pair": ("nca_pair", {}),
    "bco_pair": ("bco_pair", {}),
    "robust": ("robust", {}),
    "sppo_hard": ("sppo_hard", {}),
    "aot": ("aot", {}),
    "aot_unpaired": ("aot_pair", {}),
    "apo_zero": ("apo_zero", {}),
    "apo_down": ("apo_down", {}),
    "discopop": ("discopop", {}),
}
_SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def _dpo_arguments(trainer) -> tuple[float, dict, PreferenceSpec]:
    """(weight of the preference loss, keyword arguments of fused_pref.dpo_loss, its spec) for TRL's
    config, or NotImplementedError naming what our losses lack."""
    args = trainer.args
    weights = dict(zip(trainer.loss_types, trainer.loss_weights, strict=True))
    preference = [t for t in trainer.loss_types if t != "sft"]
    if len(preference) != 1 or preference[0] not in _DPO_LOSSES:
        raise NotImplementedError(
            f"FusedDPOTrainer supports one preference loss type among {sorted(_DPO_LOSSES)}, optionally with "
            f"'sft'; got loss_type={trainer.loss_types} (mixtures of preference losses have no fused "
            "equivalent yet)")
    unsupported = {
        "f_divergence_type": args.f_divergence_type != "reverse_kl",
        "ld_alpha": args.ld_alpha is not None,
        "use_weighting": args.use_weighting,
        "router_aux_loss_coef (a MoE auxiliary loss)": trainer.aux_loss_enabled,
        "vision-language datasets": trainer._is_vision_dataset,
    }
    for name, present in unsupported.items():
        if present:
            raise NotImplementedError(f"FusedDPOTrainer does not support {name}")
    loss_type = preference[0]
    weight = float(weights[loss_type])
    if weight == 0:
        raise NotImplementedError("FusedDPOTrainer needs a non-zero weight on the preference loss")
    ours, extra = _DPO_LOSSES[loss_type]
    kwargs = dict(loss_type=ours, beta=trainer.beta, discopop_tau=args.discopop_tau, **extra)
    if loss_type in _SMOOTHED:
        kwargs["label_smoothing"] = trainer.label_smoothing
    if "sft" in weights:
        # weight * (loss + (w_sft / weight) * NLL) = weight * loss + w_sft * NLL, TRL's sum; TRL's
        # "sft" term is the mean NLL over the chosen completion tokens, as our sft_weight's.
        kwargs["sft_weight"] = float(weights["sft"]) / weight
    spec = dpo_spec(loss_type=ours, beta=trainer.beta, label_smoothing=kwargs.get("label_smoothing", 0.0),
                    sft_weight=kwargs.get("sft_weight", 0.0), length_normalize=kwargs.get("length_normalize"),
                    discopop_tau=args.discopop_tau)
    return weight, kwargs, spec


# The options of fused_pref's calls a trainer takes from ``fused_options``; the others come from the
# model (softcap), Hugging Face's label alignment (shift) and the batch.
FUSED_OPTIONS = ("backward", "plan", "workspace_bytes", "validate")


def _fused_options(trainer, fused_options, *, in_forward: bool) -> dict:
    """``fused_options`` checked when the trainer is built: names among ``FUSED_OPTIONS``, values as
    fused_pref checks them, and ``backward="in_forward"`` only where the trainer's loss computes its
    gradients in the forward (``in_forward``)."""
    options = dict(fused_options or {})
    unknown = sorted(options.keys() - set(FUSED_OPTIONS))
    if unknown:
        raise TypeError(f"fused_options takes {', '.join(FUSED_OPTIONS)}, got {', '.join(map(repr, unknown))}")
    Options(**options)   # a wrong value raises here, not at the first step
    if options.get("backward") == "in_forward" and not in_forward:
        raise ValueError(f"{type(trainer).__name__}'s loss does not run with backward='in_forward' (its gradients "
                         "need the whole batch): use backward='auto'")
    return options


def _fuse(trainer, unsupported: dict):
    """Refuse the options named in ``unsupported`` (name: whether set) with ``NotImplementedError``,
    then give the policy and the reference model our fused forward (``add_fused_forward``)."""
    for name, present in unsupported.items():
        if present:
            raise NotImplementedError(f"{type(trainer).__name__} does not support {name}")
    add_fused_forward(trainer.model)
    if trainer.ref_model is not None:
        add_fused_forward(trainer.accelerator.unwrap_model(trainer.ref_model))


@contextlib.contextmanager
def _reference_model(trainer):
    """The model that scores the reference, as TRL's trainers pick it, inside the scope to score it
    in: the reference model, or a PEFT policy with its adapter switched off (a new adapter off gives
    the base model; an adapter being re-trained was loaded a second time as "ref"); under no_grad,
    without gradient checkpointing, and under autocast as the policy's forward (which accelerate
    wraps in it) and TRL's reference: patching the reference's forward after accelerate wrapped it
    took that wrapper off."""
    adapter = contextlib.nullcontext()
    model = trainer.ref_model
    if trainer.ref_model is None and is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        model = trainer.model
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs), \
            adapter, trainer.accelerator.autocast():
        yield model


def _gather_mean(accelerator, values) -> float:
    return accelerator.gather_for_metrics(values.detach()).float().mean().item()


class FusedDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss is ``fused_pref.dpo_loss``; same arguments.  See the module
    docstring for what is logged and which options are refused."""

    def __init__(self, *args, fused_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused_weight, self._fused_kwargs, spec = _dpo_arguments(self)
        self._fused_mean = spec.reduction == "mean"
        # AOT's loss types sort over the batch: each pair's gradient depends on every pair.
        self._fused_options = _fused_options(self, fused_options, in_forward=spec.sort is None)
        _fuse(self, {})

    def _reference_logps(self, inputs, model_kwargs, labels):
        """Summed reference log-probs ``[2B]``, as TRL's: precomputed, a PEFT model with its
        adapter off, or the reference model, through our fused forward under no_grad."""
        if self.precompute_ref_logps:
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()

        def logps(hidden, head):
            return head.apply(fused_pref.sequence_logprobs, hidden, labels, reduction="sum",
                              **self._fused_options)

        with _reference_model(self) as model:
            return model(**model_kwargs, fused_pref=logps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        accelerator = self.accelerator
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        # Hugging Face alignment, as TRL builds them; our shift=True moves them onto the hidden states.
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        counts = completion_mask[:, 1:].sum(dim=1)          # valid tokens per sequence after the shift
        B = counts.shape[0] // 2

        ref_sums = self._reference_logps(inputs, model_kwargs, labels)
        kwargs, mean = self._fused_kwargs, self._fused_mean
        ref_logps = ref_sums / counts.clamp(min=1) if mean else ref_sums

        def loss(hidden, head):
            return head.apply(fused_pref.dpo_loss, hidden, labels, ref_logps=ref_logps, token_metrics=True, **kwargs,
                              **self._fused_options)

        out = model(**model_kwargs, fused_pref=loss)
        total = self._fused_weight * out.loss

        # Metrics as TRL 1.16 computes them: on summed log-probs whatever the loss averages.
        scale = counts.float() if mean else torch.ones_like(counts, dtype=torch.float32)
        chosen, rejected = out.chosen_logps * scale[:B], out.rejected_logps * scale[B:]
        # Differences before the rescaling, so a policy equal to its reference has rewards of exactly 0.
        chosen_rewards = self.beta * (out.chosen_logps - ref_logps[:B]) * scale[:B]
        rejected_rewards = self.beta * (out.rejected_logps - ref_logps[B:]) * scale[B:]
        metrics = self._metrics[mode]
        if mode == "train":
            tokens = accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        # Token-weighted means across ranks, as TRL's (gather sums and counts): the entropy over
        # every completion token, the logits over each half's, the accuracy over the chosen ones'.
        for name, value, weight in (("logits/chosen", out.chosen_logits_mean, counts[:B].sum()),
                                    ("logits/rejected", out.rejected_logits_mean, counts[B:].sum()),
                                    ("entropy", out.entropy, counts.sum()),
                                    ("mean_token_accuracy", out.mean_token_accuracy, counts[:B].sum())):
            value_sum = accelerator.gather_for_metrics((value * weight).reshape(1)).sum().item()
            weight_sum = accelerator.gather_for_metrics(weight.reshape(1)).sum().item()
            metrics[name].append(value_sum / weight_sum if weight_sum > 0 else 0.0)
        metrics["rewards/chosen"].append(_gather_mean(accelerator, chosen_rewards))
        metrics["rewards/rejected"].append(_gather_mean(accelerator, rejected_rewards))
        metrics["rewards/accuracies"].append(_gather_mean(accelerator, (chosen_rewards > rejected_rewards).float()))
        metrics["rewards/margins"].append(_gather_mean(accelerator, chosen_rewards - rejected_rewards))
        metrics["logps/chosen"].append(_gather_mean(accelerator, chosen))
        metrics["logps/rejected"].append(_gather_mean(accelerator, rejected))

        if return_outputs:
            warnings.warn("return_outputs=True recomputes the logits with a plain forward (as TRL does): the "
                          "[tokens, vocab] logits materialize", stacklevel=2)
            with torch.no_grad():
                model_outputs = model(**model_kwargs)
            return total, model_outputs
        return total


_KTO_NON_MODEL_KEYS = ("completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask",
                       "KL_token_type_ids", "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps")


class FusedKTOTrainer(KTOTrainer):
    """``trl.KTOTrainer`` whose loss is ``fused_pref.kto_loss``; same arguments.  See the module
    docstring for what is logged and which options are refused."""

    def __init__(self, *args, fused_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused_options = _fused_options(self, fused_options, in_forward=False)
        unsupported = {"router_aux_loss_coef (a MoE auxiliary loss)": self.aux_loss_enabled,
                       "vision-language datasets": self._is_vision_dataset}
        _fuse(self, unsupported)

    def _summed_logps(self, model, model_kwargs, labels):
        """Each sequence's summed completion log-probs, through our fused forward (a pass without
        gradients: the reference model's, the KL completions')."""
        def logps(hidden, head):
            return head.apply(fused_pref.sequence_logprobs, hidden, labels, reduction="sum",
                              **self._fused_options)

        return model(**model_kwargs, fused_pref=logps)

    def _reference_logps(self, inputs, model_kwargs, labels, kl_kwargs, kl_labels):
        """(summed reference log-probs ``[R]``, and of the KL completions or None), as TRL's:
        precomputed, a PEFT model with its adapter off, or the reference model, under no_grad."""
        if self.precompute_ref_logps:
            return inputs["ref_logps"].float(), inputs["ref_KL_logps"].float() if self.calculate_KL else None
        with _reference_model(self) as model:
            kl_logps = self._summed_logps(model, kl_kwargs, kl_labels) if self.calculate_KL else None
            return self._summed_logps(model, model_kwargs, labels), kl_logps

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        accelerator = self.accelerator
        model_kwargs = {k: v for k, v in inputs.items() if k not in _KTO_NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        desirable = torch.as_tensor(inputs["label"], dtype=torch.bool, device=labels.device)
        kl_kwargs = kl_labels = None
        if self.calculate_KL:
            kl_kwargs = {**model_kwargs, "input_ids": inputs["KL_input_ids"],
                         "attention_mask": inputs["KL_attention_mask"]}
            kl_labels = inputs["KL_input_ids"].masked_fill(inputs["KL_completion_mask"] == 0, -100)
        ref_logps, ref_kl_logps = self._reference_logps(inputs, model_kwargs, labels, kl_kwargs, kl_labels)
        kl = None
        if self.calculate_KL:
            # TRL's reference point: the batch's mismatched completions, no gradient, averaged over
            # processes, clamped at 0.
            with torch.no_grad():
                kl_logps = self._summed_logps(model, kl_kwargs, kl_labels)
            kl = accelerator.gather_for_metrics((kl_logps - ref_kl_logps).mean().detach()).mean().clamp(min=0)
        kwargs = dict(desirable=desirable, ref_logps=ref_logps, kl=kl, beta=self.beta, loss_type=self.loss_type,
                      desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
                      token_metrics=True)

        def loss(hidden, head):
            return head.apply(fused_pref.kto_loss, hidden, labels, **kwargs, **self._fused_options)

        out = model(**model_kwargs, fused_pref=loss)
        self._log_kto_metrics(mode, inputs, out)
        if return_outputs:
            warnings.warn("return_outputs=True recomputes the logits with a plain forward (as TRL does): the "
                          "[tokens, vocab] logits materialize", stacklevel=2)
            with torch.no_grad():
                model_outputs = model(**model_kwargs)
            return out.loss, model_outputs
        return out.loss

    def _log_kto_metrics(self, mode, inputs, out):
        """KTOTrainer's metrics, each a sum gathered over processes divided by a gathered count."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        metrics["kl"].append(out.kl.item())
        counts = out.counts.float()

        def global_mean(values, count):
            total, number = gather(values.sum().reshape(1)).sum().item(), gather(count.reshape(1)).sum().item()
            return None if number <= 0 else total / number

        metrics["entropy"].append(global_mean(out.entropy_sums, counts.sum()) or 0.0)
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        means = {}
        for name, side in (("chosen", out.desirable), ("rejected", ~out.desirable)):
            side = side.float()
            logits = global_mean(out.logit_sums.float() * side / out.vocab_size, (counts * side).sum())
            if logits is not None:
                metrics[f"logits/{name}"].append(logits)
            for metric, values in (("rewards", out.rewards), ("logps", out.logps)):
                means[metric, name] = global_mean(values * side, side.sum())
                if means[metric, name] is not None:
                    metrics[f"{metric}/{name}"].append(means[metric, name])
        if means["rewards", "chosen"] is not None and means["rewards", "rejected"] is not None:
            metrics["rewards/margins"].append(means["rewards", "chosen"] - means["rewards", "rejected"])


_GRPO_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies, of the policy, the old policy and
    the reference model alike, come from ``fused_pref.linear_logprobs`` (at the trainer's
    ``temperature``); same arguments.

    GRPO's loss is TRL's own code on those log-probs: every ``loss_type`` and option TRL has, with
    TRL's normalisations across processes and accumulation steps and its metrics, and autograd hands
    ``dLoss/dlogp`` (and the entropy bonus's ``dLoss/dH``) to our backward kernel.  Generation and
    rewards are TRL's.  Refused (``NotImplementedError``): vision-language inputs, MoE router
    auxiliary losses, ``cast_lm_head_to_fp32`` (our kernels read the head in its dtype and accumulate
    in fp32).  :func:`fused_pref.grpo_loss` is the same loss as one function, for loops of one's own.
    """

    def __init__(self, *args, fused_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused_options = _fused_options(self, fused_options, in_forward=False)
        unsupported = {"router_aux_loss_coef (a MoE auxiliary loss)": self.aux_loss_enabled,
                       "cast_lm_head_to_fp32": self.args.cast_lm_head_to_fp32}
        _fuse(self, unsupported)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's ``(logps, entropies or None, None)`` of the last ``logits_to_keep`` positions, ``[B, K]``
        each, in one fused call (no logits, so no need of TRL's ``batch_size`` chunks)."""
        given = sorted(name for name, value in multimodal.items() if value is not None)
        if given or compute_aux_loss:
            raise NotImplementedError("FusedGRPOTrainer scores text-only causal LMs without a router auxiliary "
                                      f"loss; got {given or ['compute_aux_loss']}")
        # Only the completion tokens are scored, as TRL's labels say.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100

        def logps(hidden, head):
            return head.apply(fused_pref.linear_logprobs, hidden, labels, return_entropy=compute_entropy,
                              temperature=self.temperature, **self._fused_options)

        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, fused_pref=logps)
        # With shift=True position t scores labels[t + 1]: the completion's K tokens are the K
        # positions before the last.
        kept = slice(-logits_to_keep - 1, -1)
        if not compute_entropy:
            return out[:, kept], None, None
        return out.logp[:, kept], out.entropy[:, kept], None


class FusedCPOTrainer(CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` whose loss is ``fused_pref.cpo_loss`` (``loss_type="sigmoid"``)
    or ``fused_pref.simpo_loss`` (``loss_type="simpo"``, CPO-SimPO with ``cpo_alpha > 0``); same
    arguments.  See the module docstring for what is logged and which options are refused."""

    def __init__(self, *args, fused_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused_options = _fused_options(self, fused_options, in_forward=True)
        if self.loss_type not in ("sigmoid", "simpo"):
            raise NotImplementedError(f"FusedCPOTrainer supports loss_type 'sigmoid' (CPO) and 'simpo', got "
                                      f"{self.loss_type!r}")
        for name, present in (("alpha (AlphaPO)", self.alpha != 0.0), ("encoder-decoder models", self.is_encoder_decoder),
                              ("router_aux_loss_coef (a MoE auxiliary loss)", self.aux_loss_enabled)):
            if present:
                raise NotImplementedError(f"FusedCPOTrainer does not support {name}")
        fn, hyper = self._fused_loss()
        # The values our loss refuses (beta <= 0, label_smoothing > 0.5, ...) fail here, not at the first step.
        (simpo_spec if fn is fused_pref.simpo_loss else cpo_spec)(**hyper)
        add_fused_forward(self.model)

    def _fused_loss(self):
        """Our loss function for TRL's ``loss_type`` and its hyper-parameters from TRL's config."""
        hyper = dict(beta=self.beta, label_smoothing=self.label_smoothing, sft_weight=self.cpo_alpha)
        if self.loss_type == "simpo":
            # TRL: beta * ((S_c - S_r) - gamma / beta) = beta * (S_c - S_r) - gamma, our SimPO margin.
            return fused_pref.simpo_loss, {**hyper, "gamma": self.simpo_gamma}
        return fused_pref.cpo_loss, hyper

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        batch = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.pad_token_id,
                                         device=self.accelerator.device)
        labels = batch["concatenated_labels"]     # Hugging Face alignment, -100 on prompt and padding
        fn, hyper = self._fused_loss()
        out = model(batch["concatenated_input_ids"], attention_mask=batch["concatenated_attention_mask"],
                    use_cache=False,
                    fused_pref=lambda hidden, head: head.apply(fn, hidden, labels, **hyper, **self._fused_options))

        gather = self.accelerator.gather_for_metrics
        prefix = "eval_" if train_eval == "eval" else ""
        nll = out.nll_loss if out.nll_loss is not None else out.loss.new_zeros(())
        values = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "logps/rejected": out.rejected_logps,
            "logps/chosen": out.chosen_logps,
            "logits/rejected": out.rejected_logits_mean,   # over completion tokens: see the module docstring
            "logits/chosen": out.chosen_logits_mean,
            "nll_loss": nll,
        }
        metrics = {f"{prefix}{name}": gather(value.detach()).float().mean().item() for name, value in values.items()}
        return out.loss, metrics
