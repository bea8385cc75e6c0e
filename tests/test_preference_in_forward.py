"""``backward="in_forward"`` for the pair losses (SimPO, CPO, ORPO, DPO): the gradients computed in
the forward from blocks of whole pairs, against the fp64 reference (value, per-sequence log-probs,
rewards, every metric and gradient) on the shared table's pair cases, and against the default path."""

import pytest
import torch

import fused_pref
from fused_pref import gradient_in_forward
from fused_pref.testing import CASES, compare, count_host_reads, make_inputs, relative_error, run_case

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PAIR_CASES = {name: case for name, case in CASES.items()
              if name.split("[")[0] in ("simpo_loss", "cpo_loss", "orpo_loss", "dpo_loss") and case.runs_in_forward()}
# One row per block: every pair cut into blocks of one row, its log-probs computed first; and the
# default, where the small batches' pairs all fit in one block.
WORKSPACES = {"one-row-blocks": 1, "default": None}


def _in_forward(case, workspace_bytes):
    workspace = {} if workspace_bytes is None else {"workspace_bytes": workspace_bytes}
    return case.with_kwargs(backward="in_forward", **workspace)


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


def test_blocks_of_several_pairs_and_cut_pairs(device, monkeypatch):
    # 24 pairs of 2-8 valid tokens, blocks of 10 rows (fp32 at V 515: 6 bytes per logit): several
    # whole pairs per block, and the pairs past 10 rows cut into blocks of their own after a pass
    # for their log-probs.
    layouts, pair_blocks = [], gradient_in_forward.pair_blocks

    def recorded(*args, **kwargs):
        blocks, pairs, cut = pair_blocks(*args, **kwargs)
        layouts.append(([p.stop - p.start for p in pairs], cut))
        return blocks, pairs, cut

    monkeypatch.setattr(gradient_in_forward, "pair_blocks", recorded)
    workspace = 10 * 515 * 6
    compare(lambda m, x: _simpo(m, x, sft_weight=0.5, workspace_bytes=workspace),
            make_inputs(48, 4, 33, 515, device=device, seed=9)).check(torch.float32)
    x = make_inputs(48, 8, 33, 515, device=device, seed=10)
    compare(lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], backward="in_forward",
                                    ref_logps=-torch.arange(48.0, device=device), loss_type="ipo",
                                    workspace_bytes=workspace), x).check(torch.float32)
    (simpo_pairs, _), (dpo_pairs, dpo_cut) = layouts
    assert max(simpo_pairs) > 1 and dpo_cut and len(dpo_pairs) > len(dpo_cut)


