"""The tile plans (``kernels/tiles.py``): each plan's kernels against the fp64 reference, the forward's
vocabulary splits merged over several launches, the plan a forward ran kept by its backward, which
launches take which tiles, and the grouped program order."""

import pytest
import torch
import triton
import triton.language as tl

import fused_pref
from fused_pref import ops
from fused_pref.kernels import linear_lse, tiles
from fused_pref.kernels.tiles import DEFAULT_PLAN, PLANS, aligned_launch, grouped_tile, tile_plan, tiles_for
from fused_pref.testing import compare, make_inputs

# D a multiple of 16 and contiguous inputs: the aligned launches the wide plan's tiles run in.  10
# row tiles of the wide plan's 128 rows (two groups of 8, the second short), 5 vocabulary tiles
# (the last partial), and two 64-wide D steps (the second masked).
WIDE_SHAPE = (6, 211, 80, 517)


def _tiles_run(x, plan, softcap=None):
    return tiles.launch_tiles(plan, x["hidden"], x["weight"], x["bias"], softcap)


def _on_gpu(monkeypatch, arch):
    """Make the launchers see a GPU of compute capability ``arch``: the interpreter then runs the
    tiles that GPU would."""
    monkeypatch.setattr(tiles, "gpu_arch", lambda device: arch)


@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_plan_matches_the_reference(dtype, softcap, device):
    x = make_inputs(*WIDE_SHAPE, dtype=dtype, device=device, seed=5)
    # bf16 runs the wide tiles, soft-capped or not (SimPO's logit-sum metric then sums the one-tile
    # forward's logits); fp32 keeps the default's.
    assert (_tiles_run(x, "wide", softcap) != tiles_for(dtype)) == (dtype == torch.bfloat16)
    with tile_plan("wide"):
        compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], softcap=softcap,
                                          sft_weight=0.2), x).check(dtype)


def test_widest_plan_on_hopper_matches_the_reference(device, monkeypatch):
    _on_gpu(monkeypatch, 90)
    x = make_inputs(*WIDE_SHAPE, dtype=torch.bfloat16, device=device, seed=5)
    run = _tiles_run(x, "widest")
    # 128 x 256: three vocabulary tiles, the last partial (V 517).
    assert (run.block_n, run.block_v, run.vocab_tiles_per_program) == (128, 256, 1)
    with tile_plan("widest"):
        compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], sft_weight=0.2),
                x).check(torch.bfloat16)


def test_the_widest_tiles_run_on_hopper_only():
    for arch in (None, 80, 86, 89, 100, 120):
        assert tiles_for(torch.bfloat16, "widest", arch=arch) == tiles_for(torch.bfloat16, "wide")
    hopper = tiles_for(torch.bfloat16, "widest", arch=90)
    assert (hopper.block_n, hopper.block_v, hopper.vocab_tiles_per_program) == (128, 256, 1)
    assert tiles_for(torch.float32, "widest", arch=90) == tiles_for(torch.float32)
    assert tiles_for(torch.bfloat16, "widest", aligned=False, arch=90) == tiles_for(torch.bfloat16)
    # 128x256 spills under a softcap: a soft-capped launch runs the wide tiles there.
    assert tiles_for(torch.bfloat16, "widest", softcap=True, arch=90) == tiles_for(torch.bfloat16, "wide")


@pytest.mark.parametrize("plan, arch", [("wide", None), ("widest", 90), ("cublas", None)],
                         ids=["wide", "widest-hopper", "cublas"])
