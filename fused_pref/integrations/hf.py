"""Hugging Face transformers causal LMs: our losses on the model's final hidden states, no logits.

    import fused_pref.integrations.hf as fph

    # input_ids, attention_mask [2B, T]: B chosen sequences, then their B rejected ones;
    # labels = input_ids with -100 on prompt and padding (Hugging Face alignment: not shifted).
    out = fph.simpo_loss(model, input_ids, labels, attention_mask, beta=2.0, gamma=1.0)
    out.loss.backward()

How: the model's base (``model.base_model``: ``LlamaModel``, ``GPT2Model``, ...) runs the decoder,
final norm included, and returns ``last_hidden_state``; the causal-LM wrapper's forward, which
would build ``[B, T, V]`` logits, never runs.  :func:`output_head` reads what that forward would
have applied: ``get_output_embeddings()`` (its weight, tied to the input embeddings or not, and
its bias if any), Gemma-2's ``final_logit_softcapping`` (our ``softcap``) and the logit multiplier
some architectures apply after the projection (Cohere's ``logit_scale``, Granite's
``logits_scaling``, ...; see :data:`LOGIT_MULTIPLIERS`).  Labels are taken as Hugging Face passes
them and shifted by relabelling (our ``shift=True``).

Every loss function here is the one of ``fused_pref`` with ``(hidden, weight, labels, bias)``
replaced by ``(model, input_ids, labels, attention_mask)``; other keyword arguments pass through,
``model_kwargs`` goes to the decoder (e.g. ``position_ids``).  Under DDP, FSDP or DeepSpeed, call
through the wrapper so its forward hooks run: :func:`add_fused_forward`.  Either way, where an
engine gathers the output layer with hooks, the loss runs as that layer's forward, inside them
(:func:`run_as_output_layer`).
"""

import functools
import inspect
import types
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor

import fused_pref
from fused_pref import validation
from fused_pref.options import FIELDS
from fused_pref.preference import dpo_spec

# Multipliers of the logits applied after the output projection, by text-config attribute, as
# read in each architecture's modeling file (transformers 5.24).  ``(attribute, model types that
# divide by it instead of multiplying, model types whose config has it but whose forward never
# applies it)``; the first attribute present on the config wins.  (A factor on the hidden states
# before a bias-free projection, as MiniCPM3's and Inkling's, is the same factor on the logits.)
LOGIT_MULTIPLIERS = (
    ("logit_scale", (), ("mpt",)),             # Cohere, Cohere2: logits * logit_scale
    ("logits_scaling", ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa",
                        "granitemoe_swa", "minicpm3", "granite_docling_text", "granite4_vision_text"), ()),
                                               # Granite family, MiniCPM3: logits / logits_scaling;
                                               # HyperCLOVA X: logits * logits_scaling
    ("lm_head_multiplier", (), ()),            # Falcon-H1: logits * lm_head_multiplier
    ("output_multiplier", (), ()),             # Muse Glimmer: logits * output_multiplier, before the softcap
    ("logits_mup_width_multiplier", ("inkling_text",), ()),   # Inkling: lm_head(hidden / multiplier)
)
# The logit softcap's config attribute: Gemma-2's and most others', RecurrentGemma's.
SOFTCAP_ATTRIBUTES = ("final_logit_softcapping", "logits_soft_cap")


def _unwrap(model):
    """The transformers model inside a PEFT wrapper (LoRA layers are injected in place, so its
    decoder still runs them; one on the output layer is applied by :func:`effective_linear`).
    PEFT's prompt learning is refused: its virtual tokens enter in the wrapper's own forward."""
    if not hasattr(model, "get_base_model"):
        return model
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        raise NotImplementedError(f"PEFT prompt learning ({type(config).__name__}) is not supported: its virtual "
                                  "tokens are added by the PEFT model's own forward, which fused_pref does not run "
                                  "(the loss would leave them out, or their hidden states would not line up with "
                                  "the labels)")
    return model.get_base_model()


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_multiplier(config) -> float:
    """The factor the model multiplies its logits by after the projection (1.0 for most models)."""
    model_type = getattr(config, "model_type", "")
    for attribute, dividers, unused in LOGIT_MULTIPLIERS:
        value = getattr(config, attribute, None)
        if value is not None and model_type not in unused:
            return 1.0 / float(value) if model_type in dividers else float(value)
    return 1.0