def test_pair_blocks():
    # Sequences j and j + B are pair j; rows listed valid-first in flat order, as _rows gives them.
    T, B = 10, 6
    per_sequence = [3, 1, 4, 1, 5, 0, 9, 2, 2, 5, 3, 0]   # valid rows of sequences 0..11
    rows = torch.tensor([s * T + t for s, n in enumerate(per_sequence) for t in range(n)], dtype=torch.int32)
    valid = torch.ones(2 * B * T, dtype=torch.bool)
    blocks, pairs, cut = gradient_in_forward.pair_blocks(rows, valid, lambda index: index // T, B, rows_per_block=9)
    # Pair sizes 12, 3, 6, 6, 8, 0: the first cut into 9 + 3 rows, then 3 + 6, then 6, then 8 (with
    # the empty last pair); no empty block.
    assert [(p.start, p.stop) for p in pairs] == [(0, 1), (0, 1), (1, 3), (3, 4), (4, 6)]
    assert [len(b) for b in blocks] == [9, 3, 9, 6, 8] and cut == [0, 1]
    for block, p in zip(blocks[2:], pairs[2:]):
        sequences = set((block // T).tolist())
        assert sequences <= set(range(p.start, p.stop)) | set(range(p.start + B, p.stop + B))
        assert len(block) == sum(per_sequence[s] for s in sequences)
    assert set((torch.cat(blocks[:2]) // T).tolist()) == {0, 6}
    assert sorted(torch.cat(blocks).tolist()) == sorted(rows.tolist())
    assert gradient_in_forward.pair_blocks(rows[:0], valid, lambda index: index // T, B, 9) == ([], [], [])
    # Ignored rows among the rows (no validation): left out, as if the index had none.
    ignored = torch.ones_like(valid)
    ignored[rows[:4].long()] = False
    blocks, pairs, _ = gradient_in_forward.pair_blocks(rows, ignored, lambda index: index // T, B, rows_per_block=9)
    assert sorted(torch.cat(blocks).tolist()) == sorted(rows[4:].tolist())


@pytest.mark.parametrize("workspace", WORKSPACES.values(), ids=WORKSPACES.keys())
def test_packed_sequences_of_different_lengths(workspace, device):
    # Packed lengths 5, 9, 3, 12, 7, 4 (pairs 0-3, 1-4, 2-5), the shift and the NLL term, unvalidated.
    lengths = [5, 9, 3, 12, 7, 4]
    x = make_inputs(1, sum(lengths), 41, 515, device=device, seed=29)
    x = {**x, "hidden": x["hidden"][0].detach().requires_grad_(), "labels": x["labels"][0]}
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    kwargs = dict(backward="in_forward", shift=True, cu_seqlens=cu, validate=False,
                  **({} if workspace is None else {"workspace_bytes": workspace}))
    compare(lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], sft_weight=0.5,
                                    ref_logps=-torch.arange(6.0, device=device), **kwargs), x).check(torch.float32)


@pytest.mark.parametrize("ignored", ["every-label", "last-pair"])
def test_pairs_without_valid_tokens(ignored, device):
    x = make_inputs(4, 9, 40, 257, device=device, seed=31)
    if ignored == "every-label":
        x["labels"][:] = -100
    else:
        x["labels"][[1, 3]] = -100      # pair 1: sequences 1 and 3
    compare(lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], backward="in_forward",
                                    ref_logps=-torch.arange(4.0, device=device), workspace_bytes=1),
            x).check(torch.float32)


@pytest.mark.parametrize("layout", ["padded", "packed,shift,unvalidated"])
def test_reference_model_through_the_blocks(layout, device, monkeypatch):
    # The reference model's hidden states (another D, its own bias, a softcap and a temperature) go
    # through this mode's products, blocks of 3 rows: never through the default path's forward.
    x = make_inputs(4, 23, 97, 1003, device=device, seed=29)
    ref = make_inputs(4, 23, 61, 1003, device=device, seed=31)
    x.update(ref_hidden=ref["hidden"].detach(), ref_weight=ref["weight"].detach(), ref_bias=ref["bias"].detach())
    kwargs = {"softcap": 20.0, "temperature": 0.8, "workspace_bytes": 3 * 4 * 1003}
    if layout != "padded":
        x.update(hidden=x["hidden"].detach().flatten(0, 1).requires_grad_(), labels=x["labels"].flatten(),
                 ref_hidden=x["ref_hidden"].flatten(0, 1))
        kwargs.update(cu_seqlens=torch.tensor([0, 20, 23, 50, 92], dtype=torch.int32, device=device), shift=True,
                      validate=False)

    def no_tile_forward(*args, **kw):
        raise AssertionError("the default path's forward ran")

    monkeypatch.setattr(fused_pref.ops, "forward", no_tile_forward)
    compare(lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], ref_hidden=x["ref_hidden"],
                                    ref_weight=x["ref_weight"], ref_bias=x["ref_bias"], beta=0.5,
                                    backward="in_forward", **kwargs), x).check(torch.float32)


def test_host_reads(device):
    # Without validation a cross-entropy reads nothing back; a pair loss reads its rows per pair once
    # (its blocks' layout), and nothing per block in bf16.
    x = make_inputs(4, 23, 97, 1003, dtype=torch.bfloat16, device=device, seed=37)
    calls = {
        "cross_entropy": lambda: fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"],
                                                                 backward="in_forward", validate=False),
        "simpo": lambda: _simpo(fused_pref, x, validate=False, workspace_bytes=1).loss,
        # The reference model's pass adds none.
        "dpo": lambda: fused_pref.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"],
                                           ref_hidden=x["hidden"].detach().flip(0), backward="in_forward",
                                           validate=False, workspace_bytes=1).loss,
    }
    for name, call in calls.items():
        call().backward()   # compile and warm up first
        with count_host_reads() as reads:
            call().backward()
        assert sum(reads.values()) == (0 if name == "cross_entropy" else 1), (name, reads)


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


