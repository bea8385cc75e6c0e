"""The preference-loss family and the layouts beyond the shared table of cases (``test_parity``):
the NLL term, length normalisation, IPO's averaging, CPO's NLL against cross-entropy, ORPO's
metrics; packed batches equal padded ones; the Hugging Face shift equals explicit slicing.  Every
comparison with the fp64 reference goes through ``fused_pref.testing.compare``."""

import pytest
import torch

import fused_pref
from fused_pref.testing import call, compare, make_inputs, relative_error

SHAPE = (4, 23, 97, 1003)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _dpo(loss_type, **kwargs):
    return lambda m, x: call(m, f"dpo_loss-{loss_type}", x, **kwargs)


def test_ipo_averages_log_probs_as_trl(device):
    x = make_inputs(*SHAPE, device=device, seed=41)
    out = _dpo("ipo")(fused_pref, x)
    mean_logps = fused_pref.sequence_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], reduction="mean")
    assert torch.allclose(out.chosen_logps, mean_logps[:2].detach())


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dpo_sft_weight_and_length_normalize(dtype, device):
    x = make_inputs(*SHAPE, dtype=dtype, device=device, seed=43)
    out = compare(_dpo("sigmoid", sft_weight=0.5, length_normalize=True), x).check(dtype).fused
    assert out.nll_loss is not None and "nll_loss" in out.metrics()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_simpo_with_sft_weight(dtype, device):
    x = make_inputs(*SHAPE, dtype=dtype, device=device, seed=47)
    compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], sft_weight=0.3),
            x).check(dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cpo(dtype, device):
    x = make_inputs(*SHAPE, dtype=dtype, device=device, seed=53)
    out = compare(lambda m, x: m.cpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], label_smoothing=0.05),
                  x).check(dtype).fused
    # CPO is DPO's sigmoid loss without a reference model, plus the chosen NLL.
    nll = fused_pref.linear_cross_entropy(x["hidden"][:2], x["weight"], x["labels"][:2], x["bias"])
    assert out.nll_loss.item() == pytest.approx(nll.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_orpo(dtype, device):
    # No confident tokens: ORPO's log(1 - e^S) is ill-conditioned as S -> 0, in TRL as here.
    x = make_inputs(*SHAPE, dtype=dtype, device=device, seed=59, confident=0.0)
    out = compare(lambda m, x: m.orpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], beta=0.2),
                  x).check(dtype).fused
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= out.metrics().keys()


def _pack(x):
    """The padded batch as a packed one: each sequence cut after its last valid label."""
    labels = x["labels"]
    lengths = [int((row != -100).nonzero().max()) + 1 for row in labels]
    hidden = torch.cat([x["hidden"][r, :n] for r, n in enumerate(lengths)]).detach().requires_grad_()
    packed_labels = torch.cat([labels[r, :n] for r, n in enumerate(lengths)])
    cu = torch.tensor([0] + lengths, device=labels.device).cumsum(0).to(torch.int32)
    return {**x, "hidden": hidden, "labels": packed_labels}, cu


@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("loss", ["simpo", "dpo"])
def test_packed_equals_padded(loss, shift, device):
    x = make_inputs(*SHAPE, device=device, seed=61)
    packed, cu = _pack(x)

    def run(inputs, cu_seqlens):
        args = (inputs["hidden"], inputs["weight"], inputs["labels"], inputs["bias"])
        if loss == "simpo":
            return fused_pref.simpo_loss(*args, shift=shift, cu_seqlens=cu_seqlens)
        return fused_pref.dpo_loss(*args, ref_logps=-torch.arange(4.0, device=device), shift=shift,
                                   cu_seqlens=cu_seqlens)

    padded_out, packed_out = run(x, None), run(packed, cu)
    assert relative_error(packed_out.loss, padded_out.loss) < 1e-6
    assert relative_error(packed_out.chosen_logps, padded_out.chosen_logps) < 1e-6
    grad_padded = torch.autograd.grad(padded_out.loss, x["hidden"])[0]
    grad_packed = torch.autograd.grad(packed_out.loss, packed["hidden"])[0]
    lengths = cu.diff().tolist()
    assert relative_error(grad_packed, torch.cat([grad_padded[r, :n] for r, n in enumerate(lengths)])) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_packed_parity(dtype, device):
    x = make_inputs(*SHAPE, dtype=dtype, device=device, seed=67)
    packed, cu = _pack(x)
    for name in ("hidden", "weight", "bias"):
        packed[name].grad = None

    def call(m, inputs):
        cu_seqlens = cu.to(inputs["labels"].device)
        return m.dpo_loss(inputs["hidden"], inputs["weight"], inputs["labels"], inputs["bias"],
                          ref_hidden=inputs["hidden"].detach() * 0.5, shift=True, cu_seqlens=cu_seqlens,
                          loss_type="robust", label_smoothing=0.2)
    compare(call, packed).check(dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_shift_equals_explicit_slicing(dtype, device):
    x = make_inputs(*SHAPE, dtype=dtype, device=device, seed=71)
    h, w, lab, b = x["hidden"], x["weight"], x["labels"], x["bias"]
    shifted = fused_pref.linear_logprobs(h, w, lab, b, shift=True)
    explicit = fused_pref.linear_logprobs(h[:, :-1], w, lab[:, 1:], b)
    assert shifted.shape == lab.shape
    assert torch.equal(shifted[:, :-1], explicit) and (shifted[:, -1] == 0).all()
    ours = fused_pref.simpo_loss(h, w, lab, b, shift=True).loss
    theirs = fused_pref.simpo_loss(h[:, :-1], w, lab[:, 1:], b).loss
    assert torch.equal(ours, theirs)
    d_ours = torch.autograd.grad(ours, h)[0]
    d_theirs = torch.autograd.grad(theirs, h)[0]  # through the h[:, :-1] view: zero at the last position
    assert torch.equal(d_ours, d_theirs) and (d_ours[:, -1] == 0).all() and d_ours.abs().sum() > 0


def test_packed_shift_never_crosses_sequences(device):
    # Position t of a packed sequence is trained on the next label of its own sequence only.
    x = make_inputs(2, 9, 40, 257, device=device, seed=73, bias=False)
    x["labels"][:] = torch.randint(0, 257, x["labels"].shape)  # every label valid
    packed, cu = _pack(x)
    logp = fused_pref.linear_logprobs(packed["hidden"], x["weight"], packed["labels"], shift=True, cu_seqlens=cu)
    ends = cu[1:].long() - 1
    assert (logp[ends] == 0).all() and (logp[torch.ones_like(logp, dtype=torch.bool).index_fill(0, ends, False)] < 0).all()