@dataclass(frozen=True)
class OutputHead:
    """The output layer as our functions take it: ``z = logit_scale * (hidden @ weight.T + bias)``,
    then ``softcap * tanh(z / softcap)`` when ``softcap`` is set."""

    weight: torch.Tensor           # [V, D], the lm_head's own parameter (tied or not)
    bias: torch.Tensor | None      # [V] or None (most models have none)
    softcap: float | None          # Gemma-2's final_logit_softcapping
    logit_scale: float = 1.0

    def inputs(self, hidden):
        """``(hidden, weight, bias)`` for our functions, with the logit multiplier folded in.

        Our kernels take no logit scale, and ``s * (h @ W.T + b) = (s * h) @ W.T + s * b``, so the
        hidden states are scaled: an ``[N, D]`` temporary, the size of one activation.  Scaling
        the weight instead would be ``[V, D]`` (Cohere's 256000 x 8192 lm_head: 4 GB in bf16).
        Autograd carries the factor into every gradient.

        Dtypes follow ``nn.Linear``'s: under ``torch.autocast`` (as Trainer's ``bf16=True``, TRL's
        default, sets up) the projection runs in the autocast dtype, so hidden, weight and bias are
        cast to it (the ``[V, D]`` weight copy is the one autocast makes for every linear layer);
        otherwise a hidden state in another dtype than the weight is cast to the weight's."""
        weight, bias = self.weight, self.bias
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        if self.logit_scale == 1.0:
            return hidden, weight, bias
        bias = None if bias is None else bias * self.logit_scale
        return hidden * self.logit_scale, weight, bias

    def apply(self, fn, hidden, labels, **kwargs):
        """``fn(hidden, weight, labels, bias, softcap=..., shift=True, **kwargs)`` for any public
        function ``fn`` of ``fused_pref`` (or ``fused_pref.reference``), labels as Hugging Face
        passes them.  With ``cu_seqlens``, a padding-free batch: one row ``[1, N]`` of packed
        sequences (TRL's ``padding_free``, transformers' ``DataCollatorWithFlattening``), which
        ``fn`` takes as ``[N, D]`` and ``[N]``, each sequence shifted within its bounds."""
        for name in ("softcap", "shift"):
            if name in kwargs:
                raise TypeError(f"{name} comes from the model (its config, and Hugging Face's label "
                                "alignment); do not pass it")
        if kwargs.get("cu_seqlens") is not None:
            hidden = _packed_row(hidden, "input_ids")
            n = hidden.shape[0]
            if tuple(labels.shape) not in ((1, n), (n,)):
                raise ValueError(f"labels must be [1, N] as input_ids are (or [N]), N = {n}; got {tuple(labels.shape)}")
            labels = labels.reshape(-1)
            if kwargs.get("ref_hidden") is not None:
                kwargs["ref_hidden"] = _packed_row(kwargs["ref_hidden"], "the reference model's input_ids")
        hidden, weight, bias = self.inputs(hidden)
        return fn(hidden, weight, labels, bias, softcap=self.softcap, shift=True, **kwargs)


def _packed_row(hidden, what):
    """A padding-free batch's hidden states ``[1, N, D]`` as ``[N, D]``."""
    if hidden.dim() != 3 or hidden.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, {what} must be one row of packed sequences [1, N] (a padding-free "
                         f"batch), giving hidden states [1, N, D]; got {tuple(hidden.shape)}")
    return hidden[0]


def _output_layer(model) -> torch.nn.Module:
    model = _unwrap(model)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head is None or not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no output embeddings with a weight "
                        "(get_output_embeddings()): not a causal LM with a linear head")
    return lm_head


