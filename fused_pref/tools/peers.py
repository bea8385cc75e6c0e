"""The implementations ``python -m fused_pref bench`` compares, as ``loss_fn``-style functions
``f(hidden, weight, labels, ref_hidden, ref_weight) -> scalar loss``.

Ours (the fused path once per tile plan, cross-entropy's gradient-in-forward mode, the reference)
plus ``torch.compile`` of the reference,
Liger-Kernel's fused linear losses, Cut Cross-Entropy and TRL's chunked LM head.  The peers are
optional extras, imported only when asked for; one that is missing, or that has no equivalent of a
case, raises ``Unavailable`` with the note the benchmark prints.

The peers' calls follow their sources (Liger-Kernel ``src/liger_kernel/chunked_loss/*_loss.py`` and
``transformers/fused_linear_cross_entropy.py``; ml-cross-entropy ``linear_cross_entropy.py``; TRL 1.16
``trl/trainer/utils.py`` ``add_fused_lm_head``, ``trl/trainer/dpo_trainer.py`` ``_compute_loss`` and
``trl/trainer/sft_trainer.py`` ``compute_loss``).  ``tests/test_bench.py`` checks that each installed
peer computes the same loss and gradients as the fused path (Liger-Kernel, TRL and the compiled
reference run on the CPU too; Cut Cross-Entropy's kernels need a GPU).
"""

import types

import torch
import torch.nn.functional as F

import fused_pref

from .workload import FUSED_PLANS, library_implementations, loss_fn


# Our losses' defaults, which ``workload.loss_fn`` keeps: the peers are given the same.
SIMPO_BETA, SIMPO_GAMMA, DPO_BETA = 2.0, 1.0, 0.1


class Unavailable(Exception):
    """This implementation cannot run this case here; the message says why."""


def _first(out):
    # Liger's losses return the bare loss in older versions, (loss, metrics) or an output object
    # with .loss in newer ones.
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "loss", out)


def compiled_reference(loss: str, softcap=None):
    # A fresh, static-shape compile per case: dynamo caches by code object, and its recompile limit
    # (8) would otherwise send later shapes back to eager without a word.
    torch._dynamo.reset()
    return torch.compile(loss_fn(fused_pref.reference, loss, softcap=softcap), dynamic=False)


def liger(loss: str, softcap=None):
    try:
        if loss == "cross_entropy":
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        else:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearSimPOLoss
    except ImportError as error:
        raise Unavailable(f"Liger-Kernel not installed ({error.name}); pip install liger-kernel") from None
    if loss == "cross_entropy":
        # The softcap argument exists only in recent versions.
        try:
            module = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean",
                                                      **({"softcap": softcap} if softcap else {}))
        except TypeError as error:
            raise Unavailable(f"this Liger-Kernel's cross-entropy takes no softcap ({error})") from None
        # Liger's cross-entropy takes [N, D] rows and [N] labels.
        return lambda h, w, labels, ref_h, ref_w: _first(module(w, h.flatten(0, 1), labels.flatten()))
    if softcap is not None:
        raise Unavailable("Liger-Kernel's preference losses take no softcap")
    # Layout as ours: [2B, T, D] with the B chosen sequences first.  compute_nll_loss=False: no SFT term.
    if loss == "simpo":
        module = LigerFusedLinearSimPOLoss(ignore_index=-100, beta=SIMPO_BETA, gamma=SIMPO_GAMMA,
                                           compute_nll_loss=False)
        return lambda h, w, labels, ref_h, ref_w: _first(module(w, h, labels))
    # Some Liger versions average DPO's token log-probs where TRL (and we) sum them: the same work.
    module = LigerFusedLinearDPOLoss(ignore_index=-100, beta=DPO_BETA, compute_nll_loss=False, use_ref_model=True)
    return lambda h, w, labels, ref_h, ref_w: _first(module(w, h, labels, ref_input=ref_h, ref_weight=ref_w))


def cut_cross_entropy(loss: str, softcap=None):
    if loss != "cross_entropy":
        raise Unavailable("Cut Cross-Entropy has no preference losses")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        raise Unavailable("Cut Cross-Entropy not installed; pip install cut-cross-entropy") from None

    # Keywords only: the fourth positional argument is bias in recent versions, ignore_index in
    # older ones.  CCE's default filter_eps="auto" skips small gradient tiles (not exact; ours is).
    def call(h, w, labels, ref_h, ref_w):
        return linear_cross_entropy(h.flatten(0, 1), w, labels.flatten(), ignore_index=-100, softcap=softcap,
                                    reduction="mean")

    return call


# The per-token fields TRL's trainers ask the head for (DPOTrainer.__init__, SFTTrainer.__init__):
# besides the log-probs, the inputs of their logged metrics, each an extra reduction in every tile.
TRL_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
TRL_SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


