"""Every user error of the library, raised from here: the options (``Options``), the tensors, the
loss hyper-parameters, the vocabulary shards and the choice of path.  The fused path and the
reference share these checks, so both refuse the same input with the same message.

Shape, dtype and device checks are free.  The checks that read tensor values (label range, empty
sequences under a mean, the shards' layout) cost one host synchronisation, done together, and are
skipped with ``validate=False``.
"""

import math
import numbers
import sys
from dataclasses import dataclass

import torch

from .kernels.tiles import PLANS
from .segments import sequence_sums

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = FUSED_DTYPES + (torch.float64,)
REDUCTIONS = {
    "sequence": ("sum", "mean"),
    "cross_entropy": ("mean", "sum", "none"),
}


@dataclass(frozen=True)
class Checked:
    """What validation learned: the valid-token mask and, when it synchronised, the valid count."""

    valid: torch.Tensor        # bool, shape of labels
    n_valid: int | None        # None when validate=False (no host sync was made)


def _fail(cls, message):
    raise cls(message)


def is_number(value) -> bool:
    # bool is an int to Python, but beta=True is a bug, not a hyper-parameter.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def python_scalar(value):
    """A NumPy scalar as the Python value it holds (``np.float32(0.1)`` from a config file or a sweep
    becomes ``0.1``), another real number (a ``Fraction``) as a float, anything else as it is: the
    values reach Triton launches and PyTorch arithmetic, which take Python numbers.  NumPy is
    optional to torch: unimported, nothing is one.  (Inside a ``torch.compile`` region, dynamo
    makes NumPy scalars traced values before this sees them: pass Python numbers there.)"""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value


def python_scalars(values: dict) -> dict:
    return {name: python_scalar(value) for name, value in values.items()}


