"""Bad input: every user error of DESIGN.md section 3 raises ValueError/TypeError naming the argument,
in the fused path and in ``fused_pref.reference`` alike; and no public function writes to its inputs.

Awkward small shapes throughout: R=4 sequences (B=2 pairs), T=7, D=40, V=101.  Almost every case
fails in validation before a kernel runs; the few that run the kernels (interpreter on CPU) are tiny.
Every tensor is on the kernels' device, where a user's would be: on a GPU machine, CPU tensors would
only reach the reference fallback.
"""

import math
import re

import pytest
import torch

import fused_pref
import fused_pref.reference
from fused_pref.testing import FUNCTIONS, PAIR_FUNCTIONS, kernel_device

DEVICE = kernel_device()
ON = str(torch.empty(0, device=DEVICE).device)   # as the messages name it: "cpu", "cuda:0"

R, T, D, V = 4, 7, 40, 101
PROMPT = 2                      # leading positions of each sequence carry ignore_index

SMOOTHED = [name for name in PAIR_FUNCTIONS if name != "orpo_loss"]    # the losses with label_smoothing
MODULES = [pytest.param(fused_pref, id="fused"), pytest.param(fused_pref.reference, id="reference")]


def make_inputs(r=R, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(r, T, D, generator=g).div_(math.sqrt(D)).to(dtype)
    weight = torch.randn(V, D, generator=g).to(dtype)
    bias = torch.randn(V, generator=g).mul_(0.1).to(dtype)
    labels = torch.randint(0, V, (r, T), generator=g)
    labels[:, :PROMPT] = -100
    # Drawn on the CPU, whatever the device, so that every machine sees the same values.
    return {k: v.to(DEVICE) for k, v in dict(hidden=hidden, weight=weight, labels=labels, bias=bias).items()}


def call(module, name, **overrides):
    """``module.name(hidden, weight, labels, bias, **kwargs)`` with valid defaults, some replaced.

    DPO gets precomputed ``ref_logps`` unless the test passes its own reference arguments.
    """
    args = make_inputs()
    kwargs = {}
    if name == "dpo_loss" and not {"ref_logps", "ref_hidden"} & overrides.keys():
        kwargs["ref_logps"] = torch.zeros(args["hidden"].shape[0], device=DEVICE)
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    fn = getattr(module, name)
    return fn(args["hidden"], args["weight"], args["labels"], args["bias"], **kwargs)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_valid_defaults_pass(module, name):
    # The baseline every other test perturbs by one argument must itself be accepted.
    out = call(module, name)
    value = out.loss if isinstance(out, fused_pref.PreferenceOutput) else out
    assert torch.isfinite(value).all()


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name, kwargs, pattern", [
    ("linear_cross_entropy", {"label_smoothing": 2.0}, r"^label_smoothing must be a number in \[0, 1\]"),
    ("simpo_loss", {"beta": -1.0}, r"^beta must be a positive number"),
    ("dpo_loss", {"token_metrics": 1}, r"^token_metrics must be a bool"),
])
def test_a_call_with_two_faults_names_the_same_one_on_either_path(module, name, kwargs, pattern):
    # The hyper-parameters are checked before the tensors (fused_pref.arguments), on both paths.
    with pytest.raises((TypeError, ValueError), match=pattern):
        call(module, name, weight=torch.nn.Linear(D, V), **kwargs)


# ---- types ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("arg, bad, pattern", [
    pytest.param("hidden", [[0.0] * D] * T, r"^hidden must be a torch\.Tensor, got list", id="hidden-list"),
    pytest.param("weight", None, r"^weight must be a torch\.Tensor, got NoneType", id="weight-None"),
    pytest.param("labels", [3] * T, r"^labels must be a torch\.Tensor, got list", id="labels-list"),
    pytest.param("bias", 0.5, r"^bias must be a torch\.Tensor or None, got float", id="bias-float"),
    pytest.param("weight", torch.nn.Linear(D, V), r"^weight must be a torch\.Tensor, got Linear: pass the layer's "
                 r"\.weight \(and its \.bias as bias\), not the layer$", id="weight-Linear"),
])
def test_non_tensor_argument(module, name, arg, bad, pattern):
    with pytest.raises(TypeError, match=pattern):
        call(module, name, **{arg: bad})


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int32],
                         ids=["float64", "int64", "int32"])
