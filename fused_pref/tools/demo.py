"""``python -m fused_pref demo``: SimPO training of a tiny Llama-style model, fused against the reference.

A synthetic preference task: a prompt is an arithmetic progression of token ids (start and step
random), the chosen completion continues it and the rejected one is random tokens.  Two copies of
one randomly initialised ``transformers`` Llama train on the same batches with the same optimizer:
one with ``fused_pref.integrations.hf``'s SimPO (the Triton kernels; through the interpreter on a
machine without a GPU), one with ``fused_pref.reference.simpo_loss`` on the same hidden states (the
logits materialized).  Each step prints both losses and the fused run's reward accuracy; the end
compares the two loss curves, the held-out reward accuracy, and the memory the loss takes beyond
its inputs and gradients: measured here at the demo's size, and at Llama-3-8B's head by the
analytic formula of ``fused_pref.tools.accounting`` (which ``python -m fused_pref memory`` checks
against a measurement).
"""

import copy
import inspect
import math
from dataclasses import dataclass, field

import torch

import fused_pref

from .accounting import analytic_bytes, analytic_terms, human_bytes
from .memory import LiveBytesRecorder

# The model: Llama's architecture, small enough for the Triton interpreter on two CPU cores.
VOCAB, HIDDEN, LAYERS, HEADS = 300, 64, 2, 4
PAD, FIRST_TOKEN = 0, 3
# SimPO's own defaults (fused_pref.simpo_loss), so the demo shows what a plain call does.
SIMPO = {name: inspect.signature(fused_pref.simpo_loss).parameters[name].default for name in ("beta", "gamma")}
LEARNING_RATE = 3e-3
# The loss curves match when every step's losses agree to this relative error: the two paths
# sum in different orders in fp32, and a few dozen Adam steps amplify that a little.
CURVE_RTOL = 1e-3


@dataclass
class DemoResult:
    fused_losses: list = field(default_factory=list)
    reference_losses: list = field(default_factory=list)
    accuracies: list = field(default_factory=list)       # fused run, per training batch
    heldout_accuracy: dict = field(default_factory=dict)  # "fused" / "reference" -> float
    memory: dict = field(default_factory=dict)            # "fused" / "reference" -> peak bytes at the demo's size

    @property
    def max_relative_gap(self) -> float:
        """The largest gap between the curves, relative to the reference's loss; NaN if any loss is
        not finite (``max`` would skip a NaN past the first step)."""
        gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(self.fused_losses, self.reference_losses)]
        return max(gaps) if all(math.isfinite(gap) for gap in gaps) else math.nan

    @property
    def curves_match(self) -> bool:
        return self.max_relative_gap <= CURVE_RTOL


