"""Activation checkpointing around our losses: ``torch.utils.checkpoint`` (reentrant or not) around
the loss call, and a transformers model with ``gradient_checkpointing_enable``: the same loss and
gradients as without, the fused forward run once more by the recompute and no more."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fused_pref
from fused_pref import ops
from fused_pref.testing import kernel_device, make_inputs, relative_error

transformers = pytest.importorskip("transformers")

import fused_pref.integrations.hf as fph  # noqa: E402


def _grads(x):
    return [x[name].grad for name in ("hidden", "weight", "bias")]


LOSSES = {
    "cross_entropy": lambda h, w, lab, b: fused_pref.linear_cross_entropy(h, w, lab, b, label_smoothing=0.1),
    "simpo": lambda h, w, lab, b: fused_pref.simpo_loss(h, w, lab, b, sft_weight=0.5).loss,
    "logprobs_entropy": lambda h, w, lab, b: (lambda out: -(out.logp.sum() + 0.1 * out.entropy.sum()))(
        fused_pref.linear_logprobs(h, w, lab, b, return_entropy=True)),
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", LOSSES)
def test_checkpointed_loss_equals_plain(name, reentrant, monkeypatch):
    device = kernel_device()
    x, y = make_inputs(4, 11, 40, 301, device=device, seed=3), make_inputs(4, 11, 40, 301, device=device, seed=3)
    loss_fn = LOSSES[name]
    plain = loss_fn(x["hidden"], x["weight"], x["labels"], x["bias"])
    plain.backward()
    forwards = []
    original = ops.forward

    def counted(*args, **kwargs):
        forwards.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "forward", counted)
    # The inputs enter as arguments, so the recompute sees them as the first call did.
    checkpointed = checkpoint(loss_fn, y["hidden"], y["weight"], y["labels"], y["bias"], use_reentrant=reentrant)
    assert len(forwards) == 1
    checkpointed.backward()
    # One recompute and no other forward: the loss is recomputed at most once.
    assert len(forwards) == 2
    assert relative_error(checkpointed, plain) <= 1e-6
    for ours, theirs in zip(_grads(y), _grads(x)):
        assert relative_error(ours, theirs) <= 1e-6


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_a_plan_given_per_call_holds_in_the_recompute(reentrant, monkeypatch):
    # A checkpoint's recompute runs in the backward, outside any `with tile_plan(...)` around the
    # forward; the plan option travels with the call's arguments, so forward, recompute and
    # backward all run it.
    device = kernel_device()
    x = make_inputs(4, 11, 40, 301, device=device, seed=3)
    plans, forward, backward = [], ops.forward, ops.backward
    monkeypatch.setattr(ops, "forward", lambda *a, **k: plans.append(("forward", a[6].plan)) or forward(*a, **k))
    monkeypatch.setattr(ops, "backward", lambda *a, **k: plans.append(("backward", a[10].plan)) or backward(*a, **k))

    def loss_fn(h, w, lab, b):
        return fused_pref.linear_cross_entropy(h, w, lab, b, plan="cublas")

    checkpoint(loss_fn, x["hidden"], x["weight"], x["labels"], x["bias"], use_reentrant=reentrant).backward()
    assert plans == [("forward", "cublas"), ("forward", "cublas"), ("backward", "cublas")], plans


def test_gradient_checkpointing_of_a_transformers_model():
    device = kernel_device()
    config = transformers.LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(config).to(device).train()
    torch.manual_seed(0)
    checkpointed = transformers.LlamaForCausalLM(config).to(device).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 301, (3, 13), generator=gen).to(device)
    labels = input_ids.masked_fill(torch.arange(13, device=device) < 4, -100)
    losses = [fph.linear_cross_entropy(model, input_ids, labels) for model in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    assert relative_error(losses[1], losses[0]) <= 1e-6
    for (name, a), (_, b) in zip(checkpointed.named_parameters(), plain.named_parameters()):
        assert relative_error(a.grad, b.grad) <= 1e-5, name