def test_fused_rejects_hidden_dtype(name, dtype, backend):
    # The kernels' dtypes, whichever path the call takes: fp64 is fused_pref.reference's alone.
    args = make_inputs()
    hidden, weight, bias = (args[k].to(dtype) for k in ("hidden", "weight", "bias"))
    with pytest.raises(TypeError, match=r"^hidden must have dtype in .*float32.*got torch\." + str(dtype)[6:]):
        call(fused_pref, name, hidden=hidden, weight=weight, bias=bias, backend=backend)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_reference_rejects_integer_hidden(name):
    args = make_inputs()
    hidden, weight, bias = (args[k].to(torch.int64) for k in ("hidden", "weight", "bias"))
    with pytest.raises(TypeError, match=r"^hidden must have dtype in .*float64.*got torch\.int64"):
        call(fused_pref.reference, name, hidden=hidden, weight=weight, bias=bias)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_reference_accepts_float64(name):
    # The reference is the fp64 oracle of the parity tests; the fused path refuses fp64 (above).
    args = {k: v.double() if v.is_floating_point() else v for k, v in make_inputs().items()}
    out = call(fused_pref.reference, name, **args)
    value = out.loss if isinstance(out, fused_pref.PreferenceOutput) else out
    assert value.dtype == torch.float64 and torch.isfinite(value).all()


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("arg, dtype, pattern", [
    pytest.param("weight", torch.float16, r"^weight dtype torch\.float16 must match hidden dtype torch\.float32",
                 id="weight-fp16"),
    pytest.param("weight", torch.bfloat16, r"^weight dtype torch\.bfloat16 must match hidden", id="weight-bf16"),
    pytest.param("bias", torch.float16, r"^bias dtype torch\.float16 must match hidden dtype torch\.float32",
                 id="bias-fp16"),
])
def test_dtype_mismatch(module, name, arg, dtype, pattern):
    with pytest.raises(TypeError, match=pattern):
        call(module, name, **{arg: make_inputs()[arg].to(dtype)})


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.uint8, torch.int16],
                         ids=["float32", "bool", "uint8", "int16"])
def test_labels_dtype(module, name, dtype):
    labels = make_inputs()["labels"].clamp(min=0).to(dtype)
    with pytest.raises(TypeError, match=r"^labels must be an integer tensor.*got torch\." + str(dtype)[6:]):
        call(module, name, labels=labels)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_int32_labels_accepted(module, name):
    labels = make_inputs()["labels"].to(torch.int32)
    out = call(module, name, labels=labels)
    value = out.loss if isinstance(out, fused_pref.PreferenceOutput) else out
    assert torch.isfinite(value).all()


# ---- shapes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("shape", [(V, D + 1), (V, D - 1), (D, V), (V * D,)],
                         ids=["D+1", "D-1", "transposed", "flat"])
def test_weight_shape(module, name, shape):
    with pytest.raises(ValueError, match=rf"^weight must be \[V, D\] with D = hidden\.shape\[-1\] = {D}, "
                            rf"got shape {re.escape(str(shape))}"):
        call(module, name, weight=torch.randn(shape, device=DEVICE))


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_empty_vocabulary(module, name):
    with pytest.raises(ValueError, match=r"^weight must have at least one vocabulary row"):
        call(module, name, weight=torch.randn(0, D, device=DEVICE), bias=torch.randn(0, device=DEVICE))


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("shape", [(R, T - 1), (R * T,), (R, T, 1), (T, R)], ids=["T-1", "flat", "3d", "swapped"])
def test_labels_shape(module, name, shape):
    labels = torch.zeros(shape, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=rf"^labels must have shape hidden\.shape\[:-1\] = \({R}, {T}\), "
                            rf"got {re.escape(str(shape))}"):
        call(module, name, labels=labels)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", ["linear_logprobs", "linear_cross_entropy"])
