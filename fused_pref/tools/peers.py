"""The implementations ``python -m fused_pref bench`` compares, as ``loss_fn``-style functions
``f(hidden, weight, labels, ref_hidden, ref_weight) -> scalar loss``.

Ours (the fused path once per tile plan, the reference) plus ``torch.compile`` of the
reference, Liger-Kernel's fused linear losses and Cut Cross-Entropy.  The peers are optional
extras, imported only when asked for; one that is missing, or that has no equivalent of a case,
raises ``Unavailable`` with the note the benchmark prints.

The peers' calls follow their sources (Liger-Kernel ``src/liger_kernel/chunked_loss/*_loss.py`` and
``transformers/fused_linear_cross_entropy.py``; ml-cross-entropy ``linear_cross_entropy.py``).
``tests/test_bench.py`` checks that each installed peer computes the same loss and gradients as the
fused path (Liger-Kernel and the compiled reference run on the CPU too; Cut Cross-Entropy's kernels
need a GPU).
"""

import torch

import fused_pref

from .workload import FUSED_PLANS, library_implementations, loss_fn


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
        module = LigerFusedLinearSimPOLoss(ignore_index=-100, beta=2.0, gamma=1.0, compute_nll_loss=False)
        return lambda h, w, labels, ref_h, ref_w: _first(module(w, h, labels))
    # Some Liger versions average DPO's token log-probs where TRL (and we) sum them: the same work.
    module = LigerFusedLinearDPOLoss(ignore_index=-100, beta=0.1, compute_nll_loss=False, use_ref_model=True)
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


_PEER_FACTORIES = {"reference-compile": compiled_reference, "liger": liger, "cce": cut_cross_entropy}
# Every name ``implementations`` knows, in the order it runs them.
IMPLEMENTATION_ORDER = (*(f"fused-{name}" for name in FUSED_PLANS), "reference", *_PEER_FACTORIES)


def implementations(loss: str, softcap=None, names=None) -> tuple[dict, list[str]]:
    """(name -> function, notes) for every implementation of ``loss`` (or those in ``names``):
    ours first, then each peer that can run here."""
    funcs = library_implementations(loss, softcap)
    unknown = set(names or ()) - set(funcs) - set(_PEER_FACTORIES)
    if unknown:
        raise ValueError(f"unknown implementations {sorted(unknown)}; known: {[*funcs, *_PEER_FACTORIES]}")
    notes = []
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
