"""What the benchmarks and the memory accounting run: the LM heads of real models, the batches fed
to them and the loss calls.  One table, shared by ``benchmarks/test_bench_gpu.py``,
``python -m fused_pref bench`` and ``python -m fused_pref memory``.
"""

import math
from dataclasses import dataclass

import torch

import fused_pref
from fused_pref.kernels import tile_plan


@dataclass(frozen=True)
class HeadShape:
    """The output layer of a model: ``hidden`` size ``D``, vocabulary ``V``, Gemma-2's logit softcap."""

    name: str
    hidden: int
    vocab: int
    softcap: float | None = None


# From each model's config.json (hidden_size, vocab_size, final_logit_softcapping).
MODELS = {
    "llama3-8b": HeadShape("Llama-3-8B", hidden=4096, vocab=128256),
    "qwen2.5-7b": HeadShape("Qwen2.5-7B", hidden=3584, vocab=152064),
    "gemma2-2b": HeadShape("Gemma-2-2B", hidden=2304, vocab=256000, softcap=30.0),
    "mistral-7b": HeadShape("Mistral-7B", hidden=4096, vocab=32768),
}
TOKENS_PER_STEP = (4096, 16384, 32768)
LOSSES = ("cross_entropy", "simpo", "dpo")

# Batches are sequences of 1024 tokens whose first part is prompt (label -100), as in a preference
# batch: by default a quarter, so 3/4 of the tokens carry a label.  `bench --prompt-fraction` takes
# these names or a number.
SEQUENCE_LENGTH = 1024
PROMPT_FRACTION = 0.25
PROMPT_FRACTIONS = {"quarter": 0.25, "half": 0.5}

# The library's own implementations: the fused path once per tile plan (kernels/tiles.py), by the
# name its results rows carry.  "fused-vchunk" (the V-chunked backward, the default plan) keeps the
# name the GPU results have always had.
FUSED_PLANS = {"vchunk": "narrow", "wide": "wide", "widest": "widest", "cublas": "cublas"}


def sequences_for(tokens: int) -> int:
    """Number of sequences (even: chosen then rejected) that hold ``tokens`` tokens."""
    if tokens <= 0 or tokens % (2 * SEQUENCE_LENGTH):
        raise ValueError(f"tokens per step must be a positive multiple of {2 * SEQUENCE_LENGTH}, got {tokens}")
    return tokens // SEQUENCE_LENGTH


def prompt_length(T: int, prompt_fraction: float) -> int:
    return int(T * prompt_fraction)


@dataclass
class Batch:
    """One step's inputs: ``hidden [R, T, D]`` and ``weight [V, D]`` (leaves needing gradients),
    ``labels [R, T]`` (each row's first ``prompt_fraction`` ignored), and for DPO a reference
    model's ``ref_hidden`` / ``ref_weight`` (no grad)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    prompt_fraction: float
    ref_hidden: torch.Tensor | None = None
    ref_weight: torch.Tensor | None = None

    @property
    def valid_tokens(self) -> int:
        R, T = self.labels.shape
        return R * (T - prompt_length(T, self.prompt_fraction))

    @property
    def grads(self) -> list[torch.Tensor]:
        """The tensors whose ``.grad`` a step fills."""
        return [self.hidden, self.weight]

    def inputs(self) -> tuple:
        """The arguments of a ``loss_fn`` function."""
        return self.hidden, self.weight, self.labels, self.ref_hidden, self.ref_weight


def make_batch(R, T, D, V, *, dtype=torch.bfloat16, device="cpu", seed=0, reference_model=False,
               prompt_fraction=PROMPT_FRACTION) -> Batch:
    """Random inputs, fresh for each call (never zeros, whose uniform softmax is no real case):
    ``hidden`` scaled by ``1/sqrt(D)`` and a unit-variance ``weight`` give logits of unit variance;
    labels are uniform over the vocabulary, with each sequence's first ``prompt_fraction`` ignored."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    hidden = randn(R, T, D, scale=1 / math.sqrt(D)).requires_grad_()
    weight = randn(V, D).requires_grad_()
    labels = torch.randint(0, V, (R, T), generator=gen, device=device)
    labels[:, : prompt_length(T, prompt_fraction)] = -100
    batch = Batch(hidden, weight, labels, prompt_fraction)
    if reference_model:
        batch.ref_hidden = randn(R, T, D, scale=1 / math.sqrt(D))
        batch.ref_weight = randn(V, D)
    return batch


def loss_fn(module, loss: str, *, softcap=None, **options):
    """``f(hidden, weight, labels, ref_hidden, ref_weight) -> scalar loss`` for ``loss`` through
    ``module`` (``fused_pref`` or ``fused_pref.reference``, which share signatures).
    ``validate=False`` unless ``options`` say otherwise: no host synchronisation inside a timed step."""
    common = {"softcap": softcap, "validate": False, **options}
    if loss == "cross_entropy":
        return lambda h, w, labels, ref_h, ref_w: module.linear_cross_entropy(h, w, labels, **common)
    if loss == "simpo":
        return lambda h, w, labels, ref_h, ref_w: module.simpo_loss(h, w, labels, **common).loss
    if loss == "dpo":
        return lambda h, w, labels, ref_h, ref_w: module.dpo_loss(
            h, w, labels, ref_hidden=ref_h, ref_weight=ref_w, **common).loss
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def in_plan(fn, plan: str):
    """``fn`` with its calls made inside ``tile_plan(plan)`` (their backwards keep the plan)."""
    def call(*args):
        with tile_plan(plan):
            return fn(*args)
    return call


def library_implementations(loss: str, softcap=None, *, validate: bool = True) -> dict:
    """This library's implementations of ``loss`` by name, as ``loss_fn`` functions: the fused path
    once per tile plan, then the reference.  The fused calls are ``validate``d by default, as a user's
    call is: cuBLAS takes its sizes from the host, so only after validation's host read do the
    backward's products (and the "cublas" plan's logits) cover just the valid tokens; without it they
    span every token, prompt or not (a third more product work at a quarter of prompt; the tiles
    skip the ignored rows on the device either way).  The memory accounting runs them unvalidated."""
    impls = {f"fused-{name}": in_plan(loss_fn(fused_pref, loss, softcap=softcap, validate=validate), plan)
             for name, plan in FUSED_PLANS.items()}
    impls["reference"] = loss_fn(fused_pref.reference, loss, softcap=softcap)
    return impls


def floor_flops(loss: str, valid_tokens: int, D: int, V: int, *, backward: bool) -> int:
    """The FLOP floor of DESIGN.md section 4 over the valid tokens: 2NDV for the forward's logits,
    8NDV with the backward (logits again, then d_hidden and d_weight); DPO's reference model adds
    one more forward, 2NDV."""
    passes = (8 if backward else 2) + (2 if loss == "dpo" else 0)
    return passes * valid_tokens * D * V
