"""The parity harness: inputs, the error measure, the table of cases and the one comparison that the
tests, ``python -m fused_pref check`` and your own CI share.

``compare(fn, inputs)`` runs ``fn(fused_pref, inputs)`` and ``fn(fused_pref.reference, ...)`` on
fp64 CPU copies of the same inputs, backpropagates a fixed random weighting of the output through
both, and gives ``||out - ref|| / ||ref||`` for the value, a loss's log-probs and rewards, the entropy
and z-loss where asked for, and every input's gradient; the argmax and token accuracy must equal
the reference's, and the logged metrics agree.  The fused call runs with fresh buffers NaN-filled
(:func:`nan_filled`), so an element a kernel forgot to write fails instead of passing by luck::

    from fused_pref.testing import TOLERANCE, compare, make_inputs
    x = make_inputs(4, 23, 97, 1003, dtype=torch.bfloat16, device="cuda")
    compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"]), x).check(torch.bfloat16)
"""

import collections
import contextlib
import math
import traceback
from dataclasses import dataclass, field, replace

import torch

import fused_pref
from fused_pref.grpo import GRPOOutput
from fused_pref.kernels import KERNELS_INTERPRETED
from fused_pref.kto import KTOOutput
from fused_pref.outputs import CrossEntropyOutput, TokenLogprobs
from fused_pref import validation
from fused_pref.preference import DPO_LOSS_TYPES, SORTING_LOSS_TYPES

# Every public function of fused_pref (and fused_pref.reference), by name.
TOKEN_FUNCTIONS = ("linear_logprobs", "sequence_logprobs", "linear_cross_entropy")
PAIR_FUNCTIONS = ("simpo_loss", "cpo_loss", "orpo_loss", "dpo_loss")
FUNCTIONS = TOKEN_FUNCTIONS + PAIR_FUNCTIONS
# What ``call`` takes: every function, DPO once per loss type ("dpo_loss-ipo").
CALLS = TOKEN_FUNCTIONS + PAIR_FUNCTIONS[:-1] + tuple(f"dpo_loss-{t}" for t in DPO_LOSS_TYPES)
# The outputs whose ``loss`` is the value, and those with TRL's ``metrics()``, which compare checks too.
_LOSS_OUTPUTS = (fused_pref.PreferenceOutput, CrossEntropyOutput, KTOOutput, GRPOOutput)
_METRIC_OUTPUTS = (fused_pref.PreferenceOutput, KTOOutput, GRPOOutput)

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


