"""Every public function, value and all gradients, fused (Triton) against the fp64 reference, through the
one harness (``fused_pref.testing.compare``: fresh buffers NaN-filled, so an unwritten element fails).

The shared table ``fused_pref.testing.CASES`` (what ``python -m fused_pref check`` runs) in fp32,
bf16 and fp16 (its gradients loss-scaled, as ``compare`` does for fp16), then what the table does
not vary.  Shapes are small but awkward: V not a multiple of any
block (1003, 257, 2053), D not a power of two and larger than BLOCK_D (97, 497), odd T, ragged
prompts and padding, an ignored run inside a completion; bias and softcap on and off; both the
split-vocabulary forward (few rows) and the unsplit one (many rows); a multi-chunk backward
(always: a chunk is at most V/16).
"""

import subprocess
import sys

import pytest
import torch

import fused_pref
from fused_pref import testing
from fused_pref.kernels import tile_plan
from fused_pref.testing import CASES, compare, make_inputs, relative_error, run_case

SHAPES = {
    "R4-T23-D97-V1003": (4, 23, 97, 1003),
    "R2-T7-D40-V257": (2, 7, 40, 257),
    "R2-T9-D497-V300": (2, 9, 497, 300),
    "R6-T101-D33-V2053-unsplit": (6, 101, 33, 2053),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float16], ids=[*DTYPES, "fp16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_case(case, dtype, device):
    run_case(case, dtype, device, seed=list(CASES.values()).index(case)).check(dtype)


def test_fp16_gradients_are_compared_loss_scaled(device):
    # Unscaled, this case's exact gradients (a few 1e-6) are subnormal in fp16, 5% off once rounded
    # whatever computes them; scaled as GradScaler would, they are within fp16's tolerance.
    case = CASES["dpo_loss[exo_pair]"]
    seed = list(CASES.values()).index(case)
    def inputs():
        return make_inputs(*testing.CASE_SHAPE, dtype=torch.float16, device=device, seed=seed)

    assert compare(case, inputs(), seed=seed, loss_scale=1.0).errors["d_weight"] > 2e-2
    # The exact gradient (the reference's under compare's weighting) rounded to fp16 is as far off.
    ref = testing.as_reference(inputs())
    value = testing.value_of(case(fused_pref.reference, ref))
    weights = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (value * weights).sum().backward()
    exact = ref["weight"].grad
    assert relative_error(exact.half(), exact) > 2e-2
    scaled = run_case(case, torch.float16, device, seed=seed).check(torch.float16)
    assert scaled.loss_scale >= 2**16
    assert testing.fp16_loss_scale([torch.tensor([3e-6, -5e-6])]) * 5e-6 == pytest.approx(671.1, rel=1e-3)
    assert testing.fp16_loss_scale([torch.tensor([1024.0])]) == testing.fp16_loss_scale([torch.tensor([1e5])]) == 1
    with pytest.raises(ValueError, match="loss_scale must be 'auto' or a finite number > 0, got 0"):
        compare(case, make_inputs(*testing.CASE_SHAPE, device=device), loss_scale=0)


def _cross_entropy(bias):
    return lambda m, x: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], bias(m, x))


def test_compare_reads_every_gradient_it_can_and_refuses_what_it_cannot(device):
    x = make_inputs(2, 5, 24, 37, device=device)
    # A bias neither side uses (a model without one) is not compared; one only the reference uses is.
    assert "d_bias" not in compare(_cross_entropy(lambda m, x: None), x).check(torch.float32).errors
    dropped = lambda m, x: x["bias"] if m is fused_pref.reference else x["bias"].detach()  # noqa: E731
    comparison = compare(_cross_entropy(dropped), make_inputs(2, 5, 24, 37, device=device))
    assert comparison.errors["d_bias"] == 1.0
    with pytest.raises(AssertionError, match=r"^d_bias: relative error 1.00e\+00 > 1e-05$"):
        comparison.check(torch.float32)
    # Inputs whose .grad cannot be read: gradients already there (the first call's; the bias it
    # left out has none), or a tensor that is no leaf.
    with pytest.raises(ValueError, match=r"^inputs \['hidden', 'weight'\] already hold gradients"):
        compare(_cross_entropy(lambda m, x: x["bias"]), x)
    y = make_inputs(2, 5, 24, 37, device=device)
    y["hidden"] = y["hidden"] * 1
    with pytest.raises(ValueError, match=r"^inputs \['hidden'\] are not leaf tensors"):
        compare(_cross_entropy(lambda m, x: x["bias"]), y)


def test_a_failed_check_raises_under_python_o():
    # A parity check in a user's CI must fail there, even where asserts are compiled out.
    code = ("import torch; from fused_pref.testing import Comparison; "
            "Comparison(torch.ones(()), torch.ones(()), {'value': 1.0}).check(torch.float32)")
    run = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "AssertionError: value: relative error 1.00e+00 > 1e-05" in run.stderr, run.stderr


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_simpo(shape, dtype, softcap, bias, device):
    x = make_inputs(*shape, dtype=dtype, device=device, bias=bias, seed=hash((shape, bias)) % 1000)
    comparison = compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], beta=2.5,
                                                   gamma=0.5, softcap=softcap), x).check(dtype)
    out, ref = comparison.fused, comparison.reference
    means = [torch.stack([o.chosen_logits_mean, o.rejected_logits_mean]) for o in (out, ref)]
    assert relative_error(*means) <= 1e-5, "logits_mean"
    assert out.metrics().keys() == ref.metrics().keys()


