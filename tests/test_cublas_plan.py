"""The "cublas" tile plan (``kernels/tiles.py``): cuBLAS computes every logit in fp32, the forward
reduces blocks of rows with ``cross_entropy_block`` and the backward's ``dz`` kernel reads each
chunk's logits.  Against the fp64 reference on the shared table (one DPO loss type), in several blocks and chunks,
strided, unvalidated, and with the token statistics and cross-entropy's extra terms (per-row weights in the
backward), which this plan carries too."""

import pytest
import torch

from fused_pref.kernels import linear_grad, linear_lse, products
from fused_pref.kernels.tiles import tile_plan, tiles_for
from fused_pref.testing import CASES, compare, make_inputs, relative_error, run_case

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The shared table but one DPO loss type: the others differ only in the per-pair head, which no plan
# touches (tests/test_parity.py runs each in the default plan).
LOGITS_CASES = [name for name in CASES if not name.startswith("dpo_loss[") or name == "dpo_loss[sigmoid]"]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", LOGITS_CASES)
def test_every_case_matches_the_reference(name, dtype, device):
    with tile_plan("cublas"):
        run_case(CASES[name], dtype, device, seed=list(CASES).index(name)).check(dtype)


def _counted(monkeypatch, module):
    calls = []

    def counting(h, w):
        calls.append((h.shape[0], w.shape[0]))
        return products.fp32_logits(h, w)

    monkeypatch.setattr(module, "fp32_logits", counting)
    return calls


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "unvalidated"])
def test_blocks_and_chunks_of_cublas_products(validate, device, monkeypatch):
    # A workspace of 3 rows of fp32 logits: the forward in blocks of 3 rows, the backward in chunks
    # of one 128-column tile (the smallest); no logits kernel runs.  SimPO under a softcap: the block
    # kernel sums the logits too (the logits/* metrics).
    def no_tiles(*args, **kwargs):
        raise AssertionError("the logits kernel ran")

    monkeypatch.setattr(linear_lse, "_forward_by_tiles", no_tiles)
    forward, backward = _counted(monkeypatch, linear_lse), _counted(monkeypatch, linear_grad)
    R, T, D, V = 8, 41, 97, 1003
    x = make_inputs(R, T, D, V, dtype=torch.bfloat16, device=device, seed=41)
    with tile_plan("cublas"):
        compare(lambda m, x: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], softcap=25.0,
                                          workspace_bytes=3 * 4 * V, validate=validate), x).check(torch.bfloat16)
    rows = int((x["labels"] != -100).sum()) if validate else R * T
    # The workspace bounds the blocks, not the 16th of the logits' bytes (ceil(rows / 32) rows here).
    assert -(-rows // 32) > 3
    assert [n for n, _ in forward] == [3] * (rows // 3) + ([rows % 3] if rows % 3 else [])
    assert all(v == V for _, v in forward)
    # One fp32 product per chunk over every listed row, its columns summing to V.
    assert {n for n, _ in backward} == {rows} and sum(v for _, v in backward) == V and len(backward) == 8


@pytest.mark.parametrize("n_rows, V", [(4096, 128256), (16384, 128256), (12288, 32768), (16384, 256000)])
def test_a_chunk_holds_at_most_a_16th_of_the_logits(n_rows, V):
    # dz in bf16 and, in this plan, fp32 logits beside it: a third as many columns, the same bytes.
    for logits_bytes in (0, 4):
        columns = linear_grad.vocab_chunk_size(n_rows, V, 2, 128, logits_bytes=logits_bytes)
        assert columns % 128 == 0 and n_rows * columns * (2 + logits_bytes) <= n_rows * V * 2 / 16


def test_labels_outside_the_vocabulary_match_no_column(device):
    # A vocabulary shard's labels (relative to its first row) and unvalidated ones: outside [0, V)
    # they match no column, so the target is 0 and no label column is rewritten, as in the tiles.
    V = 257
    x = make_inputs(2, 9, 48, V, device=device, seed=53)
    hidden, weight, bias = x["hidden"].detach(), x["weight"].detach(), x["bias"].detach()
    labels = torch.tensor([-300, -1, 0, 5, 256, 257, 400, 3] * 2 + [100, -5], device=device)
    rows = torch.arange(18, dtype=torch.int32, device=device)
    n_valid = torch.tensor([18], dtype=torch.int32, device=device)
    grad_logp = torch.randn(18, generator=torch.Generator().manual_seed(3)).to(device)
    results = {}
    for plan in ("narrow", "cublas"):
        lse, target, *_ = linear_lse.linear_lse_forward(hidden, weight, bias, labels, rows, n_valid, plan=plan)
        grads = linear_grad.linear_grad_backward(grad_logp, hidden, weight, bias, labels, rows, n_valid, lse, target,
                                                 plan=plan)
        results[plan] = (lse, target, *grads)
    outside = (labels < 0) | (labels >= V)
    assert outside.sum() == 9 and (results["cublas"][1][outside] == 0).all()
    for ours, tiles in zip(results["cublas"], results["narrow"]):
        # fp32 both ways, the products summed in different orders.
        assert relative_error(ours, tiles) < 1e-6


def test_strided_inputs_run_it(device):
    x = make_inputs(4, 24, 97, 1003, device=device, seed=43)
    # cuBLAS reads any layout: a strided launch keeps the plan's configuration (other plans take
    # the default's tiles there).
    assert tiles_for(torch.float32, "cublas", aligned=False).cublas_logits
    with tile_plan("cublas"):
        compare(lambda m, x: m.simpo_loss(x["hidden"][:, :-1], x["weight"], x["labels"][:, :-1], x["bias"],
                                          sft_weight=0.3), x).check(torch.float32)


def _no_tiles(monkeypatch):
    """Fail on any launch of the logits-tile kernels: the plan's forward and backward read cuBLAS's logits."""
    def no_tiles(*args, **kwargs):
        raise AssertionError("the logits kernel ran")

    monkeypatch.setattr(linear_lse, "_forward_by_tiles", no_tiles)
    real_chunk = linear_grad.linear_grad_chunk

    def chunk_with_logits(*args, logits=None, **kwargs):
        assert logits is not None, "the dz kernel computed its logits"
        return real_chunk(*args, logits=logits, **kwargs)

    monkeypatch.setattr(linear_grad, "linear_grad_chunk", chunk_with_logits)


STATISTICS = {"ALL": dict(return_entropy=True, return_token_accuracy=True, return_argmax=True)}


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "unvalidated"])
@pytest.mark.parametrize("options", [{}, {"softcap": 20.0, "temperature": 0.7}], ids=["plain", "softcap-T"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_token_statistics_and_the_entropys_gradient(dtype, options, validate, device, monkeypatch):
    # The statistics come from the block kernel's first pass, in blocks of at most 5 rows here, and
    # the entropy's gradient from per-row weights beside the stored logits: the log-probs and the
    # entropy (both weighted into the backward) against the fp64 reference, the argmax and accuracy exactly.
    _no_tiles(monkeypatch)
    forward = _counted(monkeypatch, linear_lse)
    x = make_inputs(4, 23, 97, 1003, dtype=dtype, device=device, seed=83)
    kwargs = dict(workspace_bytes=5 * 4 * 1003, validate=validate, **options, **STATISTICS["ALL"])
    with tile_plan("cublas"):
        comparison = compare(lambda m, x: m.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], **kwargs),
                             x).check(dtype)
    assert len(forward) > 10 and max(n for n, _ in forward) <= 5
    assert {"entropy", "d_hidden"} <= comparison.errors.keys()
    assert comparison.fused.token_accuracy.any() and not comparison.fused.token_accuracy.all()