def _as_reference(value):
    """An fp64 CPU copy of a floating tensor (a leaf where the original needs a gradient); other
    tensors moved to the CPU; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
        return value.detach().cpu().double().requires_grad_(value.requires_grad)
    return value.cpu() if isinstance(value, torch.Tensor) else value


def as_reference(inputs: dict) -> dict:
    """fp64 CPU leaf copies of floating inputs (labels unchanged) for the reference computation."""
    return {key: _as_reference(value) for key, value in inputs.items()}


def call(module, name, inputs, **kwargs):
    """``module.<function>(hidden, weight, labels, bias, **kwargs)`` for a name of ``CALLS`` (or any
    public function whose other arguments ``kwargs`` give):
    ``"dpo_loss-<loss_type>"`` selects the loss type, and gives DPO zero reference log-probs unless
    ``kwargs`` give a reference (and ``exo_pair``, which refuses 0, ``label_smoothing=1e-3`` unless
    they give one).  Tensor arguments follow the module: fp64 CPU copies for
    ``fused_pref.reference``."""
    if name.startswith("dpo_loss-"):
        name, kwargs["loss_type"] = "dpo_loss", name.split("-", 1)[1]
        if kwargs["loss_type"] == "exo_pair" and not kwargs.get("label_smoothing"):
            kwargs["label_smoothing"] = 1e-3
        if not {"ref_logps", "ref_hidden"} & kwargs.keys():
            cu_seqlens = kwargs.get("cu_seqlens")
            sequences = inputs["hidden"].shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
            kwargs["ref_logps"] = torch.zeros(sequences, device=inputs["hidden"].device)
    if module is fused_pref.reference:
        kwargs = {key: _as_reference(value) for key, value in kwargs.items()}
    return getattr(module, name)(inputs["hidden"], inputs["weight"], inputs["labels"], inputs["bias"], **kwargs)


def value_of(out) -> torch.Tensor:
    """The differentiable output: a loss's ``loss`` (preference, cross-entropy, KTO, GRPO); per-token
    log-probs with their statistics, the log-probs stacked on the entropy where it was asked for
    (so a backward reaches both); else the tensor itself."""
    if isinstance(out, _LOSS_OUTPUTS):
        return out.loss
    if isinstance(out, TokenLogprobs):
        return out.logp if out.entropy is None else torch.stack([out.logp, out.entropy])
    return out


# The statistics of a TokenLogprobs or CrossEntropyOutput compared by relative error; the others exactly.
_MEASURED_STATISTICS = ("entropy", "z_loss")


def _statistics(out) -> dict:
    """The statistics of a ``TokenLogprobs``, ``CrossEntropyOutput`` or ``GRPOOutput`` that were asked
    for (or come always), by name."""
    names = {TokenLogprobs: ("entropy", "token_accuracy", "argmax"),
             CrossEntropyOutput: ("z_loss", "token_accuracy", "predicted_tokens"),
             GRPOOutput: ("entropy",)}.get(type(out), ())
    return {name: getattr(out, name) for name in names if getattr(out, name) is not None}


def _exact_difference(ours, theirs) -> str | None:
    """How ``ours`` differs from the reference's ``theirs`` (dtype, shape or entries), or None."""
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return f"{ours.dtype} {tuple(ours.shape)}, the reference's {theirs.dtype} {tuple(theirs.shape)}"
    count = int((ours.cpu() != theirs.cpu()).sum())
    return f"{count} of {ours.numel()} entries differ from the reference's" if count else None


@contextlib.contextmanager
def nan_filled(warn_only=True):
    """Fresh buffers (``torch.empty`` and the like) filled with NaN, through
    ``torch.use_deterministic_algorithms(True, warn_only=warn_only)`` with
    ``fill_uninitialized_memory``; the previous settings are restored on exit, error or not.
    ``warn_only`` (the default): an op without a deterministic implementation (a cuBLAS product
    without ``CUBLAS_WORKSPACE_CONFIG``) warns instead of failing, since NaN-filling is the point
    here; ``False`` refuses it, as the determinism tests want."""
    enabled = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=previous_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@dataclass