@pytest.mark.parametrize("shape", list(SHAPES.values())[:2], ids=list(SHAPES)[:2])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("ref_source", ["ref_logps", "ref_hidden", "ref_weight"])
def test_dpo(shape, dtype, ref_source, device):
    x = make_inputs(*shape, dtype=dtype, device=device, seed=7)
    gen = torch.Generator().manual_seed(3)
    ref_args = {
        "ref_logps": {"ref_logps": -torch.rand(shape[0], generator=gen).to(device) * 30},
        "ref_hidden": {"ref_hidden": x["hidden"].detach().flip(0)},
        "ref_weight": {"ref_hidden": x["hidden"].detach().flip(0), "ref_weight": x["weight"].detach().flip(0),
                       "ref_bias": None},
    }[ref_source]

    def call(m, x):
        return testing.call(m, "dpo_loss-sigmoid", x, beta=0.2, label_smoothing=0.1, **ref_args)

    compare(call, x).check(dtype)   # rewards included


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", ["N-D", "R-T-D"])
def test_linear_cross_entropy(reduction, dtype, layout, device):
    x = make_inputs(3, 31, 72, 1003, dtype=dtype, device=device, seed=5)
    flat = layout == "N-D"

    def call(m, x):
        h, lab = (x["hidden"].flatten(0, 1), x["labels"].flatten()) if flat else (x["hidden"], x["labels"])
        return m.linear_cross_entropy(h, x["weight"], lab, x["bias"], reduction=reduction, softcap=15.0)

    compare(call, x).check(dtype)


def test_cross_entropy_matches_torch(device):
    x = make_inputs(3, 31, 72, 1003, device=device, seed=9)
    h, lab = x["hidden"].flatten(0, 1), x["labels"].flatten()
    ours = fused_pref.linear_cross_entropy(h, x["weight"], lab, x["bias"])
    theirs = torch.nn.functional.cross_entropy(h @ x["weight"].T + x["bias"], lab)
    assert relative_error(ours, theirs) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_linear_logprobs_strided_hidden(dtype, device):
    # h[:, :-1] as a Hugging Face shift would take it: read through strides, never copied.
    x = make_inputs(4, 24, 97, 1003, dtype=dtype, device=device, seed=13)
    labels = x["labels"][:, 1:]
    x["labels"] = labels
    out = compare(lambda m, x: m.linear_logprobs(x["hidden"][:, :-1], x["weight"], x["labels"], x["bias"]),
                  x).check(dtype).fused
    assert out.shape == labels.shape
    assert (out[labels == -100] == 0).all()
    assert (out <= 0).all(), "logp = target - lse must never be positive"


# A bias the kernels cannot read at b_ptr + v: a column of a [V, 2] parameter (stride 2) and a
# constant broadcast to V (stride 0), each through the view.  The constant's gradient is the sum of
# d_bias over the vocabulary, 0 exactly (softmax sums to 1), so only the column's is compared.
BIASES = {"column": lambda x: x["bias_source"][:, 0], "expanded": lambda x: x["bias_source"].expand(1003)}
BIAS_SOURCES = {"column": (1003, 2), "expanded": (1,)}
BIAS_CALLS = {
    "cross_entropy": lambda m, x, b: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], b, softcap=20.0),
    "cross_entropy-in_forward": lambda m, x, b: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], b,
                                                                       backward="in_forward"),
    "logprobs-statistics": lambda m, x, b: m.linear_logprobs(x["hidden"], x["weight"], x["labels"], b,
                                                             return_entropy=True, return_argmax=True),
    # The reference model's bias strided too (the same view, detached).
    "dpo-ref_bias": lambda m, x, b: m.dpo_loss(x["hidden"], x["weight"], x["labels"], b,
                                               ref_hidden=x["hidden"].detach().flip(0), ref_weight=x["weight"].detach(),
                                               ref_bias=b.detach()),
}


@pytest.mark.parametrize("plan", ["narrow", "cublas"])
@pytest.mark.parametrize("call", BIAS_CALLS.values(), ids=BIAS_CALLS.keys())
@pytest.mark.parametrize("bias", BIASES, ids=BIASES.keys())
def test_strided_bias(bias, call, plan, device):
    x = make_inputs(4, 23, 97, 1003, device=device, seed=23, bias=False)
    x["bias_source"] = torch.randn(BIAS_SOURCES[bias], generator=torch.Generator().manual_seed(5)).to(device)
    x["bias_source"].requires_grad_(bias == "column")
    with tile_plan(plan):
        compare(lambda m, x: call(m, x, BIASES[bias](x)), x, grads=("hidden", "weight", "bias_source")).check(
            torch.float32)


def test_fp16(device):
    x = make_inputs(4, 23, 97, 1003, dtype=torch.float16, device=device, seed=17)
    compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"]), x).check(torch.float16)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_validate_false_matches(dtype, device):
    # Without validation the row count is not known on the host: kernels bound it on the device.
    x = make_inputs(4, 23, 97, 1003, dtype=dtype, device=device, seed=19)
    compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], validate=False),
            x).check(dtype)


def test_only_some_inputs_need_grad(device):
    x = make_inputs(4, 23, 97, 1003, device=device, seed=23)
    x["weight"].requires_grad_(False)
    comparison = compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"]), x)
    assert set(comparison.check(torch.float32).errors) == {"value", "logps", "rewards", "d_hidden", "d_bias"}
    assert x["weight"].grad is None


def test_no_valid_token_at_all(device):
    x = make_inputs(2, 7, 40, 257, device=device, seed=29)
    labels = torch.full_like(x["labels"], -100)
    loss = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], labels, x["bias"])
    loss.backward()
    assert loss.item() == 0.0
    assert (x["hidden"].grad == 0).all() and (x["weight"].grad == 0).all() and (x["bias"].grad == 0).all()


