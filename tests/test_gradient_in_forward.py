"""``backward="in_forward"``: cross-entropy's gradients computed inside the forward, against the fp64
reference (which ignores ``backward``), on the shapes of the parity tests, with blocks of rows small
enough that every call runs several; and what holds for every loss of the mode (the pair losses'
own tests are in test_preference_in_forward.py)."""

import math

import pytest
import torch

import fused_pref
from fused_pref import gradient_in_forward
from fused_pref.kernels.cross_entropy_block import block_lse_and_target, cross_entropy_block, new_stats
from fused_pref.testing import compare, make_inputs, relative_error
from fused_pref.tools.memory import AllocationRecorder

SHAPES = {
    "R4-T23-D97-V1003": (4, 23, 97, 1003),
    "R2-T7-D40-V257": (2, 7, 40, 257),
    "R2-T9-D497-V300": (2, 9, 497, 300),
    "R2-T9-D33-V4099": (2, 9, 33, 4099),  # three of the block kernel's 2048-wide steps, the last padded
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _loss(m, x, **kwargs):
    return m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], backward="in_forward", **kwargs)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_parity(shape, dtype, softcap, reduction, device):
    x = make_inputs(*shape, dtype=dtype, device=device, seed=sum(shape))
    comparison = compare(lambda m, x: _loss(m, x, softcap=softcap, reduction=reduction), x).check(dtype)
    assert set(comparison.errors) == {"value", "d_hidden", "d_weight", "d_bias"}


@pytest.mark.parametrize("layout", ["packed-shift", "flat-strided", "unvalidated"])
def test_layouts(layout, device):
    x = make_inputs(3, 19, 41, 515, device=device, seed=7, bias=False)
    if layout == "packed-shift":
        cu = torch.tensor([0, 19, 38, 57], dtype=torch.int32, device=device)

        def fn(m, x):
            return _loss(m, {**x, "hidden": x["hidden"].flatten(0, 1), "labels": x["labels"].flatten()},
                         shift=True, cu_seqlens=cu)
    elif layout == "flat-strided":
        # Every other position of a wider hidden: strided rows, gathered per block, never copied whole.
        def fn(m, x):
            return _loss(m, {**x, "hidden": x["hidden"][:, ::2], "labels": x["labels"][:, ::2]})
    else:
        # No host sync: every row is computed, the invalid ones adding nothing.
        def fn(m, x):
            return _loss(m, x, validate=False)
    compare(fn, x).check(torch.float32)


def test_blocks_of_rows():
    # A pair loss's blocks are only held to the workspace: 4 bytes per logit of a row in bf16.
    assert gradient_in_forward.rows_within(128_256, torch.bfloat16, 2**28) == 512
    assert gradient_in_forward.rows_within(128_256, torch.bfloat16, 2**30) == 2048
    assert gradient_in_forward.rows_within(1000, torch.bfloat16, 4 * 1000 * 37) == 37
    # dz in the input dtype plus half as many rows of fp32 logits: 4 bytes per logit of a row in
    # bf16, 6 in fp32.  A 16th of the rows at most, fewer when the workspace is smaller; at least
    # one; from 128 rows up a multiple of 128.
    assert gradient_in_forward.rows_per_block(16_000, 1000, torch.bfloat16, 2**40) == 1000
    assert gradient_in_forward.rows_per_block(16_000, 1000, torch.bfloat16, 4 * 1000 * 37) == 37
    assert gradient_in_forward.rows_per_block(16_000, 1000, torch.float32, 6 * 1000 * 300) == 256
    assert gradient_in_forward.rows_per_block(5, 10**6, torch.float32, 1) == 1
    # Llama-3-8B's head, 12,288 valid rows: 512 rows of bf16 at the default 256 MiB; at 512 MiB a 16th
    # of the rows, 768.
    assert gradient_in_forward.rows_per_block(12_288, 128_256, torch.bfloat16, 2**28) == 512
    assert gradient_in_forward.rows_per_block(12_288, 128_256, torch.bfloat16, 2**29) == 768


