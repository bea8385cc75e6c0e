"""``backward="in_forward"`` for the pair losses (SimPO, CPO, ORPO, DPO): the gradients computed in
the forward from blocks of whole pairs, against the fp64 reference (value, per-sequence log-probs,
rewards, every metric and gradient) on the shared table's pair cases, and against the default path."""

import dataclasses

import pytest
import torch

import fused_pref
from fused_pref import gradient_in_forward
from fused_pref.testing import CASES, compare, make_inputs, relative_error, run_case
from fused_pref.tools.memory import AllocationRecorder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PAIR_CASES = {name: case for name, case in CASES.items()
              if name.split("[")[0] in ("simpo_loss", "cpo_loss", "orpo_loss", "dpo_loss") and "aot" not in name}
# One row per block: every block then holds exactly one pair (a block is never less than a pair).
WORKSPACES = {"one-pair-blocks": 1, "default": None}


def _in_forward(case, workspace_bytes):
    extra = {"backward": "in_forward"}
    if workspace_bytes is not None:
        extra["workspace_bytes"] = workspace_bytes
    return dataclasses.replace(case, kwargs={**case.kwargs, **extra})


@pytest.mark.parametrize("workspace", WORKSPACES.values(), ids=WORKSPACES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", PAIR_CASES.values(), ids=PAIR_CASES.keys())
def test_every_pair_case(case, dtype, workspace, device):
    comparison = run_case(_in_forward(case, workspace), dtype, device, seed=list(CASES.values()).index(case))
    comparison.check(dtype)
    assert {"value", "logps", "rewards", "d_hidden", "d_weight", "d_bias"} <= comparison.errors.keys()


def _simpo(m, x, **kwargs):
    return m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], beta=2.5, gamma=0.5,
                        backward="in_forward", **kwargs)


@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap"])
def test_softcap_temperature_and_sft(softcap, device):
    x = make_inputs(4, 23, 97, 1003, device=device, seed=5)
    out = compare(lambda m, x: _simpo(m, x, softcap=softcap, temperature=0.7, sft_weight=0.3), x).check(
        torch.float32).fused
    assert out.nll_loss is not None


def test_many_pairs_per_block(device, monkeypatch):
    # 24 pairs of 1-4 valid tokens each: blocks of several whole pairs, a pair never split.
    pairs_per_block, pair_blocks = [], gradient_in_forward.pair_blocks

    def recorded(*args, **kwargs):
        blocks, pairs = pair_blocks(*args, **kwargs)
        pairs_per_block.extend(p.stop - p.start for p in pairs)
        return blocks, pairs

    monkeypatch.setattr(gradient_in_forward, "pair_blocks", recorded)
    compare(lambda m, x: _simpo(m, x, sft_weight=0.5), make_inputs(48, 4, 33, 515, device=device, seed=9)).check(
        torch.float32)
    x = make_inputs(48, 4, 33, 515, device=device, seed=10)
    compare(lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], backward="in_forward",
                                    ref_logps=-torch.arange(48.0, device=device), loss_type="ipo"),
            x).check(torch.float32)
    assert max(pairs_per_block) > 1 and sum(pairs_per_block) == 2 * 24