@pytest.mark.parametrize("workspace", WORKSPACES.values(), ids=WORKSPACES.keys())
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap"])
def test_token_metrics(softcap, workspace, device):
    # TRL DPOTrainer's entropy and mean_token_accuracy, from the blocks' first pass (pairs cut into
    # blocks of one row too): against the fp64 reference, and the accuracy against the default path's
    # to the last token (both take the first column of a tie, as torch.argmax).
    x = make_inputs(4, 23, 97, 1003, device=device, seed=29)
    y = {k: (v.detach().clone().requires_grad_() if v.dtype.is_floating_point else v) if v is not None else None
         for k, v in x.items()}
    ref_logps = -torch.arange(1.0, 5.0, device=device)
    kwargs = dict(ref_logps=ref_logps, softcap=softcap, temperature=0.7, loss_type="ipo",
                  **({} if workspace is None else {"workspace_bytes": workspace}))

    def dpo(m, x, token_metrics=True, **extra):
        return m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], token_metrics=token_metrics, **kwargs,
                          **extra)

    out = compare(lambda m, x: dpo(m, x, backward="in_forward"), x).check(torch.float32).fused
    default = dpo(fused_pref, y)
    assert {"entropy", "mean_token_accuracy"} <= out.metrics().keys()
    assert out.metrics()["mean_token_accuracy"] == default.metrics()["mean_token_accuracy"] > 0
    assert out.metrics()["entropy"] == pytest.approx(default.metrics()["entropy"], rel=1e-6)
    # Without token_metrics the blocks compute no statistics, and the output has none.
    assert "entropy" not in dpo(fused_pref, y, backward="in_forward", token_metrics=False).metrics()


def test_unvalidated_rows(device):
    # validate=False: no host sync, so every row is in a block; the ignored ones add nothing.
    x = make_inputs(4, 23, 97, 1003, device=device, seed=13)
    compare(lambda m, x: _simpo(m, x, validate=False), x).check(torch.float32)


def test_fp16(device):
    x = make_inputs(4, 23, 97, 1003, dtype=torch.float16, device=device, seed=19)
    compare(lambda m, x: _simpo(m, x, sft_weight=0.5), x).check(torch.float16)


def test_fp16_small_row_weights_under_a_loss_scale(device):
    # beta 1e-4: each token's weight ~2e-6, far below fp16's normal range (6.1e-5) as an operand's
    # factor (multiplied by it alone, d_weight's error went from 2.8e-4 to 3.8e-2); a loss scale of 1e6
    # brings the gradients back into range.
    x = make_inputs(4, 23, 97, 1003, dtype=torch.float16, device=device, seed=23)
    compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], beta=1e-4, gamma=0.0,
                                      backward="in_forward"), x, loss_scale=1e6).check(torch.float16)


@pytest.mark.parametrize("call, error", [
    (lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], ref_logps=torch.zeros(4), loss_type="aot",
                             backward="in_forward"),
     r"^backward='in_forward' does not run with loss_type='aot', which sorts over the whole batch .*"),
    (lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], ref_logps=torch.zeros(4), loss_type="aot_pair",
                             backward="in_forward"),
     r"^backward='in_forward' does not run with loss_type='aot_pair', .*: use backward='auto'$"),
    (lambda m, x: m.kto_loss(x["hidden"], x["weight"], x["labels"], desirable=torch.tensor([True, False] * 2),
                             ref_logps=torch.zeros(4), backward="in_forward"),
     r"^backward='in_forward' computes the gradients inside the forward, .* not this function; use backward='auto'$"),
], ids=["aot", "aot_pair", "kto"])
@pytest.mark.parametrize("module", [fused_pref, fused_pref.reference], ids=["fused", "reference"])
def test_refused(module, call, error):
    x = make_inputs(4, 9, 40, 257, seed=5)
    with pytest.raises(ValueError, match=error):
        call(module, x)