@pytest.mark.parametrize("write_dz", [True, False], ids=["dz", "loss-alone"])
def test_block_kernel_statistics(write_dz, device):
    # Entropy, argmax and max logit from the first pass, against torch in fp64: ties inside one lane
    # (columns 3 and 3 + 2048, two steps apart) and across lanes (10 and 7) go to the first column,
    # as torch.argmax; a flat row has the largest entropy, log V, and argmax 0; V past two steps.
    gen = torch.Generator().manual_seed(1)
    V = 4099
    logits = torch.randn(5, V, generator=gen) * 4
    logits[0, [3, 2051]] = 30.0
    logits[1, [10, 7]] = 30.0
    logits[2, V - 1] = 30.0
    logits[3] = 0.25
    logits[4] += 100
    labels = torch.tensor([3, 7, 0, 1, 5])
    stats = new_stats(5, device)
    dz = torch.empty(5, V, device=device) if write_dz else None
    cross_entropy_block(logits.to(device), None, labels.to(device), temperature=0.5, dz=dz, stats=stats)
    z = logits.double() / 0.5
    p = torch.softmax(z, dim=1)
    entropy = torch.logsumexp(z, dim=1) - (p * z).sum(1)
    assert relative_error(stats[0].cpu(), entropy) < 1e-5
    assert abs(stats[0][3].item() - math.log(V)) < 1e-5
    assert stats[1].cpu().tolist() == z.argmax(1).tolist() == [3, 7, V - 1, 0, z[4].argmax().item()]
    assert relative_error(stats[2].cpu(), z.max(1).values) < 1e-6
    # The same statistics from the first pass that keeps the lse and target apart (a shard's).
    apart = new_stats(5, device)
    block_lse_and_target(logits.to(device), None, labels.to(device), temperature=0.5, stats=apart)
    for mine, theirs in zip(apart, stats, strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "softcap"])
def test_block_kernel_against_torch_in_fp64(softcap, device):
    # Peaked and far-apart logits (std 8, one row shifted by -100, one by +100: exp overflows
    # unless the running max is subtracted), V past the first step; fp32 against fp64 at 1e-5.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4099, generator=gen) * 8
    logits[1] -= 100
    logits[3] += 100
    bias = torch.randn(4099, generator=gen)
    labels = torch.tensor([0, 4098, 17, 2048, 0])
    # A label past V (validate=False) matches no column, not even a padded one of the last step.
    past = cross_entropy_block(logits.to(device), None, torch.tensor([4099, 4100, 5000, 4099, 4098]).to(device))
    assert torch.isfinite(past).all()
    dz = torch.empty(5, 4099, device=device)
    sums = torch.empty(5, device=device)
    nlp = cross_entropy_block(logits.to(device), bias.to(device), labels.to(device), softcap=softcap, dz=dz,
                              logit_sum=sums)
    z = logits.double() + bias.double()
    if softcap is not None:
        z.requires_grad_()
        capped = softcap * torch.tanh(z / softcap)
    else:
        capped = z.requires_grad_()
    terms = torch.logsumexp(capped, dim=1) - capped.gather(1, labels[:, None]).squeeze(1)
    terms.sum().backward()
    # -logp per row, dz its gradient, the sums of the (soft-capped) logits.
    assert relative_error(nlp.cpu(), terms.detach()) < 1e-5
    assert relative_error(dz.cpu(), z.grad) < 1e-5
    assert relative_error(sums.cpu(), capped.detach().sum(1)) < 1e-5
    no_dz = cross_entropy_block(logits.to(device), None, labels.to(device))
    assert relative_error(no_dz.cpu(), torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None]).squeeze(1)) < 1e-5


def test_same_values_and_gradients_as_the_default_path(device):
    x = make_inputs(4, 23, 97, 1003, device=device, seed=11)
    y = {k: (v.detach().clone().requires_grad_() if v.dtype.is_floating_point else v) if v is not None else None
         for k, v in x.items()}
    _loss(fused_pref, x).backward()
    fused_pref.linear_cross_entropy(y["hidden"], y["weight"], y["labels"], y["bias"]).backward()
    for name in ("hidden", "weight", "bias"):
        torch.testing.assert_close(x[name].grad, y[name].grad, rtol=1e-5, atol=1e-7)


# Each kind of loss this mode runs, its loss as a tensor: the tests below hold for both.
LOSSES = {
    "cross_entropy": lambda m, x: _loss(m, x),
    "simpo": lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], sft_weight=0.3,
                                       backward="in_forward").loss,
}


@pytest.mark.parametrize("loss", LOSSES.values(), ids=LOSSES.keys())
def test_grad_output_scales_the_gradients(loss, device):
    x = make_inputs(2, 9, 40, 257, device=device, seed=3)
    y = {k: (v.detach().clone().requires_grad_() if v.dtype.is_floating_point else v) if v is not None else None
         for k, v in x.items()}
    (loss(fused_pref, x) * 4.0).backward()
    loss(fused_pref, y).backward()
    for name in ("hidden", "weight", "bias"):
        assert torch.equal(x[name].grad, 4.0 * y[name].grad)  # a power of two: exact


def test_only_the_gradients_asked_for(device):
    x = make_inputs(2, 9, 40, 257, device=device, seed=5)
    x["weight"].requires_grad_(False)
    comparison = compare(_loss, x).check(torch.float32)
    assert set(comparison.errors) == {"value", "d_hidden", "d_bias"} and x["weight"].grad is None


