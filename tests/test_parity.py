"""Every public function, value and all gradients, fused (Triton) against the fp64 reference.

Shapes are small but awkward: V not a multiple of any block (1003, 257, 2053), D not a power of two
and larger than BLOCK_D (97, 497), odd T, ragged prompts and padding, an ignored run inside a
completion; bias and softcap on and off; both the split-vocabulary forward (few rows) and the
unsplit one (many rows); a multi-chunk backward (always: a chunk is at most V/16).
"""

import pytest
import torch

import fused_pref
from fused_pref.testing import TOLERANCE, as_reference, make_inputs, relative_error

SHAPES = {
    "R4-T23-D97-V1003": (4, 23, 97, 1003),
    "R2-T7-D40-V257": (2, 7, 40, 257),
    "R2-T9-D497-V300": (2, 9, 497, 300),
    "R6-T101-D33-V2053-unsplit": (6, 101, 33, 2053),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _weights_like(ref, seed):
    return torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_close(out, ref, dtype, what):
    error = relative_error(out, ref)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3e} > {TOLERANCE[dtype]:.0e}"


def _check(call, x, dtype, *, seed=0, grads=("hidden", "weight", "bias")):
    """Run ``call`` on the fused module and on the fp64 reference; compare value and gradients."""
    rx = as_reference(x)
    out, ref = call(fused_pref, x), call(fused_pref.reference, rx)
    out_t, ref_t = (out.loss, ref.loss) if hasattr(out, "loss") else (out, ref)
    assert out_t.dtype == torch.float32
    _assert_close(out_t, ref_t, dtype, "value")
    weights = _weights_like(ref_t, seed)
    (out_t * weights.to(out_t.device, out_t.dtype)).sum().backward()
    (ref_t * weights).sum().backward()
    for name in grads:
        if x.get(name) is None:
            continue
        assert x[name].grad.dtype == x[name].dtype, f"d_{name} must come back in the input dtype"
        _assert_close(x[name].grad, rx[name].grad, dtype, f"d_{name}")
    return out, ref


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_simpo(shape, dtype, softcap, bias, device):
    x = make_inputs(*shape, dtype=dtype, device=device, bias=bias, seed=hash((shape, bias)) % 1000)
    out, ref = _check(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"],
                                                beta=2.5, gamma=0.5, softcap=softcap), x, dtype)
    # Per-sequence fields are compared as one vector: a sequence of only confident tokens has
    # logp ~ -1e-6, where fp32's absolute rounding of 40-sized logits is a large relative error.
    for kind in ("logps", "rewards", "logits_mean"):
        pick = lambda o: torch.cat([getattr(o, f"chosen_{kind}").reshape(-1), getattr(o, f"rejected_{kind}").reshape(-1)])  # noqa: E731
        _assert_close(pick(out), pick(ref), torch.float32, kind)
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
        args = {k: (v.cpu().double() if m is fused_pref.reference and torch.is_tensor(v) else v)
                for k, v in ref_args.items()}
        return m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], beta=0.2, label_smoothing=0.1, **args)

    out, ref = _check(call, x, dtype)
    _assert_close(torch.cat([out.chosen_rewards, out.rejected_rewards]),
                  torch.cat([ref.chosen_rewards, ref.rejected_rewards]), torch.float32, "rewards")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_sequence_logprobs(reduction, dtype, device):
    x = make_inputs(4, 23, 97, 1003, dtype=dtype, device=device, seed=11)
    _check(lambda m, x: m.sequence_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], reduction=reduction),
           x, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", ["N-D", "R-T-D"])
def test_linear_cross_entropy(reduction, dtype, layout, device):
    x = make_inputs(3, 31, 72, 1003, dtype=dtype, device=device, seed=5)
    flat = layout == "N-D"

    def call(m, x):
        h, lab = (x["hidden"].flatten(0, 1), x["labels"].flatten()) if flat else (x["hidden"], x["labels"])
        return m.linear_cross_entropy(h, x["weight"], lab, x["bias"], reduction=reduction, softcap=15.0)

    _check(call, x, dtype)


def test_cross_entropy_matches_torch(device):
    x = make_inputs(3, 31, 72, 1003, device=device, seed=9)
    h, lab = x["hidden"].flatten(0, 1), x["labels"].flatten()
    ours = fused_pref.linear_cross_entropy(h, x["weight"], lab, x["bias"])
    theirs = torch.nn.functional.cross_entropy(h @ x["weight"].T + x["bias"], lab)
    _assert_close(ours, theirs, torch.float32, "vs F.cross_entropy")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_linear_logprobs_strided_hidden(dtype, device):
    # h[:, :-1] as a Hugging Face shift would take it: read through strides, never copied.
    x = make_inputs(4, 24, 97, 1003, dtype=dtype, device=device, seed=13)
    labels = x["labels"][:, 1:]
    x["labels"] = labels
    out, _ = _check(lambda m, x: m.linear_logprobs(x["hidden"][:, :-1], x["weight"], x["labels"], x["bias"]),
                    x, dtype)
    assert out.shape == labels.shape
    assert (out[labels == -100] == 0).all()
    assert (out <= 0).all(), "logp = target - lse must never be positive"


def test_fp16(device):
    x = make_inputs(4, 23, 97, 1003, dtype=torch.float16, device=device, seed=17)
    _check(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"]), x, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_validate_false_matches(dtype, device):
    # Without validation the row count is not known on the host: kernels bound it on the device.
    x = make_inputs(4, 23, 97, 1003, dtype=dtype, device=device, seed=19)
    _check(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], validate=False), x, dtype)


def test_only_some_inputs_need_grad(device):
    x = make_inputs(4, 23, 97, 1003, device=device, seed=23)
    x["weight"].requires_grad_(False)
    _check(lambda m, x: m.simpo_loss(x["hidden"], x["weight"].detach(), x["labels"], x["bias"]), x,
           torch.float32, grads=("hidden", "bias"))
    assert x["weight"].grad is None


def test_no_valid_token_at_all(device):
    x = make_inputs(2, 7, 40, 257, device=device, seed=29)
    labels = torch.full_like(x["labels"], -100)
    loss = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], labels, x["bias"])
    loss.backward()
    assert loss.item() == 0.0
    assert (x["hidden"].grad == 0).all() and (x["weight"].grad == 0).all() and (x["bias"].grad == 0).all()


@pytest.mark.parametrize("shape", list(SHAPES.values())[:3], ids=list(SHAPES)[:3])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap"])
def test_fused_backward(shape, dtype, softcap, device):
    # Strategy (a): the atomic, fully fused backward (backward="fused"), against the same reference.
    x = make_inputs(*shape, dtype=dtype, device=device, seed=89)
    _check(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], softcap=softcap,
                                     sft_weight=0.2, backward="fused"), x, dtype)


@pytest.mark.parametrize("needs", ["hidden", "weight"])
def test_fused_backward_partial_gradients(needs, device):
    x = make_inputs(4, 23, 97, 1003, device=device, seed=97, bias=False)
    other = "weight" if needs == "hidden" else "hidden"
    x[other].requires_grad_(False)
    _check(lambda m, x: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], shift=True, backward="fused"),
           x, torch.float32, grads=(needs,))
    assert x[other].grad is None