def test_token_level_accepts_2d_hidden(module, name):
    args = make_inputs()
    out = call(module, name, hidden=args["hidden"].reshape(R * T, D), labels=args["labels"].reshape(-1))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_hidden_rank(module, name):
    # Sequence-level functions need [R, T, D]; the token-level ones also take [N, D], never 1-d or 4-d.
    token_level = name in ("linear_logprobs", "linear_cross_entropy")
    bad = [torch.randn(D, device=DEVICE), torch.randn(1, R, T, D, device=DEVICE)]
    bad += [] if token_level else [torch.randn(R * T, D, device=DEVICE)]
    wanted = r"\[N, D\] or \[R, T, D\]" if token_level else r"\[R, T, D\] \(or \[N, D\] with cu_seqlens\)"
    for hidden in bad:
        with pytest.raises(ValueError, match=rf"^hidden must be {wanted}, got shape"):
            call(module, name, hidden=hidden)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("shape", [(V + 1,), (V - 1,), (1, V), ()], ids=["V+1", "V-1", "1xV", "scalar"])
def test_bias_shape(module, name, shape):
    with pytest.raises(ValueError, match=rf"^bias must be \[V\] = \[{V}\], got shape {re.escape(str(shape))}"):
        call(module, name, bias=torch.randn(shape, device=DEVICE))


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("arg", ["weight", "labels", "bias"])
def test_mixed_devices(module, name, arg):
    # "meta" stands in for a second device on a CPU-only machine: the check only compares devices.
    with pytest.raises(ValueError, match=rf"must be on one device, got \['{ON}', 'meta'\]"):
        call(module, name, **{arg: make_inputs()[arg].to("meta")})


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", PAIR_FUNCTIONS)
@pytest.mark.parametrize("r", [0, 1, 3, 5])
def test_odd_number_of_sequences(module, name, r):
    args = make_inputs(r=r)
    extra = {"ref_logps": torch.zeros(r, device=DEVICE)} if name == "dpo_loss" else {}
    with pytest.raises(ValueError, match=rf"^hidden must hold 2B sequences \(B >= 1\), chosen first then "
                            rf"rejected; got {r} sequences$"):
        call(module, name, **args, **extra)


# ---- label values (one host sync, skipped with validate=False) -----------------------------------

BAD_LABELS = [
    pytest.param(V, -100, id="V"),
    pytest.param(V + 1000, -100, id="V+1000"),
    pytest.param(-1, -100, id="minus1"),
    pytest.param(-100, -1, id="default-ignore-with-ignore_index=-1"),
]


def _bad_labels(value):
    labels = make_inputs()["labels"]
    labels[1, 4] = value
    labels[3, 6] = value
    return labels


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("value, ignore_index", BAD_LABELS)
def test_labels_out_of_range(module, name, value, ignore_index):
    labels = _bad_labels(value)
    if ignore_index != -100:        # keep the prompt positions ignored under the custom ignore_index
        labels[:, :PROMPT] = ignore_index
    pattern = (rf"^labels must be in \[0, {V}\) or ignore_index={ignore_index}; "
               rf"found 2 outside, first labels\[1, 4\] = {value}$")
    with pytest.raises(ValueError, match=pattern):
        call(module, name, labels=labels, ignore_index=ignore_index)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's inf - inf
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("value", [V, -1], ids=["V", "minus1"])
def test_fused_validate_false_skips_label_check(name, value):
    # validate=False promises no host sync, so no value check: garbage out, but no exception.
    # (The reference's gather still raises torch's own IndexError-like RuntimeError; not a contract.)
    out = call(fused_pref, name, labels=_bad_labels(value), validate=False)
    assert isinstance(out, (torch.Tensor, fused_pref.PreferenceOutput))


@pytest.mark.parametrize("name", ["linear_logprobs", "linear_cross_entropy"])
def test_fused_validate_false_label_in_padded_tile_is_finite(name):
    # V=101 pads to a 128-wide tile: a label in [101, 128) must not match a padded column (-inf).
    out = call(fused_pref, name, labels=_bad_labels(V + 5), validate=False)
    assert torch.isfinite(out).all()