class Comparison:
    """What :func:`compare` found: both outputs, and the relative error of each compared quantity."""

    fused: object
    reference: object
    errors: dict[str, float] = field(default_factory=dict)
    dtypes: dict[str, tuple] = field(default_factory=dict)   # gradient name -> (its dtype, its input's)
    mismatches: dict[str, str] = field(default_factory=dict)   # output or exact statistic -> how it differs
    loss_scale: float = 1.0                                     # the fused backward's (see compare)

    def failures(self, dtype) -> list[str]:
        """Each quantity outside ``TOLERANCE[dtype]`` (the log-probs, rewards and z-loss, fp32
        whatever the inputs, at the fp32 tolerance), each exact statistic (argmax, token accuracy)
        not equal to the reference's, each statistic only one of the outputs holds, each gradient
        not in its input's dtype, and each of a preference, KTO or GRPO loss's ``metrics()`` but
        the accuracy and clip ratios off the reference's by more than 1e-3 relative (1e-4
        absolute)."""
        out = []
        value = value_of(self.fused)
        if value.dtype != torch.float32:
            out.append(f"value: dtype {value.dtype}, not float32")
        scaled = f" (gradients loss-scaled by {self.loss_scale:g})" if self.loss_scale != 1 else ""
        for name, error in self.errors.items():
            tolerance = TOLERANCE[torch.float32 if name in ("logps", "rewards", "z_loss") else dtype]
            if not error <= tolerance:
                note = scaled if name.startswith("d_") else ""
                out.append(f"{name}: relative error {error:.2e} > {tolerance:.0e}{note}")
        out += [f"{name}: {difference}" for name, difference in self.mismatches.items()]
        out += [f"{name} came back in {got}, not the input dtype {want}" for name, (got, want) in self.dtypes.items()
                if got != want]
        if isinstance(self.fused, _METRIC_OUTPUTS):
            ours, theirs = self.fused.metrics(), self.reference.metrics()
            if ours.keys() != theirs.keys():
                out.append(f"metrics {sorted(ours)} differ from the reference's {sorted(theirs)}")
            # Means of quantities checked above, and the logits means.  Not the accuracy nor GRPO's
            # clip ratios: fractions of pairs or tokens past a threshold, which rounding flips
            # wherever one is a near tie.
            out += [f"metrics[{key!r}]: {ours[key]} vs {theirs[key]}" for key in ours.keys() & theirs.keys()
                    if key != "rewards/accuracies" and "clip_ratio" not in key
                    and not math.isclose(ours[key], theirs[key], rel_tol=1e-3, abs_tol=1e-4)]
        return out

    def check(self, dtype) -> "Comparison":
        """Raises ``AssertionError`` naming every failure (see :meth:`failures`); ``self`` otherwise.
        Raised, not asserted, so that it fails under ``python -O`` too."""
        failures = self.failures(dtype)
        if failures:
            raise AssertionError("; ".join(failures))
        return self


def _log_probabilities(out) -> dict:
    """A loss's detached log-probs and rewards, by name: a preference loss's per sequence, chosen
    and rejected as one vector each; KTO's per sequence; GRPO's log-probs per token."""
    if isinstance(out, fused_pref.PreferenceOutput):
        return {kind: torch.cat([getattr(out, f"{side}_{kind}").reshape(-1) for side in ("chosen", "rejected")])
                for kind in ("logps", "rewards")}
    if isinstance(out, KTOOutput):
        return {"logps": out.logps, "rewards": out.rewards}
    return {"logps": out.logps} if isinstance(out, GRPOOutput) else {}


def fp16_loss_scale(gradients) -> float:
    """The loss scale :func:`compare` gives fp16 inputs: the power of two that puts the largest of
    the exact ``gradients`` in (512, 1024], 64x under fp16's largest value (headroom for the fp16
    intermediates), and never below 1.  fp16 training scales its loss too (``GradScaler``, closer
    to overflow): unscaled, this table's DPO exo_pair gradients (a few 1e-6 and less, subnormal in
    fp16) are 5% off once rounded to fp16, whatever computes them; scaled by 2**16, O(1) ones
    overflow."""
    largest = max((g.abs().max().item() for g in gradients if g is not None and g.numel()), default=0.0)
    return max(1.0, 2.0 ** math.floor(math.log2(1024 / largest))) if 0 < largest < math.inf else 1.0