@pytest.mark.parametrize("accuracy", [False, True], ids=["alone", "with-accuracy"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cross_entropys_extra_terms(dtype, accuracy, device, monkeypatch):
    # Label smoothing (class-weighted) and the z-loss: per-row weights in the backward, the logit sum
    # from the column sums, the lse differentiable; alone and with the accuracy from the same forward.
    _no_tiles(monkeypatch)
    x = make_inputs(3, 13, 67, 487, dtype=dtype, device=device, seed=89)
    classes = torch.rand(487, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def loss(m, x):
        out = m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], label_smoothing=0.2,
                                     lse_square_scale=1e-2, return_z_loss=True, return_token_accuracy=accuracy,
                                     ce_weight=classes.to(x["hidden"].device, x["hidden"].dtype), reduction="none")
        return out.loss + out.z_loss

    with tile_plan("cublas"):
        compare(loss, x).check(dtype)


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_the_reference_model_reuses_the_policys_rows(loss, device, monkeypatch):
    # Validated, the policy's rows are the valid ones: the reference model's pass covers those
    # only, where unvalidated rows of its own would span every token.
    forward = _counted(monkeypatch, linear_lse)
    x = make_inputs(4, 23, 97, 1003, dtype=torch.bfloat16, device=device, seed=59)
    x["ref_hidden"] = x["hidden"].detach().flip(0) * 1.5
    kto = {"desirable": torch.tensor([True, False, False, True]), "kl": 0.2} if loss == "kto" else {}

    def call(m, x):
        out = getattr(m, f"{loss}_loss")(x["hidden"], x["weight"], x["labels"], x["bias"], ref_hidden=x["ref_hidden"],
                                         **{k: v.to(x["labels"].device) if k == "desirable" else v
                                            for k, v in kto.items()})
        return out.loss if loss == "kto" else out   # compare knows a PreferenceOutput's fields

    with tile_plan("cublas"):
        compare(call, x).check(torch.bfloat16)
    assert sum(n for n, _ in forward) == 2 * int((x["labels"] != -100).sum())


def test_fp16(device):
    x = make_inputs(4, 23, 97, 1003, dtype=torch.float16, device=device, seed=47)
    with tile_plan("cublas"):
        compare(lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"],
                                        ref_hidden=x["hidden"].detach().flip(0), sft_weight=0.5), x).check(torch.float16)