def test_labels_at_every_column_of_a_tile(plan, arch, device, monkeypatch):
    _on_gpu(monkeypatch, arch)
    # Labels at the edges of every tile (128 or 256 columns) and backward chunk (one tile each
    # here), and at the last real column of the padded last tile: where the forward gathers its
    # target and the backward rewrites its label column.
    R, T, D, V = 2, 40, 48, 517
    x = make_inputs(R, T, D, V, dtype=torch.bfloat16, device=device, seed=11)
    edges = [0, 1, 127, 128, 129, 255, 256, 257, 383, 384, 511, 512, 515, 516]
    labels = torch.tensor(edges * (R * T // len(edges) + 1), device=device)[: R * T].view(R, T)
    x["labels"] = torch.where(x["labels"] == -100, x["labels"], labels)
    with tile_plan(plan):
        compare(lambda m, x: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"],
                                                    workspace_bytes=4096), x).check(torch.bfloat16)


TILE_PLANS = [plan for plan in PLANS if not PLANS[plan][torch.bfloat16].cublas_logits]


@pytest.mark.parametrize("plan", TILE_PLANS)
def test_the_forward_in_several_launches_gives_the_same_bits(plan, device):
    # A workspace budget smaller than the partials of every row: the rows go through launch by
    # launch, and each row's splits merge in the same order, so nothing changes.
    x = make_inputs(*WIDE_SHAPE, dtype=torch.bfloat16, device=device, seed=7)
    args = (x["hidden"].detach(), x["weight"].detach(), x["labels"])
    with tile_plan(plan):
        whole = fused_pref.linear_logprobs(*args)
        tile = _tiles_run(x, plan)
        n_rows = int((x["labels"] != -100).sum())
        splits, _ = linear_lse.vocab_splits(n_rows, WIDE_SHAPE[3], x["hidden"].device, tile)
        budget = 4 * splits * tile.block_n   # one row tile's partials per launch
        assert linear_lse.rows_per_launch(n_rows, splits, 1, tile.block_n, budget) == tile.block_n < n_rows
        launched = fused_pref.linear_logprobs(*args, workspace_bytes=budget)
    assert torch.equal(whole, launched)


def test_the_backward_runs_the_plan_its_forward_ran(device, monkeypatch):
    # The plan is fixed when the call is made: a backward run after the `with` block has closed
    # still rounds its logits as the forward did.
    seen = []
    real = ops.linear_grad_backward

    def spy(*args, plan, **kwargs):
        seen.append(plan)
        return real(*args, plan=plan, **kwargs)

    monkeypatch.setattr(ops, "linear_grad_backward", spy)
    x = make_inputs(2, 7, 48, 257, device=device, seed=3)
    with tile_plan("wide"):
        loss = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"])
    assert tiles.active_plan() == DEFAULT_PLAN
    loss.backward()
    assert seen == ["wide"]


def test_which_launches_are_aligned():
    contiguous = torch.randn(3, 5, 32)
    assert aligned_launch(contiguous, torch.randn(7, 32), None)
    assert not aligned_launch(torch.randn(3, 5, 40), torch.randn(7, 40), None)     # rows of 40 elements
    assert not aligned_launch(contiguous.transpose(1, 2), torch.randn(7, 5), None)  # inner stride 5
    assert not aligned_launch(torch.randn(481).as_strided((3, 5, 32), (160, 32, 1), 1), torch.randn(7, 32), None)
    assert not aligned_launch(contiguous, torch.randn(7, 32), torch.randn(9)[1:8])   # a bias 4 bytes in
    # A strided launch takes the default plan's tiles, whatever the plan: only those compile without
    # spills there (tests/test_aot_compile.py); a soft-capped one keeps the wide tiles.
    for dtype in (torch.bfloat16, torch.float32):
        assert tiles_for(dtype, "wide", aligned=False) == tiles_for(dtype)
    assert tiles_for(torch.bfloat16, "wide") == tiles_for(torch.bfloat16, "wide", softcap=True) != tiles_for(torch.bfloat16)


def test_an_unknown_plan_is_refused():
    with pytest.raises(ValueError, match=r"^tile plan must be one of \('narrow', 'wide', 'widest', 'cublas'\), got 'tall'"):
        with tile_plan("tall"):
            pass
    assert tiles.active_plan() == DEFAULT_PLAN


@triton.jit
def _tile_order_kernel(out_ptr, n_row_tiles, n_vocab_tiles, n_group_rows):
    row_tile, vocab_tile = grouped_tile(n_row_tiles, n_vocab_tiles, n_group_rows)
    tl.store(out_ptr + row_tile * n_vocab_tiles + vocab_tile, tl.program_id(0))


@pytest.mark.parametrize("rows, vocab, group", [(10, 5, 8), (3, 7, 8), (8, 4, 8), (13, 1, 4), (5, 6, 5), (7, 3, 1)])
def test_grouped_order_visits_every_tile_once(rows, vocab, group):
    out = torch.full((rows, vocab), -1, dtype=torch.int32)
    _tile_order_kernel[(rows * vocab,)](out, rows, vocab, tiles.group_rows(tiles.TileConfig(group_rows=group), rows))
    assert sorted(out.flatten().tolist()) == list(range(rows * vocab))
    # The first group's row tiles take each vocabulary tile in turn.
    first = min(group, rows)
    assert out[:first, 0].tolist() == list(range(first))
    if vocab > 1:
        assert out[0, 1].item() == first


def test_a_group_of_every_row_tile_is_row_fastest_order():
    # The default plan's order: what its 2-D (rows, vocabulary) grid launched before.
    rows, vocab = 6, 4
    out = torch.full((rows, vocab), -1, dtype=torch.int32)
    _tile_order_kernel[(rows * vocab,)](out, rows, vocab, tiles.group_rows(tiles.TileConfig(), rows))
    assert out.tolist() == [[v * rows + r for v in range(vocab)] for r in range(rows)]