def _empty_second_sequence():
    labels = make_inputs()["labels"]
    labels[2] = -100
    return labels


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name, kwargs", [
    pytest.param("sequence_logprobs", {"reduction": "mean"}, id="sequence_logprobs-mean"),
    pytest.param("simpo_loss", {}, id="simpo_loss"),
])
def test_empty_sequence_under_mean(module, name, kwargs):
    pattern = r"^sequence 2 has no valid label \(all ignore_index=-100\); reduction='mean' needs"
    with pytest.raises(ValueError, match=pattern):
        call(module, name, labels=_empty_second_sequence(), **kwargs)


@pytest.mark.parametrize("module", MODULES)
def test_empty_sequence_under_sum_is_zero(module):
    logps = call(module, "sequence_logprobs", labels=_empty_second_sequence(), reduction="sum")
    assert logps.shape == (R,)
    assert logps[2].item() == 0.0
    others = logps[[0, 1, 3]]
    assert torch.isfinite(others).all() and (others < 0).all()


@pytest.mark.parametrize("module", MODULES)
def test_empty_sequence_under_dpo_is_allowed(module):
    # DPO sums log-probs: an empty sequence contributes 0, it is not an error.
    out = call(module, "dpo_loss", labels=_empty_second_sequence())
    assert torch.isfinite(out.loss)


# ---- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name, reduction", [
    pytest.param("sequence_logprobs", "none", id="sequence-none"),
    pytest.param("sequence_logprobs", "avg", id="sequence-avg"),
    pytest.param("sequence_logprobs", "Mean", id="sequence-Mean"),
    pytest.param("sequence_logprobs", None, id="sequence-None"),
    pytest.param("linear_cross_entropy", "batchmean", id="ce-batchmean"),
    pytest.param("linear_cross_entropy", "SUM", id="ce-SUM"),
    pytest.param("linear_cross_entropy", "", id="ce-empty"),
])
def test_bad_reduction(module, name, reduction):
    with pytest.raises(ValueError, match=rf"^reduction must be one of \(.*\), got {re.escape(repr(reduction))}$"):
        call(module, name, reduction=reduction)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("softcap", [0, 0.0, -30.0, math.nan, math.inf, "30"],
                         ids=["0", "0.0", "negative", "nan", "inf", "str"])
def test_bad_softcap(module, name, softcap):
    pattern = rf"^softcap must be a positive number or None, got {re.escape(repr(softcap))}$"
    with pytest.raises(ValueError, match=pattern):
        call(module, name, softcap=softcap)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_bad_ignore_index(module, name):
    with pytest.raises(TypeError, match=r"^ignore_index must be an int, got float"):
        call(module, name, ignore_index=-100.0)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", PAIR_FUNCTIONS)
@pytest.mark.parametrize("beta", [0, 0.0, -0.1, math.nan, math.inf, "2", True],
                         ids=["0", "0.0", "negative", "nan", "inf", "str", "bool"])
def test_bad_beta(module, name, beta):
    with pytest.raises(ValueError, match=rf"^beta must be a positive number, got {re.escape(repr(beta))}$"):
        call(module, name, beta=beta)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("gamma", [math.nan, math.inf, "1", None], ids=["nan", "inf", "str", "None"])
def test_bad_simpo_gamma(module, gamma):
    with pytest.raises(ValueError, match=rf"^gamma must be a finite number, got {re.escape(repr(gamma))}$"):
        call(module, "simpo_loss", gamma=gamma)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", SMOOTHED)
@pytest.mark.parametrize("eps", [-0.1, 0.51, 1.0, math.nan], ids=["negative", "0.51", "1", "nan"])
def test_bad_label_smoothing(module, name, eps):
    with pytest.raises(ValueError, match=rf"^label_smoothing must be in \[0, 0\.5\], got {re.escape(repr(eps))}$"):
        call(module, name, label_smoothing=eps)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", SMOOTHED)