def output_head(model) -> OutputHead:
    """The output layer of a transformers causal LM (or a PEFT model wrapping one), with a PEFT
    adapter on it applied (:func:`effective_linear`), cut to the config's ``unpadded_vocab_size``
    where the model cuts its logits there (Inkling)."""
    layer = _output_layer(model)
    _check_head_is_the_output_layer(model, layer)
    weight, bias = effective_linear(layer)
    config = _text_config(_unwrap(model))
    vocab = getattr(config, "unpadded_vocab_size", None)
    if vocab is not None and vocab < weight.shape[0]:
        if isinstance(weight, DTensor):
            raise NotImplementedError(f"{type(_unwrap(model)).__name__} cuts its logits to unpadded_vocab_size, "
                                      "which fused_pref does not do on a weight sharded across ranks")
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    return OutputHead(weight, bias, _softcap(config), logit_multiplier(config))


def _softcap(config) -> float | None:
    softcap = next((getattr(config, name) for name in SOFTCAP_ATTRIBUTES if getattr(config, name, None) is not None),
                   None)
    return None if softcap is None else float(softcap)


def _check_head_is_the_output_layer(model, layer):
    """Refuse a model with parameters outside its decoder (:func:`backbone`) and its output layer:
    a head transform (BERT-style dense, activation and norm before the projection, as in BERT,
    RoBERTa, Electra or ModernBERT's decoder) or an encoder or vision tower (BLIP-2, Kosmos-2,
    Pix2Struct), which the loss, run on the decoder's hidden states, would skip."""
    model = _unwrap(model)
    try:
        base = backbone(model)
    except TypeError:
        return  # no separate decoder: running the model fails there, with its own message
    # Per call, so only the modules beside the decoder are walked (the output layer, and for a
    # BERT-style head the modules around it): a few, where the decoder holds hundreds of parameters.
    candidates, pending = [], [("", model)]
    while pending:
        prefix, module = pending.pop()
        candidates += [(prefix + name, p) for name, p in module.named_parameters(recurse=False)]
        for name, child in module.named_children():
            if child is base or child is layer:
                continue
            if any(m is layer for m in child.modules()):
                pending.append((f"{prefix}{name}.", child))
            else:
                candidates += [(f"{prefix}{name}.{n}", p) for n, p in child.named_parameters()]
    # A parameter tied to the decoder's or the layer's (a shared bias or embedding) is theirs.
    known = {id(p) for module in (base, layer) for p in module.parameters()} if candidates else set()
    extra = [name for name, p in candidates if id(p) not in known]
    if extra:
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        raise NotImplementedError(f"{type(model).__name__} has parameters outside its decoder "
                                  f"({type(base).__name__}) and its output layer ({shown}): a head transform before "
                                  "the projection, or an encoder or vision tower, which fused_pref.integrations.hf "
                                  "would not run")