def test_pair_blocks_hold_whole_pairs():
    # Sequences j and j + B are pair j; rows listed valid-first in flat order, as _rows gives them.
    T, B = 10, 5
    per_sequence = [3, 1, 4, 1, 5, 9, 2, 2, 5, 3]   # valid rows of sequences 0..9
    rows = torch.tensor([s * T + t for s, n in enumerate(per_sequence) for t in range(n)], dtype=torch.int32)
    blocks, pairs = gradient_in_forward.pair_blocks(rows, lambda index: index // T, B, rows_per_block=9)
    # Pair sizes 12, 3, 6, 6, 8: the first alone (past the bound), then 3 + 6, then 6, then 8.
    assert [(p.start, p.stop) for p in pairs] == [(0, 1), (1, 3), (3, 4), (4, 5)]
    for block, p in zip(blocks, pairs):
        sequences = set((block // T).tolist())
        assert sequences == set(range(p.start, p.stop)) | set(range(p.start + B, p.stop + B))
        assert len(block) == sum(per_sequence[s] for s in sequences)
    assert sorted(torch.cat(blocks).tolist()) == sorted(rows.tolist())


def test_same_values_and_gradients_as_the_default_path(device):
    x = make_inputs(4, 23, 97, 1003, device=device, seed=11)
    y = {k: (v.detach().clone().requires_grad_() if v.dtype.is_floating_point else v) if v is not None else None
         for k, v in x.items()}
    out = _simpo(fused_pref, x, sft_weight=0.2)
    out.loss.backward()
    default = fused_pref.simpo_loss(y["hidden"], y["weight"], y["labels"], y["bias"], beta=2.5, gamma=0.5,
                                    sft_weight=0.2)
    default.loss.backward()
    torch.testing.assert_close(out.loss, default.loss, rtol=1e-6, atol=0)
    assert out.metrics() == pytest.approx(default.metrics(), rel=1e-5, abs=1e-6)
    for name in ("hidden", "weight", "bias"):
        # Both fp32 throughout, summed in different orders (blocks of pairs vs vocabulary chunks).
        assert relative_error(x[name].grad, y[name].grad) < 1e-6, name


def test_unvalidated_rows(device):
    # validate=False: no host sync, so every row is in a block; the ignored ones add nothing.
    x = make_inputs(4, 23, 97, 1003, device=device, seed=13)
    compare(lambda m, x: _simpo(m, x, validate=False), x).check(torch.float32)


def test_grad_output_scales_the_gradients(device):
    x = make_inputs(4, 9, 40, 257, device=device, seed=3)
    y = {k: (v.detach().clone().requires_grad_() if v.dtype.is_floating_point else v) if v is not None else None
         for k, v in x.items()}
    (_simpo(fused_pref, x).loss * 4.0).backward()
    _simpo(fused_pref, y).loss.backward()
    for name in ("hidden", "weight", "bias"):
        assert torch.equal(x[name].grad, 4.0 * y[name].grad)  # a power of two: exact


def test_no_gradient_work_without_grad(device):
    x = make_inputs(4, 9, 40, 257, device=device, seed=5)
    V, D = x["weight"].shape

    def weight_sized(recorder):
        return [a for a in recorder.allocations if a.numel >= V * D]

    with AllocationRecorder() as with_grad:
        loss = _simpo(fused_pref, x).loss
    with torch.no_grad(), AllocationRecorder() as without:
        assert torch.equal(_simpo(fused_pref, x).loss, loss.detach())
    assert weight_sized(with_grad) and not weight_sized(without)


def test_fp16(device):
    x = make_inputs(4, 23, 97, 1003, dtype=torch.float16, device=device, seed=19)
    compare(lambda m, x: _simpo(m, x, sft_weight=0.5), x).check(torch.float16)


def test_fp16_small_row_weights_under_a_loss_scale(device):
    # beta 1e-4: each token's weight ~2e-6, far below fp16's normal range (6.1e-5) as an operand's
    # factor (multiplied by it alone, d_weight's error went from 2.8e-4 to 3.8e-2); a loss scale of 1e6
    # brings the gradients back into range.
    x = make_inputs(4, 23, 97, 1003, dtype=torch.float16, device=device, seed=23)
    compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], beta=1e-4, gamma=0.0,
                                      backward="in_forward").loss * 1e6, x).check(torch.float16)


@pytest.mark.parametrize("call, error", [
    (lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], ref_logps=torch.zeros(4), loss_type="aot",
                             backward="in_forward"),
     r"^backward='in_forward' does not run with loss_type='aot', which sorts over the whole batch .*"),
    (lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], ref_logps=torch.zeros(4), loss_type="aot_pair",
                             backward="in_forward"),
     r"^backward='in_forward' does not run with loss_type='aot_pair', .*: use backward='auto'$"),
    (lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], token_metrics=True, backward="in_forward"),
     r"^per-token statistics \(token_metrics\) do not run with backward='in_forward' yet: use backward='auto'$"),
    (lambda m, x: m.kto_loss(x["hidden"], x["weight"], x["labels"], desirable=torch.tensor([True, False] * 2),
                             ref_logps=torch.zeros(4), backward="in_forward"),
     r"^backward='in_forward' computes the gradients inside the forward, .* not this function; use backward='auto'$"),
], ids=["aot", "aot_pair", "token_metrics", "kto"])
@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
def test_refused(module, call, error):
    x = make_inputs(4, 9, 40, 257, seed=5)
    with pytest.raises(ValueError, match=error):
        call(module, x)