class _TrlHead:
    """What TRL's ``add_fused_lm_head`` patches, reduced to the LM head: a "backbone" that hands back
    the hidden states it is called with, and an output layer whose weight is the call's.  So the
    benchmark runs TRL's own forward (its masking, token compaction and chunk size), not a copy."""

    def __init__(self, add_fused_lm_head, softcap, outputs):
        from transformers import PretrainedConfig  # a dependency of trl

        # The head reads Gemma-2's softcap from the config, as from a real model's.
        self.config = PretrainedConfig(final_logit_softcapping=softcap)
        self.lm_head = types.SimpleNamespace(weight=None, bias=None)
        add_fused_lm_head(self, outputs=outputs)

    def forward(self, **kwargs):
        # Replaced on the instance by add_fused_lm_head, which copies this signature from the class.
        raise NotImplementedError

    def base_model(self, hidden_states, use_cache):
        return types.SimpleNamespace(last_hidden_state=hidden_states)

    def get_output_embeddings(self):
        return self.lm_head

    def __call__(self, hidden, weight, labels):
        """TRL's ``FusedCausalLMOutput`` for ``hidden [R, T, D]`` and ``labels [R, T]`` already aligned:
        TRL's ``shift_labels`` (pre-shifted labels) path."""
        self.lm_head.weight = weight
        try:
            return self.forward(hidden_states=hidden, shift_labels=labels, fused_lm_head=True)
        finally:
            # Held past the call, the weight would outlive its batch (1 GB at Llama-3-8B in bf16) into
            # the next measurement; TRL's backward reads the weight its autograd Function saved.
            self.lm_head.weight = None


def trl_chunked(loss: str, softcap=None):
    """TRL 1.16's chunked LM head (cuBLAS tiles folded by a Triton kernel on CUDA, by torch ops on
    the CPU) with the loss its trainers compute on the log-probs: SFTTrainer's cross-entropy,
    DPOTrainer's sigmoid DPO.  TRL's SimPO (CPOTrainer) forms the full logits, so the SimPO entry is
    this head under DPOTrainer's settings with SimPO's loss on top."""
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError as error:
        raise Unavailable(f"TRL's chunked LM head not found ({error}); pip install 'trl>=1.16'") from None
    if loss == "cross_entropy":
        head = _TrlHead(add_fused_lm_head, softcap, TRL_SFT_OUTPUTS)

        def cross_entropy(h, w, labels, ref_h, ref_w):
            out = head(h, w, labels)
            return -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)

        return cross_entropy
    head = _TrlHead(add_fused_lm_head, softcap, TRL_DPO_OUTPUTS)
    if loss == "simpo":
        def simpo(h, w, labels, ref_h, ref_w):
            out = head(h, w, labels)
            chosen, rejected = (out.log_probs.sum(1) / out.label_mask.sum(1).clamp(min=1)).chunk(2)
            return -F.logsigmoid(SIMPO_BETA * (chosen - rejected) - SIMPO_GAMMA).mean()

        return simpo
    # DPOTrainer patches its reference model with the default outputs, the log-probs alone.
    ref_head = _TrlHead(add_fused_lm_head, softcap, ("log_probs",))

    def dpo(h, w, labels, ref_h, ref_w):
        chosen, rejected = head(h, w, labels).log_probs.sum(1).chunk(2)
        with torch.no_grad():
            ref_chosen, ref_rejected = ref_head(ref_h, ref_w, labels).log_probs.sum(1).chunk(2)
        return -F.logsigmoid(DPO_BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

    return dpo


_PEER_FACTORIES = {"reference-compile": compiled_reference, "liger": liger, "cce": cut_cross_entropy,
                   "trl-chunked": trl_chunked}
# The opt-in gradient-in-forward mode (fused_pref.gradient_in_forward), every loss bench times; not
# in the memory accounting, whose CPU run would count the fp32 weight copy only the CPU makes.
IN_FORWARD = "fused-inforward"


def in_forward(loss: str, softcap=None):
    """``loss`` with ``backward="in_forward"``, as a user should run it: with validation (the
    default), whose host sync cuts a cross-entropy's blocks to the valid tokens (without it they
    span every token); for a pair loss, a workspace that holds a pair of the batch's sequences
    whole, 2T rows rounded up to 128 of 4 bytes per logit (a pair larger than its block takes one
    more pass of logits)."""
    def call(h, w, labels, ref_h, ref_w):
        options = {"backward": "in_forward", "validate": True}
        if loss != "cross_entropy":
            options["workspace_bytes"] = -(-2 * labels.shape[-1] // 128) * 128 * w.shape[0] * 4
        return loss_fn(fused_pref, loss, softcap=softcap, **options)(h, w, labels, ref_h, ref_w)
    return call


# Every name ``implementations`` knows, in the order it runs them.
IMPLEMENTATION_ORDER = (*(f"fused-{name}" for name in FUSED_PLANS), IN_FORWARD, "reference", *_PEER_FACTORIES)


def implementations(loss: str, softcap=None, names=None) -> tuple[dict, list[str]]:
    """(name -> function, notes) for every implementation of ``loss`` (or those in ``names``):
    ours first, then each peer that can run here."""
    funcs = library_implementations(loss, softcap)
    unknown = set(names or ()) - set(IMPLEMENTATION_ORDER)
    if unknown:
        raise ValueError(f"unknown implementations {sorted(unknown)}; known: {list(IMPLEMENTATION_ORDER)}")
    notes = []
    if names is None or IN_FORWARD in names:
        funcs[IN_FORWARD] = in_forward(loss, softcap)
    for name, factory in _PEER_FACTORIES.items():
        if names is not None and name not in names:
            continue
        try:
            funcs[name] = factory(loss, softcap)
        except Unavailable as why:
            notes.append(f"{name} skipped for {loss}: {why}")
    if names is not None:
        funcs = {k: f for k, f in funcs.items() if k in names}
    return funcs, notes