def effective_linear(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` that ``layer``'s forward applies, for a plain linear layer or one PEFT wraps.

    PEFT's ``modules_to_save`` copy (``ModulesToSaveWrapper``) forwards ``weight`` to the active copy
    already.  A LoRA layer (``peft.tuners.lora.Linear``) on the output layer computes ``x W.T +
    sum_a s_a (x A_a.T) B_a.T`` over its active adapters; the effective weight ``W + sum_a s_a B_a @
    A_a`` is formed once per call, differentiable in ``A`` and ``B`` (``W``, frozen, gets no
    gradient).  Why not the low-rank term in the logits tile, as a second small product: every
    kernel would take two more operands and a second dot per tile, forward and backward, for a
    ``[V, D]`` temporary this way, the size of the ``d_weight`` the backward forms anyway, and the
    products ``B @ A`` and its two gradients cost ``O(V D r)``, under 1% of the loss's ``O(N D V)``.
    Refused (``NotImplementedError``): other PEFT tuners (IA3, ...), and, since one weight cannot
    express them, LoRA dropout while
    training (it drops entries of the hidden states of the low-rank term only) and LoRA variants
    (DoRA, ...), active or merged then disabled.  A merged adapter is the base layer's weight (which
    holds it); a disabled one is that weight without the merged adapters, as PEFT's forward
    unmerges them first."""
    lora_A, lora_B = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if lora_A is None or lora_B is None or not hasattr(layer, "base_layer"):
        if hasattr(layer, "base_layer"):
            # Another PEFT tuner: its .weight is the base layer's, without what the tuner applies.
            raise NotImplementedError(f"{type(layer).__module__}.{type(layer).__name__} on the output layer: "
                                      "fused_pref applies LoRA adapters and modules_to_save there, not this tuner")
        return layer.weight, getattr(layer, "bias", None)
    base = layer.get_base_layer()
    weight, bias = base.weight, getattr(base, "bias", None)
    if layer.disable_adapters:
        # PEFT's forward unmerges a disabled adapter first: the base weight is W without them.
        for name in getattr(layer, "merged_adapters", ()):
            _refuse_variant(layer, name)     # a variant's merge (DoRA's) is not a sum to take back
            weight, bias = _add_lora(layer, name, weight, bias, sign=-1.0)
        return weight, bias
    if layer.merged:
        return weight, bias          # the adapters are in W already, as PEFT's forward has it
    for name in layer.active_adapters:
        if name not in lora_A.keys():
            continue
        _refuse_variant(layer, name)
        dropout = layer.lora_dropout[name]
        if layer.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
            raise NotImplementedError(f"LoRA adapter {name!r} on the output layer has lora_dropout={dropout.p} in "
                                      "training: it drops entries of the low-rank term's input only, which one "
                                      "effective weight cannot express; set lora_dropout=0 or leave lm_head out "
                                      "of target_modules")
        weight, bias = _add_lora(layer, name, weight, bias)
    return weight, bias


def _refuse_variant(layer, name):
    if name in getattr(layer, "lora_variant", {}):
        raise NotImplementedError(f"LoRA adapter {name!r} on the output layer is a variant "
                                  f"({type(layer.lora_variant[name]).__name__}, e.g. DoRA): fused_pref applies "
                                  "plain LoRA only")


def _add_lora(layer, name, weight, bias, sign=1.0):
    """``weight + sign * s B @ A`` as one product into a fresh ``[V, D]`` (``addmm``), in the weight's
    dtype, and the adapter's bias alike when it has one."""
    scale = sign * layer.scaling[name]
    A, B = layer.lora_A[name].weight.to(weight.dtype), layer.lora_B[name].weight.to(weight.dtype)
    if getattr(layer, "fan_in_fan_out", False):
        A, B = B.T, A.T        # the base weight is stored transposed: add (B @ A).T = A.T @ B.T
    weight = torch.addmm(weight, B, A, alpha=scale)
    lora_bias = layer.lora_B[name].bias
    if lora_bias is not None:
        lora_bias = scale * lora_bias.to(weight.dtype)
        bias = lora_bias if bias is None else bias + lora_bias
    return weight, bias


def backbone(model) -> torch.nn.Module:
    """The decoder that returns ``last_hidden_state`` after the final norm (``model.model`` for
    Llama, Qwen2, Mistral, Gemma-2, Cohere; ``model.transformer`` for GPT-2)."""
    model = _unwrap(model)
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if base is None or base is model:
        raise TypeError(f"cannot find the decoder of {type(model).__name__}: neither model.base_model nor "
                        "model.get_decoder() is a separate module")
    return base


def hidden_states(model, input_ids=None, attention_mask=None, **model_kwargs) -> torch.Tensor:
    """Final hidden states ``[B, T, D]`` of a causal LM, without its logits."""
    _check_not_sharded(model)
    model_kwargs["use_cache"] = False
    return backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).last_hidden_state


def _check_not_sharded(model):
    """Refuses an FSDP2 root whose own parameters (the embedding's, the lm_head's, ...) are sharded:
    only its forward gathers them, and run from outside it the decoder fails on them in torch's words."""
    from torch.distributed.fsdp import FSDPModule

    for module in {id(m): m for m in (model, _unwrap(model))}.values():
        if not isinstance(module, FSDPModule):
            continue
        units = [m for m in module.modules() if m is not module and isinstance(m, FSDPModule)]
        theirs = {id(p) for unit in units for p in unit.parameters()}
        if any(isinstance(p, DTensor) for p in module.parameters() if id(p) not in theirs):
            raise ValueError(f"{type(module).__name__} is an FSDP2 root (fully_shard) whose parameters are sharded "
                             "outside its forward: call fused_pref.integrations.hf.add_fused_forward(model) before "
                             "wrapping, then the loss through the wrapped model, model(input_ids, ..., "
                             "fused_pref=lambda h, head: head.apply(fused_pref.simpo_loss, h, labels)), as the TRL "
                             "trainers do")


def gathered_by_hooks(layer) -> bool:
    """Whether an engine gathers ``layer``'s parameters with hooks around its call: an FSDP2 unit of
    its own, DeepSpeed ZeRO-3 parameters, or accelerate's hooks (``device_map`` dispatch)."""
    from torch.distributed.fsdp import FSDPModule

    return (isinstance(layer, FSDPModule) or hasattr(layer, "_hf_hook")
            or any(hasattr(p, "ds_id") for p in layer.parameters()))


def run_as_output_layer(model, fn, hidden):
    """``fn(hidden, output_head(model))``, run as the forward of ``model``'s output layer when an
    engine gathers that layer with hooks (:func:`gathered_by_hooks`), and as a plain call otherwise.

    FSDP2 on a ``fully_shard``-ed output layer unshards it before its call and reshards it after,
    unshards it again before its backward and reduce-scatters its gradient after; DeepSpeed ZeRO-3
    gathers and releases it alike.  The fused loss never runs the layer's own forward (the
    projection to ``[tokens, vocab]`` logits), so it runs in its place: for one ``layer(hidden)``
    call the layer's ``forward`` (accelerate's ``_old_forward`` under its hooks) is ``fn``, and
    every hook runs around the loss as it would around the projection.  Its output is handed to the
    hooks flattened (torch pytree): they see each tensor, replace it if they need to (DeepSpeed
    does) and the structure is rebuilt, so ``fn`` returns tensors, tuples, lists, dicts or
    fused_pref's results (registered with the pytree).  Hooks that expect the logits themselves
    (tensor parallelism's ``ColwiseParallel``, users' own) are why the plain call is kept where no
    engine needs the swap; the swap is per call, so one model is not to be run from two threads."""
    layer = _output_layer(model)
    if not gathered_by_hooks(layer):
        return fn(hidden, output_head(model))
    structure = None

    def forward(_, hidden):
        nonlocal structure
        leaves, structure = pytree.tree_flatten(fn(hidden, output_head(model)))
        return tuple(leaves)

    name = "_old_forward" if hasattr(layer, "_hf_hook") else "forward"
    previous = vars(layer).get(name)
    setattr(layer, name, types.MethodType(forward, layer))
    try:
        leaves = layer(hidden)
    finally:
        if previous is None:
            delattr(layer, name)
        else:
            setattr(layer, name, previous)
    return pytree.tree_unflatten(list(leaves), structure)


def _decoder_kwargs(model_kwargs, input_ids, attention_mask, kwargs) -> dict:
    """``model_kwargs`` for the decoder.  A padding-free batch (``cu_seqlens``, one row ``[1, N]``)
    takes no ``attention_mask`` and, given no ``position_ids``, gets each packed sequence's positions
    from 0: transformers keeps attention within each sequence by them, and only without a mask (with
    one, or without them, the row would be one long sequence).  ``cu_seqlens``' values are checked
    with the labels, by the loss."""
    model_kwargs = dict(model_kwargs or {})
    cu_seqlens = kwargs.get("cu_seqlens")
    if cu_seqlens is None:
        return model_kwargs
    row = input_ids if input_ids is not None else model_kwargs.get("inputs_embeds")
    if row is None or row.dim() < 2 or row.shape[0] != 1:
        raise ValueError("with cu_seqlens, input_ids must be one row of packed sequences [1, N] (a padding-free "
                         f"batch); got {None if row is None else tuple(row.shape)}")
    if attention_mask is not None:
        raise ValueError("a padding-free batch (cu_seqlens) takes no attention_mask: with one, transformers attends "
                         "across its packed sequences")
    validation.check_cu_seqlens(cu_seqlens, row)
    if model_kwargs.get("position_ids") is None:
        index = torch.arange(row.shape[1], device=row.device)
        cu = cu_seqlens.to(row.device, torch.long)
        # By searchsorted, which no cu_seqlens can make fail on the device (the loss refuses bad ones).
        sequence = (torch.searchsorted(cu, index, right=True) - 1).clamp(0, cu.numel() - 2)
        model_kwargs["position_ids"] = (index - cu[sequence]).clamp(min=0)[None]
    return model_kwargs


def _loss(fn, model, input_ids, labels, attention_mask, model_kwargs, kwargs):
    hidden = hidden_states(model, input_ids, attention_mask,
                           **_decoder_kwargs(model_kwargs, input_ids, attention_mask, kwargs))
    return run_as_output_layer(model, lambda hidden, head: head.apply(fn, hidden, labels, **kwargs), hidden)


def linear_logprobs(model, input_ids, labels, attention_mask=None, *, model_kwargs=None, **kwargs):
    """Per-token log-probs ``[B, T]`` of ``labels`` (``[N]`` for a padding-free batch; entry t is
    the log-prob of ``labels[t + 1]``); :func:`fused_pref.linear_logprobs`."""
    return _loss(fused_pref.linear_logprobs, model, input_ids, labels, attention_mask, model_kwargs, kwargs)


def sequence_logprobs(model, input_ids, labels, attention_mask=None, *, model_kwargs=None, **kwargs):
    """Per-sequence log-probs ``[B]``; :func:`fused_pref.sequence_logprobs`."""
    return _loss(fused_pref.sequence_logprobs, model, input_ids, labels, attention_mask, model_kwargs, kwargs)


def linear_cross_entropy(model, input_ids, labels, attention_mask=None, *, model_kwargs=None, **kwargs):
    """The causal-LM loss, equal to ``model(input_ids, labels=labels).loss``;
    :func:`fused_pref.linear_cross_entropy`."""
    return _loss(fused_pref.linear_cross_entropy, model, input_ids, labels, attention_mask, model_kwargs, kwargs)


def simpo_loss(model, input_ids, labels, attention_mask=None, *, model_kwargs=None, **kwargs):
    """SimPO on a causal LM; :func:`fused_pref.simpo_loss` (B chosen sequences, then B rejected)."""
    return _loss(fused_pref.simpo_loss, model, input_ids, labels, attention_mask, model_kwargs, kwargs)


def cpo_loss(model, input_ids, labels, attention_mask=None, *, model_kwargs=None, **kwargs):
    """CPO on a causal LM; :func:`fused_pref.cpo_loss`."""
    return _loss(fused_pref.cpo_loss, model, input_ids, labels, attention_mask, model_kwargs, kwargs)


def orpo_loss(model, input_ids, labels, attention_mask=None, *, model_kwargs=None, **kwargs):
    """ORPO on a causal LM; :func:`fused_pref.orpo_loss`."""
    return _loss(fused_pref.orpo_loss, model, input_ids, labels, attention_mask, model_kwargs, kwargs)


def dpo_loss(model, input_ids, labels, attention_mask=None, *, ref_model=None, ref_logps=None, model_kwargs=None,
             **kwargs):
    """DPO on a causal LM; :func:`fused_pref.dpo_loss`.  The reference is either ``ref_logps``
    ``[2B]`` or ``ref_model``, whose decoder runs under ``no_grad`` and whose head (its own
    weight, bias and logit multiplier) the fused forward uses; its softcap must be the policy's."""
    if (ref_model is None) == (ref_logps is None):
        raise ValueError("pass exactly one of ref_model and ref_logps")
    softcaps = [_softcap(_text_config(_unwrap(m))) for m in (ref_model, model)] if ref_model is not None else None
    if softcaps is not None and softcaps[0] != softcaps[1]:
        raise ValueError(f"ref_model's logit softcap ({softcaps[0]}) differs from the model's ({softcaps[1]}): "
                         "pass its log-probs as ref_logps instead")
    model_kwargs = _decoder_kwargs(model_kwargs, input_ids, attention_mask, kwargs)
    hidden = hidden_states(model, input_ids, attention_mask, **model_kwargs)
    if ref_model is None:
        kwargs["ref_logps"] = ref_logps
    elif gathered_by_hooks(_output_layer(ref_model)):
        # The reference head is gathered only inside its own call: its log-probs come from there,
        # reduced as the loss reduces the policy's.
        reduction = _dpo_reduction(kwargs)
        # The call's options (ignore_index, temperature, validate, backward, ...), as the loss takes them.
        options = {name: kwargs[name] for name in FIELDS if name in kwargs}
        with torch.no_grad():
            ref_hidden = hidden_states(ref_model, input_ids, attention_mask, **model_kwargs)
            kwargs["ref_logps"] = run_as_output_layer(ref_model, lambda h, head: head.apply(
                fused_pref.sequence_logprobs, h, labels, reduction=reduction, **options), ref_hidden)
    else:
        ref_head = output_head(ref_model)
        with torch.no_grad():
            ref_hidden = hidden_states(ref_model, input_ids, attention_mask, **model_kwargs)
            ref_hidden, ref_weight, ref_bias = ref_head.inputs(ref_hidden)
        kwargs.update(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    return run_as_output_layer(model, lambda h, head: head.apply(fused_pref.dpo_loss, h, labels, **kwargs), hidden)


def _dpo_reduction(kwargs) -> str:
    """"sum" or "mean": how :func:`fused_pref.dpo_loss` called with ``kwargs`` reduces the log-probs
    (its own defaults for what is not given)."""
    defaults = {name: p.default for name, p in inspect.signature(fused_pref.dpo_loss).parameters.items()}
    names = ("loss_type", "beta", "label_smoothing", "sft_weight", "length_normalize", "discopop_tau")
    return dpo_spec(**{name: kwargs.get(name, defaults[name]) for name in names}).reduction


def add_fused_forward(model):
    """Patch ``model.forward`` so that ``model(..., fused_pref=fn)`` runs only the decoder and
    returns ``fn(hidden, head)`` (``head`` an :class:`OutputHead`, e.g.
    ``fn = lambda h, head: head.apply(fused_pref.simpo_loss, h, labels)``); without ``fused_pref``
    the forward is the original one.  Call the wrapped model (DDP, FSDP, DeepSpeed, PEFT) so its
    forward hooks run: the decoder's layers are gathered as in any forward, and ``fn`` runs as the
    output layer's forward where an engine gathers that layer (:func:`run_as_output_layer`).
    Patch before ``accelerate`` (or a Trainer) prepares the model: the autocast wrapper it puts
    on ``forward`` then wraps this one; patched after, calls run outside that autocast unless the
    caller enters it.  Returns ``model``; patching twice is a no-op."""
    target = _unwrap(model)
    if getattr(target, "_fused_pref_forward", False):
        return model
    original = target.forward

    # Keep the original signature: generate() checks its keyword arguments against it.
    @functools.wraps(type(target).forward)
    def forward(self, *args, fused_pref=None, **kwargs):
        if fused_pref is None:
            if isinstance(original, types.MethodType):
                # Bound to this model, not to the one patched: a deepcopy of it runs its own weights.
                return original.__func__(self, *args, **kwargs)
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        return run_as_output_layer(self, fused_pref, backbone(self)(*args, **kwargs).last_hidden_state)

    target.forward = types.MethodType(forward, target)
    target._fused_pref_forward = True
    return model