@pytest.mark.parametrize("eps", [0.0, 0.5], ids=["0", "0.5"])
def test_label_smoothing_bounds_accepted(module, name, eps):
    assert torch.isfinite(call(module, name, label_smoothing=eps).loss)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("backend", ["cuda", "torch", "Triton", None], ids=["cuda", "torch", "Triton", "None"])
def test_bad_backend(module, name, backend):
    # The reference ignores ``backend`` (it always computes in PyTorch) but checks it like every option.
    with pytest.raises(ValueError, match=rf"^backend must be one of \('auto', 'triton', 'reference'\), "
                            rf"got {re.escape(repr(backend))}$"):
        call(module, name, backend=backend)


# ---- DPO reference model -------------------------------------------------------------------------

@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("given", ["neither", "both"])
def test_dpo_needs_exactly_one_reference(module, given):
    refs = {"ref_logps": None, "ref_hidden": None}
    if given == "both":
        refs = {"ref_logps": torch.zeros(R, device=DEVICE), "ref_hidden": make_inputs(seed=1)["hidden"]}
    with pytest.raises(ValueError, match=r"^dpo_loss needs exactly one of ref_logps \(\[2B\].*\) or ref_hidden"):
        call(module, "dpo_loss", **refs)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("shape", [(R // 2,), (R + 2,), (R, 1), (1, R), ()],
                         ids=["B", "R+2", "Rx1", "1xR", "scalar"])
def test_dpo_ref_logps_shape(module, shape):
    pattern = rf"^ref_logps must be \[2B\] = \[{R}\], got shape {re.escape(str(shape))}$"
    with pytest.raises(ValueError, match=pattern):
        call(module, "dpo_loss", ref_logps=torch.zeros(shape, device=DEVICE))


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("ref_logps", [torch.zeros(R, dtype=torch.long, device=DEVICE), [0.0] * R],
                         ids=["int64", "list"])
def test_dpo_ref_logps_type(module, ref_logps):
    with pytest.raises(TypeError, match=r"^ref_logps must be a floating-point torch\.Tensor"):
        call(module, "dpo_loss", ref_logps=ref_logps)


@pytest.mark.parametrize("module", MODULES)
def test_dpo_ref_logps_device(module):
    with pytest.raises(ValueError, match=rf"^ref_logps is on meta, hidden on {ON}"):
        call(module, "dpo_loss", ref_logps=torch.zeros(R, device="meta"))


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("arg", ["ref_weight", "ref_bias"])
def test_dpo_ref_weight_with_ref_logps(module, arg):
    value = torch.randn(V, D, device=DEVICE) if arg == "ref_weight" else torch.randn(V, device=DEVICE)
    pattern = r"^ref_weight and ref_bias are only used with ref_hidden, not with ref_logps"
    with pytest.raises(ValueError, match=pattern):
        call(module, "dpo_loss", ref_logps=torch.zeros(R, device=DEVICE), **{arg: value})


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("loss_type", ["kto", "SIGMOID", "", None, "aot_unpaired", 3])
def test_dpo_unknown_loss_type(module, loss_type):
    pattern = rf"^loss_type must be one of \('sigmoid', 'robust', .*, 'discopop'\), got {re.escape(repr(loss_type))}"
    with pytest.raises(ValueError, match=pattern):
        call(module, "dpo_loss", loss_type=loss_type)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("loss_type, hint", [("aot_unpaired", "loss_type='aot_pair'"),
                                             ("sigmoid_norm", "loss_type='sigmoid' with length_normalize=True")])
def test_dpo_trl_1x_loss_names_point_to_ours(module, loss_type, hint):
    pattern = rf": TRL 1.x's '{loss_type}' is {re.escape(hint)}"
    with pytest.raises(ValueError, match=pattern):
        call(module, "dpo_loss", loss_type=loss_type)


@pytest.mark.parametrize("module", MODULES)
def test_dpo_exo_pair_without_smoothing_is_refused(module):
    # log(label_smoothing) is -inf at 0; TRL 1.x refuses it, TRL 0.x substituted 1e-3.
    with pytest.raises(ValueError, match=r"^loss_type='exo_pair' needs label_smoothing > 0"):
        call(module, "dpo_loss", loss_type="exo_pair")


REF_HIDDEN_CASES = [
    pytest.param({"ref_hidden": [[0.0]]}, TypeError, r"^ref_hidden must be a torch\.Tensor, got list",
                 id="ref_hidden-list"),
    pytest.param({"ref_hidden": torch.randn(R, T, D, device=DEVICE), "ref_weight": "w"}, TypeError,
                 r"^ref_weight must be a torch\.Tensor, got str", id="ref_weight-str"),
    pytest.param({"ref_hidden": torch.randn(R, T, D, device=DEVICE), "ref_weight": torch.nn.Linear(D, V)}, TypeError,
                 r"^ref_weight must be a torch\.Tensor, got Linear: pass the layer's \.weight \(and its \.bias as "
                 r"ref_bias\), not the layer$", id="ref_weight-Linear"),
    pytest.param({"ref_hidden": torch.randn(R, T, D, device=DEVICE).half()}, TypeError,
                 r"^ref_weight dtype torch\.float32 must match ref_hidden dtype torch\.float16",
                 id="ref_hidden-fp16-vs-weight"),
    pytest.param({"ref_hidden": torch.randn(R, T, D, device=DEVICE), "ref_weight": torch.randn(V, D, device=DEVICE),
                  "ref_bias": torch.randn(V, device=DEVICE).half()},
                 TypeError, r"^ref_bias dtype torch\.float16 must match ref_hidden dtype", id="ref_bias-fp16"),
    pytest.param({"ref_hidden": torch.randn(R, T - 1, D, device=DEVICE)}, ValueError,
                 rf"^labels must have shape ref_hidden\.shape\[:-1\] = \({R}, {T - 1}\)", id="ref_hidden-T-1"),
    pytest.param({"ref_hidden": torch.randn(R * T, D, device=DEVICE)}, ValueError,
                 r"^ref_hidden must be \[R, T, D\]", id="ref_hidden-2d"),
    pytest.param({"ref_hidden": torch.randn(R, T, D + 3, device=DEVICE)}, ValueError,
                 rf"^ref_weight must be \[V, D\] with D = ref_hidden\.shape\[-1\] = {D + 3}", id="ref_hidden-D+3"),
    pytest.param({"ref_hidden": torch.randn(R, T, 24, device=DEVICE), "ref_weight": torch.randn(V, 24, device=DEVICE),
                  "ref_bias": torch.randn(V + 1, device=DEVICE)},
                 ValueError, rf"^ref_bias must be \[V\] = \[{V}\]", id="ref_bias-V+1"),
    pytest.param({"ref_hidden": torch.randn(R, T, 24, device=DEVICE),
                  "ref_weight": torch.randn(V - 10, 24, device=DEVICE)}, ValueError,
                 rf"^ref_weight must have the vocabulary size of weight, V = {V}, got shape \({V - 10}, 24\)",
                 id="ref_weight-smaller-V"),
    pytest.param({"ref_hidden": torch.randn(R, T, D, device="meta")}, ValueError,
                 rf"^ref_hidden, ref_weight, labels and ref_bias must be on one device, got \['{ON}', 'meta'\]",
                 id="ref_hidden-meta"),
]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("refs, cls, pattern", REF_HIDDEN_CASES)
def test_dpo_bad_ref_hidden(module, refs, cls, pattern):
    with pytest.raises(cls, match=pattern):
        call(module, "dpo_loss", **refs)


@pytest.mark.parametrize("module", MODULES)
def test_dpo_ref_hidden_float64(module):
    # fp64 is the reference's own dtype, so there the mismatch with the (fp32) weight is what fails.
    pattern = (r"^ref_hidden must have dtype in" if module is fused_pref else
               r"^ref_weight dtype torch\.float32 must match ref_hidden dtype torch\.float64")
    with pytest.raises(TypeError, match=pattern):
        call(module, "dpo_loss", ref_hidden=torch.randn(R, T, D, device=DEVICE).double())


@pytest.mark.parametrize("module", MODULES)
def test_dpo_ref_hidden_with_own_head_accepted(module):
    # A reference model with another hidden size but the same vocabulary is legitimate.
    out = call(module, "dpo_loss", ref_hidden=torch.randn(R, T, 24, device=DEVICE),
               ref_weight=torch.randn(V, 24, device=DEVICE), ref_bias=torch.randn(V, device=DEVICE))
    assert torch.isfinite(out.loss)


# ---- no input is modified in place ---------------------------------------------------------------

@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_inputs_not_modified(module, name, layout):
    args = make_inputs()
    if layout == "strided":
        # The usual h[:, :-1] / labels[:, 1:] views: a kernel writing through strides would hit
        # the parent tensors, which are watched too.
        g = torch.Generator().manual_seed(3)
        args["hidden_parent"] = (torch.randn(R, T + 1, D, generator=g) / math.sqrt(D)).to(DEVICE).requires_grad_()
        args["labels_parent"] = torch.cat([torch.zeros(R, 1, dtype=torch.long, device=DEVICE), args["labels"]], dim=1)
        hidden, labels = args["hidden_parent"][:, :-1], args["labels_parent"][:, 1:]
        leaves = {"hidden": args["hidden_parent"]}
    else:
        hidden, labels = args["hidden"].requires_grad_(), args["labels"]
        leaves = {"hidden": hidden}
    leaves.update(weight=args["weight"].requires_grad_(), bias=args["bias"].requires_grad_())
    extra = {"softcap": 5.0}
    if name == "dpo_loss":
        ref = make_inputs(seed=1)
        extra = dict(ref_hidden=ref["hidden"], ref_weight=ref["weight"], ref_bias=ref["bias"])
    watched = {**args, **{k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}}
    before = {k: v.detach().clone() for k, v in watched.items()}

    out = call(module, name, hidden=hidden, weight=args["weight"], labels=labels, bias=args["bias"], **extra)
    loss = out.loss if isinstance(out, fused_pref.PreferenceOutput) else out.sum()
    loss.backward()

    for k, v in watched.items():
        assert torch.equal(v.detach(), before[k]), f"{name} modified {k} in place"
    for k, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0, k


# ---- loss-family options and the packed layout -----------------------------------------------------

@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("kwargs, cls, pattern", [
    pytest.param({"sft_weight": -0.1}, ValueError, r"^sft_weight must be a finite number >= 0", id="sft-negative"),
    pytest.param({"sft_weight": math.inf}, ValueError, r"^sft_weight must be a finite number >= 0", id="sft-inf"),
    pytest.param({"loss_type": "robust", "label_smoothing": 0.5}, ValueError,
                 r"^label_smoothing must be below 0\.5 for loss_type='robust'", id="robust-0.5"),
    pytest.param({"loss_type": "discopop", "discopop_tau": 0.0}, ValueError, r"^discopop_tau must be a positive",
                 id="tau-0"),
    pytest.param({"length_normalize": "yes"}, TypeError, r"^length_normalize must be a bool or None", id="lnorm-str"),
])
def test_bad_dpo_options(module, kwargs, cls, pattern):
    with pytest.raises(cls, match=pattern):
        call(module, "dpo_loss", **kwargs)


def _packed(cu):
    args = make_inputs()
    return dict(hidden=args["hidden"].reshape(R * T, D), labels=args["labels"].reshape(R * T), cu_seqlens=cu)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("cu, cls, pattern", [
    pytest.param([0, 7, 14, 21, 28], TypeError, r"^cu_seqlens must be an int32 or int64 torch\.Tensor", id="list"),
    pytest.param(torch.tensor([0.0, 28.0], device=DEVICE), TypeError, r"^cu_seqlens must be an int32 or int64",
                 id="float"),
    pytest.param(torch.tensor([0], device=DEVICE), ValueError, r"^cu_seqlens must be \[R \+ 1\] with R >= 1",
                 id="one-entry"),
    pytest.param(torch.tensor([[0, 28]], device=DEVICE), ValueError, r"^cu_seqlens must be \[R \+ 1\]", id="2d"),
])
def test_bad_cu_seqlens_type_and_shape(module, name, cu, cls, pattern):
    with pytest.raises(cls, match=pattern):
        call(module, name, **_packed(cu))


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("cu", [[1, 7, 14, 21, 28], [0, 7, 14, 21, 27], [0, 14, 7, 21, 28], [0, 7, 14, 21, 35],
                                [0, 7, 40, 40, 28]],
                         ids=["not-from-0", "not-to-N", "decreasing", "past-N", "inside-past-N"])
@pytest.mark.parametrize("shift", [False, True], ids=["", "shift"])
def test_bad_cu_seqlens_values(module, name, cu, shift):
    # Values past N too: the shift and the per-sequence sums index with cu_seqlens before validation
    # reads its check (an IndexError there before, a device-side assert on a GPU).
    with pytest.raises(ValueError, match=r"^cu_seqlens must start at 0, end at N = 28 and never decrease"):
        call(module, name, shift=shift, **_packed(torch.tensor(cu, dtype=torch.int32, device=DEVICE)))


@pytest.mark.parametrize("module", MODULES)
def test_cu_seqlens_needs_packed_hidden(module):
    with pytest.raises(ValueError, match=r"^hidden must be \[N, D\] \(packed, with cu_seqlens\), got shape \(4, 7, 40\)"):
        call(module, "linear_logprobs", cu_seqlens=torch.tensor([0, 28], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("module", MODULES)
def test_packed_pairs_counted_from_cu_seqlens(module):
    with pytest.raises(ValueError, match=r"^hidden must hold 2B sequences \(B >= 1\), chosen first then rejected; "
                                         r"got 3 sequences$"):
        call(module, "simpo_loss", **_packed(torch.tensor([0, 7, 14, 28], dtype=torch.int32, device=DEVICE)))


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_vocab_start_needs_a_process_group(module, name):
    with pytest.raises(ValueError, match=r"^vocab_start is only meaningful with a process_group$"):
        call(module, name, vocab_start=3)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("kwargs, cls, pattern", [
    pytest.param({"backward": "atomic"}, ValueError, r"^backward must be one of \('auto', 'chunked', 'in_forward'\), got 'atomic'$",
                 id="backward-unknown"),
    pytest.param({"deterministic": 1}, TypeError, r"^deterministic must be a bool or None, got int",
                 id="deterministic-int"),
    pytest.param({"backward": "fused"}, ValueError, r"^backward='fused' \(the atomic backward\) was removed: it ran "
                 r"4\.3x slower", id="fused-removed"),
    pytest.param({"plan": "wdie"}, ValueError,
                 r"^plan must be one of \('narrow', 'wide', 'widest', 'cublas'\) or None, got 'wdie'$",
                 id="plan-unknown"),
    pytest.param({"plan": "cublas", "backward": "in_forward"}, ValueError, r"^plan='cublas' has no effect with "
                 r"backward='in_forward', which runs cuBLAS products of its own: leave plan=None$",
                 id="plan-in_forward"),
])
def test_bad_backward_options(module, name, kwargs, cls, pattern):
    with pytest.raises(cls, match=pattern):
        call(module, name, **kwargs)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("arg", ["weight", "bias"])
def test_partitioned_zero3_parameter_names_the_fix(module, name, arg):
    """A DeepSpeed ZeRO-3 parameter read outside its module's forward: this rank's empty partition,
    the whole shape in ``ds_shape`` (as DeepSpeed leaves it; DeepSpeed itself runs in
    tests/test_distributed.py)."""
    full = make_inputs()[arg]
    partitioned = torch.empty(0, dtype=full.dtype, device=DEVICE)
    partitioned.ds_shape = full.shape
    with pytest.raises(ValueError, match=rf"^{arg} is a DeepSpeed ZeRO-3 parameter partitioned .*GatheredParameters"):
        call(module, name, **{arg: partitioned})