def compare(fn, inputs: dict, *, grads=("hidden", "weight", "bias"), seed=0, loss_scale="auto") -> Comparison:
    """``fn(module, inputs)`` on ``fused_pref`` (with :func:`nan_filled` fresh buffers, forward and
    backward) and on ``fused_pref.reference`` with :func:`as_reference` copies of ``inputs``.

    Errors: ``"value"``; for a preference loss ``"logps"`` and ``"rewards"`` (chosen and rejected
    as one vector each: a sequence of only confident tokens has logp ~ -1e-6, whose own relative
    error means little), KTO's alike, GRPO's per-token ``"logps"``; for per-token statistics
    ``"entropy"`` (also inside ``"value"``, see :func:`value_of`; GRPO's too) and cross-entropy's
    ``"z_loss"``; ``"d_<name>"`` for each of ``grads`` that is in ``inputs`` and needs a gradient.
    The argmax, token accuracy and predicted tokens must equal the reference's, dtype and shape
    included, and the outputs hold the same statistics (``Comparison.mismatches`` says how they
    differ).  An argmax is exact only where the top two logits are further apart than fp32's
    rounding: the table's inputs have no closer ones.  Both values are weighted by one fixed random
    tensor before the backward, so every entry of a vector output reaches the gradients.  The fused
    backward's is also multiplied by ``loss_scale`` (a number > 0), as mixed-precision training
    scales its loss, and its gradients are compared with the reference's times that: ``"auto"`` is
    1, but for fp16 inputs :func:`fp16_loss_scale`, so that rounding the gradients to fp16 loses
    what it loses in training, not more.

    The fused side must run the kernels: on a CPU, Triton's interpreter (``TRITON_INTERPRET=1``
    before ``fused_pref`` is imported), else this raises rather than compare the reference with
    itself.  An input of ``grads`` that neither side's value depends on (a bias ``fn`` leaves out)
    is not compared."""
    tensors = {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor)}
    stale = [name for name, value in tensors.items() if value.grad is not None]
    if stale:
        raise ValueError(f"inputs {stale} already hold gradients, which the fused backward would add to: use fresh "
                         "inputs")
    # A non-leaf's .grad is never filled: its gradient would read as 0 and blame the kernels.
    non_leaves = [name for name, value in tensors.items() if value.requires_grad and not value.is_leaf]
    if non_leaves:
        raise ValueError(f"inputs {non_leaves} are not leaf tensors (made by an operation on one that requires grad, "
                         "as torch.randn(..., requires_grad=True).to(device) is), so their gradients cannot be read: "
                         "pass leaves, e.g. tensor.detach().requires_grad_()")
    loss_scale = validation.python_scalar(loss_scale)
    if not (loss_scale == "auto" or (validation.is_number(loss_scale) and 0 < loss_scale < math.inf)):
        raise ValueError(f"loss_scale must be 'auto' or a finite number > 0, got {loss_scale!r}")
    on_cpu = any(isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.device.type == "cpu"
                 for v in inputs.values())
    if on_cpu and not KERNELS_INTERPRETED:
        raise RuntimeError("compare checks fused_pref's kernels, which run on CPU tensors only through Triton's "
                           "interpreter: set TRITON_INTERPRET=1 before importing fused_pref (or pass CUDA tensors); "
                           "otherwise the fused side would be the reference itself")
    ref_inputs = as_reference(inputs)
    reference = fn(fused_pref.reference, ref_inputs)
    ref_value = value_of(reference)
    weights = torch.randn(ref_value.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (ref_value * weights).sum().backward()
    if loss_scale == "auto":
        loss_scale = 1.0
        if any(isinstance(v, torch.Tensor) and v.dtype == torch.float16 for v in inputs.values()):
            loss_scale = fp16_loss_scale(ref_inputs[name].grad for name in grads if ref_inputs.get(name) is not None)
    with nan_filled():
        fused = fn(fused_pref, inputs)
        value = value_of(fused)
        (value * (loss_scale * weights).to(value.device, value.dtype)).sum().backward()
    result = Comparison(fused, reference, {"value": relative_error(value, ref_value)}, loss_scale=loss_scale)
    if type(fused) is type(reference):
        theirs = _log_probabilities(reference)
        for kind, ours in _log_probabilities(fused).items():
            result.errors[kind] = relative_error(ours, theirs[kind])
    else:
        result.mismatches["output"] = f"{type(fused).__name__}, the reference's {type(reference).__name__}"
    ours, theirs = _statistics(fused), _statistics(reference)
    for name in sorted(ours.keys() | theirs.keys()):
        if name not in ours or name not in theirs:
            result.mismatches[name] = "missing" if name not in ours else "not in the reference's output"
        elif name in _MEASURED_STATISTICS:
            result.errors[name] = relative_error(ours[name], theirs[name])
        elif difference := _exact_difference(ours[name], theirs[name]):
            result.mismatches[name] = difference
    for name in grads:
        tensor = inputs.get(name)
        if tensor is None or not tensor.requires_grad:
            continue
        ref_grad = ref_inputs[name].grad
        if tensor.grad is None and ref_grad is None:
            continue
        grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        ref_grad = ref_grad if ref_grad is not None else torch.zeros_like(ref_inputs[name])
        result.errors[f"d_{name}"] = relative_error(grad, loss_scale * ref_grad)
        result.dtypes[f"d_{name}"] = (grad.dtype, tensor.dtype)
    return result


def _rollout(x) -> dict:
    """GRPO's other inputs for a case on ``x``: advantages of both signs, and as ``old_logps`` and
    ``ref_logps`` the policy's own log-probs perturbed, so that ratios land on both sides of each
    clip.  Those log-probs are the reference's, in fp64 from the values of ``x``, so the fused call
    and the reference's (whose ``x`` holds the same values in fp64) get the same tensors."""
    ref = as_reference({key: x[key] for key in ("hidden", "weight", "bias")})
    labels = x["labels"].cpu()
    with torch.no_grad():
        # Unvalidated: the call it stands for validates, or not, as the case asks.
        logp = fused_pref.reference.linear_logprobs(ref["hidden"], ref["weight"], labels, ref["bias"], validate=False)
    gen = torch.Generator().manual_seed(0)
    perturbed = [(logp + 0.5 * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)).float() for _ in range(2)]
    advantages = torch.linspace(0.9, -1.1, labels.shape[0])
    device = x["labels"].device
    return {"advantages": advantages.to(device), "old_logps": perturbed[0].to(device),
            "ref_logps": perturbed[1].to(device)}