def check_dtype(name, tensor, dtypes=FUSED_DTYPES):
    if isinstance(tensor, torch.Tensor) and tensor.dtype not in dtypes:
        _fail(TypeError, f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")


def check_gathered(name, tensor):
    """A DeepSpeed ZeRO-3 parameter read outside its module's forward is this rank's partition: an
    empty tensor, with the whole shape in ``ds_shape``."""
    shape = getattr(tensor, "ds_shape", None)
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        _fail(ValueError, f"{name} is a DeepSpeed ZeRO-3 parameter partitioned across ranks (shape {tuple(shape)}, "
                          f"here {tuple(tensor.shape)}): call the loss inside the model's forward, where ZeRO-3 "
                          "gathers it (fused_pref.integrations.hf, its add_fused_forward, or the TRL trainers), or "
                          "gather it for the call and its backward with deepspeed.zero.GatheredParameters")


def _layer_hint(value, b_name) -> str:
    """For a layer passed where its weight belongs (``lm_head`` for ``lm_head.weight``).  A PEFT LoRA
    layer's ``.weight`` is its base layer's, without the adapter."""
    if not isinstance(value, torch.nn.Module):
        return ""
    if hasattr(value, "lora_A"):
        return (f": for a PEFT-adapted layer pass the weight and bias (as {b_name}) of "
                "fused_pref.integrations.hf.effective_linear(layer), which apply its adapter")
    if isinstance(getattr(value, "weight", None), torch.Tensor):
        return f": pass the layer's .weight (and its .bias as {b_name}), not the layer"
    return ""


def check_tensors(hidden, weight, labels, bias, *, dtypes=FUSED_DTYPES, sequence_level=False, packed=False,
                  name="hidden", sharded=False):
    """Types, shapes, dtypes and devices of the projection inputs.

    Sequence-level functions take ``[R, T, D]`` (padded) or, with ``packed``, ``[N, D]``."""
    # Messages name the caller's arguments: name="ref_hidden" makes them ref_weight and ref_bias.
    w_name, b_name = name.replace("hidden", "weight"), name.replace("hidden", "bias")
    for arg, value in ((name, hidden), (w_name, weight), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            hint = _layer_hint(value, b_name) if arg == w_name else ""
            _fail(TypeError, f"{arg} must be a torch.Tensor, got {type(value).__name__}{hint}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        _fail(TypeError, f"{b_name} must be a torch.Tensor or None, got {type(bias).__name__}")
    for arg, value in ((w_name, weight), (b_name, bias)):
        check_gathered(arg, value)
    check_dtype(name, hidden, dtypes)
    if weight.dtype != hidden.dtype:
        _fail(TypeError, f"{w_name} dtype {weight.dtype} must match {name} dtype {hidden.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        _fail(TypeError, f"{b_name} dtype {bias.dtype} must match {name} dtype {hidden.dtype}")
    # int64 or int32 only: the reference's gather rejects uint8/int16 (a RuntimeError, not ours).
    if labels.dtype not in (torch.int64, torch.int32):
        _fail(TypeError, f"labels must be an integer tensor (int64 or int32), got {labels.dtype}")
    if packed:
        wanted, ranks = "[N, D] (packed, with cu_seqlens)", (2,)
    elif sequence_level:
        wanted, ranks = "[R, T, D] (or [N, D] with cu_seqlens)", (3,)
    else:
        wanted, ranks = "[N, D] or [R, T, D]", (2, 3)
    if hidden.dim() not in ranks:
        _fail(ValueError, f"{name} must be {wanted}, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        _fail(ValueError, f"{w_name} must be [V, D] with D = {name}.shape[-1] = {hidden.shape[-1]}, "
                          f"got shape {tuple(weight.shape)}")
    # A shard without rows is refused by every rank at once, from the table of shards
    # (distributed.resolve_shard): refused here, by this rank alone, it would leave the others waiting.
    if weight.shape[0] == 0 and not sharded:
        _fail(ValueError, f"{w_name} must have at least one vocabulary row")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        _fail(ValueError, f"{b_name} must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        _fail(ValueError, f"labels must have shape {name}.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                          f"got {tuple(labels.shape)}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        _fail(ValueError, f"{name}, {w_name}, labels and {b_name} must be on one device, "
                          f"got {sorted(map(str, devices))}")


def check_flag(name, value):
    if not isinstance(value, bool):
        _fail(TypeError, f"{name} must be a bool, got {type(value).__name__}")


def check_positive_int(name, value, *, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(ValueError, f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_options(options):
    """The values of an ``Options``, checked when it is made (no tensor is read)."""
    # Finite too: softcap=inf gives inf * tanh(z / inf) = NaN (and NaN fails the comparison).
    softcap = options.softcap
    if softcap is not None and not (is_number(softcap) and 0 < softcap < math.inf):
        _fail(ValueError, f"softcap must be a positive number or None, got {softcap!r}")
    temperature = options.temperature
    if not (is_number(temperature) and 0 < temperature < math.inf):
        _fail(ValueError, f"temperature must be a positive number, got {temperature!r}")
    if not isinstance(options.ignore_index, int) or isinstance(options.ignore_index, bool):
        _fail(TypeError, f"ignore_index must be an int, got {type(options.ignore_index).__name__}")
    check_flag("shift", options.shift)
    check_flag("validate", options.validate)
    if options.backend not in BACKENDS:
        _fail(ValueError, f"backend must be one of {BACKENDS}, got {options.backend!r}")
    check_backward(options.backward, options.deterministic)
    check_plan(options.plan, options.backward)
    check_positive_int("workspace_bytes", options.workspace_bytes)
    vocab_start = options.vocab_start
    if options.process_group is None and vocab_start is not None:
        _fail(ValueError, "vocab_start is only meaningful with a process_group")
    if vocab_start is not None and (not isinstance(vocab_start, int) or isinstance(vocab_start, bool)
                                    or vocab_start < 0):
        _fail(ValueError, f"vocab_start must be an int >= 0 or None, got {vocab_start!r}")


def check_plan(plan, backward):
    if plan is not None and (not isinstance(plan, str) or plan not in PLANS):
        _fail(ValueError, f"plan must be one of {tuple(PLANS)} or None, got {plan!r}")
    if plan is not None and backward == "in_forward":
        _fail(ValueError, f"plan={plan!r} has no effect with backward='in_forward', which runs cuBLAS products of "
                          "its own: leave plan=None")


def check_reduction(reduction, kind):
    if reduction not in REDUCTIONS[kind]:
        _fail(ValueError, f"reduction must be one of {REDUCTIONS[kind]}, got {reduction!r}")


def check_cu_seqlens(cu_seqlens, hidden):
    """Shape and type of the packed layout's ``cu_seqlens`` (its values are checked with the labels)."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        _fail(TypeError, "cu_seqlens must be an int32 or int64 torch.Tensor [R + 1]")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        _fail(ValueError, f"cu_seqlens must be [R + 1] with R >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != hidden.device:
        _fail(ValueError, f"cu_seqlens is on {cu_seqlens.device}, hidden on {hidden.device}")


BACKWARD_STRATEGIES = ("auto", "chunked", "in_forward")
BACKENDS = ("auto", "triton", "reference")


def check_backward(backward, deterministic):
    """``backward`` names a strategy there is; ``deterministic`` is a bool or None.  Every strategy
    is deterministic, so ``deterministic`` refuses none."""
    if backward == "fused":
        _fail(ValueError, "backward='fused' (the atomic backward) was removed: it ran 4.3x slower than the "
                          "default on an H200 and its last bits varied from run to run; use backward='auto' "
                          "(or 'chunked', the same)")
    if backward not in BACKWARD_STRATEGIES:
        _fail(ValueError, f"backward must be one of {BACKWARD_STRATEGIES}, got {backward!r}")
    if deterministic is not None and not isinstance(deterministic, bool):
        _fail(TypeError, f"deterministic must be a bool or None, got {type(deterministic).__name__}")


def check_class_weights(ce_weight, vocab_size, labels):
    """``ce_weight``: None, or a floating ``[V]`` tensor on the labels' device, the whole vocabulary
    (under vocabulary parallelism too).  ``vocab_size``: V, or None where not known yet (a sharded
    vocabulary's, checked by ``check_class_weight_size`` once the shards are)."""
    if ce_weight is None:
        return
    if not isinstance(ce_weight, torch.Tensor) or not ce_weight.dtype.is_floating_point:
        _fail(TypeError, "ce_weight must be a floating-point torch.Tensor [V] or None, got "
                         + (str(ce_weight.dtype) if isinstance(ce_weight, torch.Tensor) else type(ce_weight).__name__))
    if ce_weight.dim() != 1:
        _fail(ValueError, f"ce_weight must be [V], got shape {tuple(ce_weight.shape)}")
    check_class_weight_size(ce_weight, vocab_size)
    if isinstance(labels, torch.Tensor) and ce_weight.device != labels.device:
        _fail(ValueError, f"ce_weight is on {ce_weight.device}, labels on {labels.device}")


def check_class_weight_size(ce_weight, vocab_size, shard_size=0):
    """``ce_weight`` covers the whole vocabulary, where its size ``vocab_size`` is a known int; a
    sharded vocabulary's is a device tensor under ``validate=False`` (reading it is a host sync), and
    then ``ce_weight`` is only checked to cover this rank's ``shard_size`` rows."""
    if isinstance(vocab_size, int) and ce_weight.shape[0] != vocab_size:
        _fail(ValueError, f"ce_weight must be [V] = [{vocab_size}], got shape {tuple(ce_weight.shape)}")
    if ce_weight.shape[0] < shard_size:
        _fail(ValueError, f"ce_weight must be [V], the whole vocabulary's, got shape {tuple(ce_weight.shape)}, "
                          f"fewer than this rank's {shard_size} rows")


def check_cross_entropy_terms(label_smoothing, lse_square_scale, return_z_loss, ce_weight, options):
    """Cross-entropy's label smoothing (in [0, 1], as ``F.cross_entropy``) and z-loss scale (finite,
    >= 0), and the combinations that do not run yet."""
    if not is_number(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        _fail(ValueError, f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not is_number(lse_square_scale) or not 0.0 <= lse_square_scale < math.inf:
        _fail(ValueError, f"lse_square_scale must be a finite number >= 0, got {lse_square_scale!r}")
    check_flag("return_z_loss", return_z_loss)
    terms = [name for name, on in (("label_smoothing", label_smoothing > 0), ("lse_square_scale", lse_square_scale > 0))
             if on]
    if label_smoothing > 0 and ce_weight is not None and options.softcap is not None:
        _fail(ValueError, "label_smoothing with ce_weight does not run under a softcap yet (the class-weighted "
                          "sum of soft-capped logits): drop one of the three")
    if terms and options.backward == "in_forward":
        verb = "does" if len(terms) == 1 else "do"
        _fail(ValueError, f"{' and '.join(terms)} {verb} not run with backward='in_forward' yet: use backward='auto'")


def check_token_stats(flags: dict):
    """The ``return_*`` flags of per-token statistics (and ``token_metrics``): bools."""
    for name, value in flags.items():
        check_flag(name, value)


def check_gradient_in_forward(options, kind, reduction, pairs=False, needs_gradient=True):
    """``backward="in_forward"`` needs the loss's gradient in the forward: a mean or summed
    cross-entropy, or a pair loss (``pairs``); or per-sequence log-probs that need no gradient
    (``needs_gradient``: a reference model's, under ``no_grad``), which that mode's products give
    without any."""
    if options.backward != "in_forward":
        return
    if kind == "sequence" and not needs_gradient:
        return
    if not pairs and (kind != "cross_entropy" or reduction == "none"):
        what = f"reduction={reduction!r}" if kind == "cross_entropy" else "this function"
        _fail(ValueError, "backward='in_forward' computes the gradients inside the forward, which needs the "
                          "loss's gradient there: linear_cross_entropy with reduction 'mean' or 'sum', or a pair "
                          f"loss (simpo_loss, cpo_loss, orpo_loss, dpo_loss), or sequence_logprobs without gradients "
                          f"(under torch.no_grad), not {what}; use backward='auto'")


def check_pair_loss_in_forward(options, sort):
    """A pair loss computes its gradients in the forward one block of whole pairs at a time: not
    one that sorts over the batch (DPO's ``aot`` and ``aot_pair``), where every pair's gradient
    depends on every other's."""
    if options.backward == "in_forward" and sort is not None:
        _fail(ValueError, f"backward='in_forward' does not run with loss_type={sort!r}, which sorts over the whole "
                          "batch (each pair's gradient depends on every pair): use backward='auto'")


def check_interpreter(problem):
    if problem:
        _fail(RuntimeError, f"fused_pref: TRITON_INTERPRET is set, but {problem}")


def check_backend_runs(backend, runnable, device):
    if backend == "triton" and not runnable:
        _fail(ValueError, f"backend='triton' cannot run on {device} tensors: use CUDA tensors, or set "
                          "TRITON_INTERPRET=1 before importing fused_pref to run the kernels on the CPU")


def check_pairs(num_sequences):
    if num_sequences % 2 or num_sequences == 0:
        _fail(ValueError, f"hidden must hold 2B sequences (B >= 1), chosen first then rejected; "
                          f"got {num_sequences} sequences")


def check_hyper(*, beta, label_smoothing, gamma=0.0, sft_weight=0.0):
    # Written so that NaN and inf fail too (NaN <= 0 is False): either gives a NaN loss.  Comparisons,
    # not math.isfinite: a float torch.compile traces (dynamic=True, or one that changed between
    # calls) goes through comparisons, not math.isfinite.
    if not is_number(beta) or not 0 < beta < math.inf:
        _fail(ValueError, f"beta must be a positive number, got {beta!r}")
    if not is_number(gamma) or not -math.inf < gamma < math.inf:
        _fail(ValueError, f"gamma must be a finite number, got {gamma!r}")
    if not is_number(label_smoothing) or not 0.0 <= label_smoothing <= 0.5:
        _fail(ValueError, f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    if not is_number(sft_weight) or not 0.0 <= sft_weight < math.inf:
        _fail(ValueError, f"sft_weight must be a finite number >= 0, got {sft_weight!r}")


def reads_back(validate: bool) -> bool:
    """Whether the value checks that read back to the host run: under ``validate``, outside a
    ``torch.compile``d region, where a host sync would break the graph (they are skipped there
    exactly as with ``validate=False``: README, "torch.compile")."""
    return validate and not torch.compiler.is_compiling()


def check_cu_seqlens_values(cu, n):
    """``cu`` (``cu_seqlens`` read back, a list) must start at 0, end at ``n`` and never decrease."""
    if cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
        _fail(ValueError, f"cu_seqlens must start at 0, end at N = {n} and never decrease; got {cu}")


def check_labels(labels, vocab_size, *, ignore_index, validate, mean_over_sequences=False, cu_seqlens=None):
    """Valid-token mask, and with ``validate`` the label-range, ``cu_seqlens`` and empty-sequence
    checks, all read with one host synchronisation."""
    valid = labels != ignore_index
    if not reads_back(validate):
        return Checked(valid=valid, n_valid=None)
    out_of_range = valid & ((labels < 0) | (labels >= vocab_size))
    stats = [out_of_range.sum(), valid.sum()]
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        stats.append((cu[0] != 0) | (cu[-1] != labels.numel()) | (cu.diff() < 0).any())
    if mean_over_sequences:
        stats.append((sequence_sums(valid, cu_seqlens) == 0).sum())
    n_bad, n_valid, *rest = torch.stack([t.long() for t in stats]).tolist()
    if n_bad:
        where = tuple(out_of_range.nonzero()[0].tolist())
        _fail(ValueError, f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
                          f"found {n_bad} outside, first labels{list(where)} = {labels[where].item()}")
    if cu_seqlens is not None and rest.pop(0):
        check_cu_seqlens_values(cu_seqlens.tolist(), labels.numel())
    if rest and rest[0]:
        first = int((sequence_sums(valid, cu_seqlens) == 0).nonzero()[0, 0])
        _fail(ValueError, f"sequence {first} has no valid label (all ignore_index={ignore_index}); "
                          f"reduction='mean' needs at least one valid token per sequence")
    return Checked(valid=valid, n_valid=int(n_valid))


def check_dpo_reference(hidden, weight, labels, bias, *, ref_logps, ref_hidden, ref_weight, ref_bias,
                        num_sequences, dtypes=FUSED_DTYPES, loss="dpo_loss", rows="2B", sharded=False):
    """The reference-model inputs of a DPO (or KTO: ``loss``, ``rows="R"``) loss; returns the
    ``(ref_weight, ref_bias)`` to use.

    Exactly one of ``ref_logps`` (``[2B]``) and ``ref_hidden`` (``[2B, T, D_ref]``) is given.
    Without ``ref_weight`` the policy's ``weight`` and ``bias`` serve the reference model too.
    """
    if (ref_logps is None) == (ref_hidden is None):
        _fail(ValueError, f"{loss} needs exactly one of ref_logps ([{rows}] precomputed reference "
                          f"log-probs) or ref_hidden ([{rows}, T, D] reference-model hidden states)")
    if ref_logps is not None:
        if ref_weight is not None or ref_bias is not None:
            _fail(ValueError, "ref_weight and ref_bias are only used with ref_hidden, not with ref_logps")
        if not isinstance(ref_logps, torch.Tensor) or not ref_logps.dtype.is_floating_point:
            _fail(TypeError, "ref_logps must be a floating-point torch.Tensor")
        if tuple(ref_logps.shape) != (num_sequences,):
            _fail(ValueError, f"ref_logps must be [{rows}] = [{num_sequences}], got shape {tuple(ref_logps.shape)}")
        if ref_logps.device != hidden.device:
            _fail(ValueError, f"ref_logps is on {ref_logps.device}, hidden on {hidden.device}")
        return None, None
    if ref_weight is None:
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
    check_tensors(ref_hidden, ref_weight, labels, ref_bias, dtypes=dtypes, sequence_level=True,
                  packed=hidden.dim() == 2, name="ref_hidden", sharded=sharded)
    # labels are range-checked against weight only: a smaller reference vocabulary would be read
    # out of bounds (NaN on the fused path, a RuntimeError in the reference).
    if ref_weight.shape[0] != weight.shape[0]:
        _fail(ValueError, f"ref_weight must have the vocabulary size of weight, V = {weight.shape[0]}, "
                          f"got shape {tuple(ref_weight.shape)}")
    if ref_hidden.device != hidden.device:
        _fail(ValueError, f"ref_hidden is on {ref_hidden.device}, hidden on {hidden.device}")
    return ref_weight.detach(), None if ref_bias is None else ref_bias.detach()


# TRL 1.x's DPO loss types that this library has under another name or as an option.
_TRL_LOSS_NAMES = {"aot_unpaired": "loss_type='aot_pair' (TRL 0.x's name)",
                   "sigmoid_norm": "loss_type='sigmoid' with length_normalize=True"}


def check_dpo_hyper(*, loss_type, label_smoothing, length_normalize, discopop_tau, loss_types):
    if loss_type not in loss_types:
        renamed = _TRL_LOSS_NAMES.get(loss_type) if isinstance(loss_type, str) else None
        _fail(ValueError, f"loss_type must be one of {loss_types}, got {loss_type!r}"
                          + (f": TRL 1.x's {loss_type!r} is {renamed} here" if renamed else ""))
    if loss_type == "exo_pair" and label_smoothing == 0:
        _fail(ValueError, "loss_type='exo_pair' needs label_smoothing > 0: its loss has log(label_smoothing), "
                          "which is -inf at 0 (TRL 1.x refuses 0 too; TRL 0.x put 1e-3 in its place)")
    if loss_type == "robust" and label_smoothing >= 0.5:
        _fail(ValueError, f"label_smoothing must be below 0.5 for loss_type='robust' (it divides by "
                          f"1 - 2 * label_smoothing), got {label_smoothing!r}")
    if not (is_number(discopop_tau) and 0 < discopop_tau < math.inf):
        _fail(ValueError, f"discopop_tau must be a positive number, got {discopop_tau!r}")
    if length_normalize is not None and not isinstance(length_normalize, bool):
        _fail(TypeError, f"length_normalize must be a bool or None, got {type(length_normalize).__name__}")


def check_shards(table):
    """Every rank's ``(vocab_start, rows)`` must tile ``[0, V)`` without gaps or overlaps, each
    with at least one row."""
    empty = [rank for rank, (_, rows) in enumerate(table) if rows == 0]
    if empty:
        _fail(ValueError, f"every rank's weight shard needs at least one vocabulary row; rank(s) {empty} have none "
                          f"((vocab_start, rows) per rank = {table})")
    expected = 0
    for start, rows in sorted(table):
        if start != expected:
            _fail(ValueError, f"the ranks' vocabulary shards must tile [0, V) without gaps or overlaps; "
                              f"got (vocab_start, rows) per rank = {table}")
        expected = start + rows


def check_call(hidden, weight, labels, bias, options, *, sequence_level=False, pairs=False, reduction=None,
               kind=None, dtypes=FUSED_DTYPES, needs_gradient=True) -> int:
    """Every free check of a public function's tensors (the options were checked when made);
    returns the number of sequences.  ``needs_gradient``: whether the call's result needs one."""
    check_tensors(hidden, weight, labels, bias, dtypes=dtypes, sequence_level=sequence_level,
                  packed=options.cu_seqlens is not None, sharded=options.process_group is not None)
    check_cu_seqlens(options.cu_seqlens, hidden)
    if kind is not None:
        check_reduction(reduction, kind)
    check_gradient_in_forward(options, kind, reduction, pairs, needs_gradient)
    num_sequences = labels.shape[0] if options.cu_seqlens is None else options.cu_seqlens.numel() - 1
    if pairs:
        check_pairs(num_sequences)
    return num_sequences