@pytest.mark.parametrize("loss", LOSSES.values(), ids=LOSSES.keys())
def test_no_gradient_work_without_grad(loss, device):
    # Under no_grad the forward computes the loss alone: no fp32 [V, D] accumulator, no [V, D] gradient.
    x = make_inputs(2, 9, 40, 257, device=device, seed=5)
    V, D = x["weight"].shape

    def weight_sized(recorder):
        return [a for a in recorder.allocations if a.numel >= V * D]

    with AllocationRecorder() as with_grad:
        value = loss(fused_pref, x)
    with torch.no_grad(), AllocationRecorder() as without:
        assert torch.equal(loss(fused_pref, x), value.detach())
    assert weight_sized(with_grad) and not weight_sized(without)


def test_deterministic(device):
    x = make_inputs(4, 23, 97, 1003, device=device, seed=13, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        for t in (x["hidden"], x["weight"], x["bias"]):
            t.grad = None
        loss = _loss(fused_pref, x)
        loss.backward()
        runs.append((loss.detach(), x["hidden"].grad, x["weight"].grad, x["bias"].grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_the_logits_never_exist(device):
    # Blocks are at most a 16th of the rows: no tensor of N x V / 8 elements, at the default workspace.
    x = make_inputs(4, 64, 24, 1003, device=device, seed=17)  # d_weight (V x D) is under the bound too
    n, v = x["labels"].numel(), x["weight"].shape[0]
    with AllocationRecorder() as recorder:
        _loss(fused_pref, x).backward()
    assert recorder.largest().numel < n * v / 8


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="none",
                                         backward="in_forward"), "not reduction='none'"),
    (lambda m, x: m.linear_logprobs(x["hidden"], x["weight"], x["labels"], backward="in_forward"),
     "not this function"),
    (lambda m, x: m.sequence_logprobs(x["hidden"], x["weight"], x["labels"], backward="in_forward"),
     "not this function"),
], ids=["reduction-none", "linear_logprobs", "sequence_logprobs"])
@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
def test_refused_where_the_gradient_is_not_known_in_the_forward(module, call, message, device):
    x = make_inputs(2, 9, 40, 257, device=device, seed=5)
    with pytest.raises(ValueError, match=r"^backward='in_forward' computes the gradients inside the forward, .*"
                                         + message + "; use backward='auto'$"):
        call(module, x)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sequence_logprobs_without_gradients(dtype, reduction, layout, device, monkeypatch):
    # A reference model's pass: where no gradient is needed (under no_grad, or no input requiring
    # one) the mode's products give the log-probs, in blocks of a few dozen rows here, and no logits tile
    # runs; against the fp64 reference (fp32's tolerance: the logits are fp32 products of the inputs).
    ran = []
    for name in ("logprobs_in_blocks", "linear_lse"):
        def recorded(*args, _op=getattr(fused_pref.ops, name), _name=name):
            ran.append(_name)
            return _op(*args)
        monkeypatch.setattr(fused_pref.ops, name, recorded)
    x = make_inputs(4, 23, 97, 1003, dtype=dtype, device=device, seed=23)
    kwargs = dict(reduction=reduction, shift=True, workspace_bytes=20 * 1003 * 6)
    hidden, labels = x["hidden"], x["labels"]
    if layout == "packed":
        hidden, labels = hidden.flatten(0, 1), labels.flatten()
        kwargs["cu_seqlens"] = torch.arange(0, 4 * 23 + 1, 23, dtype=torch.int32, device=device)
    ref = {k: v.detach().cpu().double() if v.dtype.is_floating_point else v.cpu() for k, v in x.items()}
    ref["hidden"], ref["labels"] = ref["hidden"].reshape(hidden.shape), labels.cpu()
    theirs = fused_pref.reference.sequence_logprobs(ref["hidden"], ref["weight"], ref["labels"], ref["bias"],
                                                    **{**kwargs, "cu_seqlens": None if layout == "padded"
                                                       else kwargs["cu_seqlens"].cpu()})
    with torch.no_grad():
        ours = fused_pref.sequence_logprobs(hidden, x["weight"], labels, x["bias"], backward="in_forward", **kwargs)
    detached = fused_pref.sequence_logprobs(hidden.detach(), x["weight"].detach(), labels, x["bias"].detach(),
                                            backward="in_forward", **kwargs)
    assert ran == ["logprobs_in_blocks", "logprobs_in_blocks"]
    assert relative_error(ours, theirs) <= 1e-5 and torch.equal(ours, detached)


def test_fp16_small_row_scales_under_a_loss_scale(device):
    # Rows scaled by 1e-5 (class weights under a sum; a mean over 100k tokens is the same) and a
    # loss scale of 1e5, as fp16 training uses: an fp16 dz scaled by the rows, or fp16 gradients
    # stored before the loss scale multiplies them, would sink below fp16's normal range (6e-5).
    x = make_inputs(4, 23, 97, 1003, dtype=torch.float16, device=device, seed=19)
    ce_weight = torch.full((1003,), 1e-5, device=device)
    compare(lambda m, x: _loss(m, x, reduction="sum", ce_weight=ce_weight), x, loss_scale=1e5).check(torch.float16)
