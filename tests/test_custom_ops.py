"""``torch.library.opcheck`` over every custom op of ``fused_pref/ops.py``, on the arguments that real
calls pass them: the schema (no input mutated or aliased by an output), the fake implementation
against the real outputs (shapes, dtypes, strides), and the op's forward traced by AOT autograd's
dispatcher with dynamic shapes, as ``torch.compile`` traces it.  The ops carry no autograd formula
of their own (opcheck's ``test_autograd_registration`` does not apply): the
``torch.autograd.Function``s of ``fused_pref/autograd.py`` around them do, so the arguments are
detached copies (tests/test_compile.py checks the compiled gradients)."""

import pytest
import torch

import fused_pref
from fused_pref import ops
from fused_pref.kernels import tile_plan
from fused_pref.testing import make_inputs

CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
OPS = ("linear_lse", "linear_grad", "cross_entropy_in_forward", "preference_in_forward", "logprobs_in_blocks",
       "preference_head")


def _entropy_and_smoothing(x):
    out = fused_pref.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], return_entropy=True,
                                     return_argmax=True, softcap=20.0)
    (out.logp.sum() - 0.1 * out.entropy.sum()).backward()
    fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], label_smoothing=0.1,
                                    lse_square_scale=1e-2, ce_weight=torch.rand(x["weight"].shape[0]).to(x["weight"]),
                                    temperature=0.8).backward()


def _pair_losses(x):
    fused_pref.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], token_metrics=True).loss.backward()
    fused_pref.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], ref_hidden=x["hidden"].detach().flip(0),
                        loss_type="ipo").loss.backward()


def _in_forward(x):
    fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], backward="in_forward",
                                    return_token_accuracy=True).loss.backward()
    fused_pref.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], ref_hidden=x["hidden"].detach().flip(0),
                        token_metrics=True, backward="in_forward").loss.backward()


def _cublas_plan(x):
    with tile_plan("cublas"):
        _entropy_and_smoothing(x)


CALLS = {"entropy+smoothing": _entropy_and_smoothing, "pair-losses": _pair_losses, "in_forward": _in_forward,
         "cublas-plan": _cublas_plan}


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def _recorded(monkeypatch, run, x):
    """``(op name, args)`` of each custom op call that ``run(x)`` makes, the args detached copies."""
    calls = []
    with monkeypatch.context() as patched:
        for name in OPS:
            def recording(*args, _op=getattr(ops, name), _name=name):
                calls.append((_name, _detached(args)))
                return _op(*args)
            patched.setattr(ops, name, recording)
        run(x)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CALLS)
def test_opcheck_on_the_arguments_of_real_calls(name, dtype, device, monkeypatch):
    x = make_inputs(2, 11, 40, 301, dtype=dtype, device=device, seed=97)
    calls = _recorded(monkeypatch, CALLS[name], x)
    assert calls, "no custom op ran"
    for op_name, args in calls:
        torch.library.opcheck(getattr(ops, op_name), args, test_utils=CHECKS)


def test_every_op_is_among_the_calls(device, monkeypatch):
    x = make_inputs(2, 11, 40, 301, device=device, seed=98)
    seen = set()
    for run in CALLS.values():
        seen |= {op_name for op_name, _ in _recorded(monkeypatch, run, x)}
        for t in (x["hidden"], x["weight"], x["bias"]):
            t.grad = None
    assert seen == set(OPS)