@dataclass(frozen=True)
class Case:
    """One call of the shared table: a name of ``CALLS``, ``"kto_loss"`` or ``"grpo_loss"``, its
    keyword arguments, the layout of the batch (``"padded"`` ``[R, T, D]``; ``"packed"`` ``[N, D]``
    with ``cu_seqlens`` at every T; ``"flat"`` ``[N, D]`` without) and ``make_inputs`` overrides.
    The inputs a call needs beyond ``make_inputs``' come from them: the reference model's hidden
    states (DPO, KTO), which sequences are desirable (KTO), GRPO's rollout (:func:`_rollout`)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    layout: str = "padded"
    inputs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.layout != "padded" and self.name in ("kto_loss", "grpo_loss"):
            raise ValueError(f"{self.name}'s case inputs (KTO's desirable flags, GRPO's rollout) are made per row of "
                             f"a padded batch, not layout={self.layout!r}")

    def with_kwargs(self, **extra) -> "Case":
        """This case with ``extra`` keyword arguments added (or replaced)."""
        return replace(self, kwargs={**self.kwargs, **extra})

    def runs_in_forward(self) -> bool:
        """Whether ``backward="in_forward"`` runs this case with its gradients: a mean or summed
        cross-entropy without smoothing or z-loss, or a pair loss whose pairs' gradients are
        independent (not DPO's ``aot`` types, which sort over the batch).  ``validation`` refuses
        the others (``sequence_logprobs`` runs in that mode only where no gradient is needed)."""
        function = self.name.split("-")[0]
        if function == "linear_cross_entropy":
            return (self.kwargs.get("reduction", "mean") != "none" and not self.kwargs.get("label_smoothing")
                    and not self.kwargs.get("lse_square_scale"))
        return function in PAIR_FUNCTIONS and self.name.removeprefix("dpo_loss-") not in SORTING_LOSS_TYPES

    def __call__(self, module, x):
        kwargs = dict(self.kwargs)
        if self.layout != "padded":
            R, T, _ = x["hidden"].shape
            x = {**x, "hidden": x["hidden"].flatten(0, 1), "labels": x["labels"].flatten()}
            if self.layout == "packed":
                kwargs["cu_seqlens"] = torch.arange(0, R * T + 1, T, dtype=torch.int32, device=x["labels"].device)
        if self.name.startswith(("dpo_loss-", "kto_loss")):
            # The reference model through the library's own forward: the hidden states reversed.
            kwargs["ref_hidden"] = x["hidden"].detach().flip(0)
        if self.name == "kto_loss":
            kwargs["desirable"] = torch.arange(x["labels"].shape[0], device=x["labels"].device) % 3 != 1
        if self.name == "grpo_loss":
            kwargs.update(_rollout(x))
        return call(module, self.name, x, **kwargs)


# Every public function, every DPO loss type, each layout and the softcap, the temperature, the
# shift, the NLL term, the per-token statistics and cross-entropy's smoothing and z-loss at least once:
# ``python -m fused_pref check`` runs this table, and so do the parity tests.  (New cases go last:
# a case's seed is its position.)
CASES = {
    "linear_logprobs": Case("linear_logprobs"),
    "linear_logprobs[softcap,temperature]": Case("linear_logprobs", {"softcap": 30.0, "temperature": 0.7}),
    "sequence_logprobs[mean]": Case("sequence_logprobs", {"reduction": "mean"}),
    "linear_cross_entropy[flat,softcap]": Case("linear_cross_entropy", {"softcap": 30.0}, layout="flat"),
    "simpo_loss": Case("simpo_loss"),
    "simpo_loss[packed,shift,sft]": Case("simpo_loss", {"shift": True, "sft_weight": 0.5}, layout="packed"),
    "cpo_loss": Case("cpo_loss"),
    # ORPO's log(1 - e^S) is ill-conditioned as S -> 0 (TRL's too): no near-certain tokens here.
    "orpo_loss": Case("orpo_loss", inputs={"confident": 0.0}),
    **{f"dpo_loss[{t}]": Case(f"dpo_loss-{t}", {"label_smoothing": 0.1}) for t in DPO_LOSS_TYPES},
    "linear_logprobs[statistics]": Case("linear_logprobs", {"return_entropy": True, "return_token_accuracy": True,
                                                            "return_argmax": True}),
    "linear_cross_entropy[smoothing,z_loss]": Case("linear_cross_entropy", {
        "label_smoothing": 0.1, "lse_square_scale": 1e-3, "return_z_loss": True, "return_token_accuracy": True,
        "return_predicted_tokens": True}),
    "kto_loss": Case("kto_loss", {"kl": 0.3}),
    "grpo_loss": Case("grpo_loss", {"beta": 0.04, "epsilon_high": 0.28}),
}
# V not a multiple of any block, D not a power of two and larger than BLOCK_D, odd T.
CASE_SHAPE = (4, 23, 97, 1003)


def run_case(case: Case, dtype, device, *, seed=0) -> Comparison:
    """``case`` on fresh ``make_inputs`` at ``CASE_SHAPE``, compared (see :func:`compare`)."""
    inputs = make_inputs(*CASE_SHAPE, dtype=dtype, device=device, seed=seed, **case.inputs)
    return compare(case, inputs, seed=seed)


# Tensor methods that read a value into Python: on a GPU, each waits for the device.
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Count the reads of tensor values into Python made inside (``.item()``, ``.tolist()``, and
    ``bool``, ``int``, ``float`` or an index of a tensor): on a GPU each is a host synchronisation,
    which a training step with ``validate=False`` must never make.  Yields a ``Counter`` of
    ``"<method> at <file>:<line>"``; ``torch.Tensor`` is patched meanwhile, in this process."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counting(name):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            counts[f"{name} at {caller.filename}:{caller.lineno}"] += 1
            return originals[name](self, *args, **kwargs)
        return read

    for name in _HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