def make_pairs(n, *, generator, max_len=20):
    """``input_ids``, ``attention_mask``, ``labels`` ``[2n, max_len]``: n chosen sequences then their n
    rejected ones, right-padded, labels -100 on prompt and padding (Hugging Face alignment)."""
    span = VOCAB - FIRST_TOKEN
    rows, prompt_lengths = [], []
    for _ in range(n):
        start = int(torch.randint(0, span, (1,), generator=generator))
        step = int(torch.randint(1, 6, (1,), generator=generator))
        prompt_len = int(torch.randint(3, 7, (1,), generator=generator))
        length = int(torch.randint(3, max_len - prompt_len - 1, (1,), generator=generator))
        progression = [FIRST_TOKEN + (start + k * step) % span for k in range(prompt_len + length)]
        rejected = torch.randint(FIRST_TOKEN, VOCAB, (length + int(torch.randint(-1, 2, (1,), generator=generator)),),
                                 generator=generator).tolist()
        rows.append((progression, progression[:prompt_len] + rejected))
        prompt_lengths.append(prompt_len)
    sequences = [c for c, _ in rows] + [r for _, r in rows]
    prompts = prompt_lengths + prompt_lengths
    input_ids = torch.full((2 * n, max_len), PAD)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (seq, prompt_len) in enumerate(zip(sequences, prompts)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        labels[i, prompt_len: len(seq)] = torch.tensor(seq[prompt_len:])
    return input_ids, attention_mask, labels


def tiny_llama(seed=0):
    try:
        import transformers
    except ImportError as error:
        raise SystemExit("the demo trains a transformers model: pip install transformers (from a clone of this "
                         "repository: pip install -e '.[hf]')") from error
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                      max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _simpo(module, model, batch):
    """SimPO of ``module`` (``fused_pref`` or ``fused_pref.reference``) on the model's hidden states."""
    from fused_pref.integrations import hf

    input_ids, attention_mask, labels = batch
    hidden = hf.hidden_states(model, input_ids, attention_mask)
    return hf.output_head(model).apply(module.simpo_loss, hidden, labels, **SIMPO)


def heldout_accuracy(model, module, batch) -> float:
    with torch.no_grad():
        return _simpo(module, model, batch).metrics()["rewards/accuracies"]


def loss_memory(model, batch) -> dict:
    """Peak bytes each path's SimPO forward+backward keeps live beyond its inputs (hidden states,
    lm_head weight) and their gradients, at the demo's shape, measured (``LiveBytesRecorder``)."""
    from fused_pref.integrations import hf

    input_ids, attention_mask, labels = batch
    with torch.no_grad():
        hidden = hf.hidden_states(model, input_ids, attention_mask)
    peaks = {}
    for name, module in (("fused", fused_pref), ("reference", fused_pref.reference)):
        h = hidden.detach().clone().requires_grad_()
        w = model.get_output_embeddings().weight.detach().clone().requires_grad_()
        with LiveBytesRecorder() as recorder:
            module.simpo_loss(h, w, labels, **SIMPO, shift=True).loss.backward()
        peaks[name] = recorder.peak(exclude=[h.grad, w.grad]).nbytes
    return peaks


def _llama3_8b_lines(tokens=16384) -> list[str]:
    """The same comparison at Llama-3-8B's head, by the analytic formula of ``python -m fused_pref
    memory`` (which also measures it at scaled shapes; the H200 measured it to the digit,
    benchmarks/NOTES.md)."""
    from .workload import MODELS

    head = MODELS["llama3-8b"]
    fused, reference = (analytic_bytes(name, analytic_terms(name, "simpo", head.softcap), tokens, head.hidden,
                                       head.vocab) for name in ("fused-vchunk", "reference"))
    return [f"  {head.name} head (D {head.hidden}, V {head.vocab}), {tokens} tokens, bf16, analytic: reference "
            f"{human_bytes(reference)}, fused {human_bytes(fused)}: saves {human_bytes(reference - fused)} "
            f"({reference / fused:.0f}x less) (`python -m fused_pref memory` also measures it)"]


def _sparkline(values, lo, hi) -> str:
    bars = " ▁▂▃▄▅▆▇█"
    return "".join(bars[min(8, max(0, round(8 * (v - lo) / (hi - lo or 1))))] for v in values)


def run_demo(steps=30, pairs=8, *, seed=0, device=None, out=print) -> DemoResult:
    """Train for ``steps`` steps of ``pairs`` preference pairs; print as it goes; return the curves."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(seed)
    fused_model = tiny_llama(seed).to(device)
    reference_model = copy.deepcopy(fused_model)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=LEARNING_RATE)
                  for name, m in (("fused", fused_model), ("reference", reference_model))}
    heldout = tuple(t.to(device) for t in make_pairs(64, generator=torch.Generator().manual_seed(seed + 1)))
    result = DemoResult()

    n_params = sum(p.numel() for p in fused_model.parameters())
    out(f"SimPO (its defaults: beta {SIMPO['beta']}, gamma {SIMPO['gamma']}) on a tiny Llama ({LAYERS} layers, "
        f"hidden {HIDDEN}, vocab {VOCAB}, {n_params / 1e3:.0f}k parameters), {pairs} pairs per step, AdamW lr "
        f"{LEARNING_RATE}, on {device}.")
    out("Task: the prompt is an arithmetic progression of token ids; chosen continues it, rejected is random.")
    out("Both models start from the same weights and see the same batches; 'reference' materializes the logits.\n")
    out(f"{'step':>4}  {'loss fused':>10}  {'loss reference':>14}  {'reward acc':>10}  {'margin':>7}")
    for step in range(1, steps + 1):
        batch = tuple(t.to(device) for t in make_pairs(pairs, generator=generator))
        if step == 1:
            result.memory = loss_memory(fused_model, batch)
        losses = {}
        for name, model, module in (("fused", fused_model, fused_pref), ("reference", reference_model,
                                                                         fused_pref.reference)):
            output = _simpo(module, model, batch)
            output.loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            losses[name] = output.loss.item()
            if name == "fused":
                metrics = output.metrics()
        result.fused_losses.append(losses["fused"])
        result.reference_losses.append(losses["reference"])
        result.accuracies.append(metrics["rewards/accuracies"])
        out(f"{step:>4}  {losses['fused']:>10.5f}  {losses['reference']:>14.5f}  "
            f"{metrics['rewards/accuracies']:>10.2f}  {metrics['rewards/margins']:>7.3f}")

    result.heldout_accuracy = {"fused": heldout_accuracy(fused_model, fused_pref, heldout),
                               "reference": heldout_accuracy(reference_model, fused_pref.reference, heldout)}
    lo = min(result.fused_losses + result.reference_losses)
    hi = max(result.fused_losses + result.reference_losses)
    verdict = "match" if result.curves_match else "DIFFER"
    out("")
    out(f"Loss curves {verdict}: largest relative gap {result.max_relative_gap:.1e} over {steps} steps "
        f"(tolerance {CURVE_RTOL:g}).")
    out(f"  fused      {_sparkline(result.fused_losses, lo, hi)}  {result.fused_losses[0]:.4f} -> "
        f"{result.fused_losses[-1]:.4f}")
    out(f"  reference  {_sparkline(result.reference_losses, lo, hi)}  {result.reference_losses[0]:.4f} -> "
        f"{result.reference_losses[-1]:.4f}")
    out(f"Held-out reward accuracy ({heldout[0].shape[0] // 2} pairs): fused {result.heldout_accuracy['fused']:.2f}, "
        f"reference {result.heldout_accuracy['reference']:.2f}.")
    N, dtype = batch[0].numel(), str(fused_model.dtype).replace("torch.", "")
    fused_bytes, reference_bytes = result.memory["fused"], result.memory["reference"]
    out("Loss memory, peak bytes beyond the inputs (hidden states, lm_head) and their gradients:")
    out(f"  this demo ({N} tokens, D {HIDDEN}, V {VOCAB}, {dtype}), measured: reference {human_bytes(reference_bytes)}, "
        f"fused {human_bytes(fused_bytes)}: saves {human_bytes(reference_bytes - fused_bytes)} "
        f"({reference_bytes / max(fused_bytes, 1):.1f}x less)")
    for line in _llama3_8b_lines():
        out(line)
    for name, losses in (("fused", result.fused_losses), ("reference", result.reference_losses)):
        steps_not_finite = [step for step, loss in enumerate(losses, start=1) if not math.isfinite(loss)]
        if steps_not_finite:
            out(f"the {name} loss is not finite at steps {steps_not_finite}")
    return result
