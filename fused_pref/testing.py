"""Inputs and error measures for parity checks: used by the tests, ``python -m fused_pref check``
and the benchmarks, and public so users can check parity in their own CI the same way."""

import math

import torch

# Every public function of fused_pref (and fused_pref.reference), by name.
TOKEN_FUNCTIONS = ("linear_logprobs", "sequence_logprobs", "linear_cross_entropy")
PAIR_FUNCTIONS = ("simpo_loss", "cpo_loss", "orpo_loss", "dpo_loss")
FUNCTIONS = TOKEN_FUNCTIONS + PAIR_FUNCTIONS

# ||out - ref|| / ||ref|| against an fp64 reference, per input dtype (DESIGN.md section 5).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def kernel_device() -> str:
    """Where parity checks run the kernels: ``"cuda"`` when a GPU is visible, else ``"cpu"`` (through
    Triton's interpreter, which must be enabled with ``TRITON_INTERPRET=1`` before import)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64; ``inf`` when ``out`` holds a NaN or an inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


def ragged_labels(R, T, V, *, generator, ignore_index=-100, gap=True):
    """Labels ``[R, T]``: an ignored prompt of random length, a completion, ignored padding; with
    ``gap`` the first sequence also has an ignored run inside its completion.  Every sequence keeps
    at least one valid token."""
    labels = torch.randint(0, V, (R, T), generator=generator)
    for r in range(R):
        start = int(torch.randint(0, max(1, T // 3), (1,), generator=generator))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=generator))
        labels[r, :start] = ignore_index
        labels[r, end:] = ignore_index
        if gap and r == 0 and end - start >= 4:
            labels[r, start + 1 : start + 3] = ignore_index
    return labels


def make_inputs(R, T, D, V, *, dtype=torch.float32, device="cpu", bias=True, seed=0, confident=0.25,
                ignore_index=-100):
    """Random projection inputs ``hidden [R, T, D]``, ``weight [V, D]``, ``bias [V]`` (or None) and
    ragged ``labels [R, T]``.  ``hidden`` is scaled by ``1/sqrt(D)``; for a ``confident`` fraction of
    valid tokens the label's weight row is the token's hidden state (times 4), so those
    predictions are confident, as in a trained model.  Leaf tensors, ``requires_grad=True``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, T, D, generator=gen) / math.sqrt(D)
    weight = torch.randn(V, D, generator=gen)
    labels = ragged_labels(R, T, V, generator=gen, ignore_index=ignore_index)
    flat_h, flat_l = hidden.view(-1, D), labels.view(-1)
    picked = (flat_l != ignore_index) & (torch.rand(flat_l.shape, generator=gen) < confident)
    for i in picked.nonzero().flatten().tolist():
        weight[flat_l[i]] = 4.0 * math.sqrt(D) * flat_h[i]
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    leaf = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return {"hidden": leaf(hidden), "weight": leaf(weight), "bias": leaf(b), "labels": labels.to(device)}


def as_reference(inputs: dict) -> dict:
    """fp64 CPU leaf copies of floating inputs (labels unchanged) for the reference computation."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            value = value.detach().cpu().double().requires_grad_(value.requires_grad)
        elif isinstance(value, torch.Tensor):
            value = value.cpu()
        out[key] = value
    return out
