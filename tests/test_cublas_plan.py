"""The "cublas" tile plan (``kernels/tiles.py``): cuBLAS computes every logit in fp32, the forward
reduces blocks of rows with ``cross_entropy_block`` and the backward's ``dz`` kernel reads each
chunk's logits.  Against the fp64 reference on the shared table, in several blocks and chunks,
strided, unvalidated, and with the token statistics (which run the statistics' plan)."""

import pytest
import torch

from fused_pref.kernels import linear_grad, linear_lse, products
from fused_pref.kernels.tiles import STATS_PLAN, tile_plan, tiles_for
from fused_pref.testing import CASES, compare, make_inputs, run_case

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", CASES)
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
    # A workspace of 5 rows of fp32 logits: the forward in blocks of 5 rows (fewer where a 16th of the
    # logits in bf16 is fewer), the backward in chunks of one 128-column tile (the smallest); no
    # logits kernel runs.
    def no_tiles(*args, **kwargs):
        raise AssertionError("the logits kernel ran")

    monkeypatch.setattr(linear_lse, "_forward_by_tiles", no_tiles)
    forward, backward = _counted(monkeypatch, linear_lse), _counted(monkeypatch, linear_grad)
    R, T, D, V = 4, 23, 97, 1003
    x = make_inputs(R, T, D, V, dtype=torch.bfloat16, device=device, seed=41)
    with tile_plan("cublas"):
        compare(lambda m, x: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], softcap=25.0,
                                                    workspace_bytes=5 * 4 * V, validate=validate), x).check(torch.bfloat16)
    rows = int((x["labels"] != -100).sum()) if validate else R * T
    block = min(5, -(-rows // 32))
    assert [n for n, _ in forward] == [block] * (rows // block) + ([rows % block] if rows % block else [])
    assert all(v == V for _, v in forward)
    # One fp32 product per chunk over every listed row, its columns summing to V.
    assert {n for n, _ in backward} == {rows} and sum(v for _, v in backward) == V and len(backward) == 8


def test_strided_inputs_run_it_and_token_statistics_run_theirs(device):
    x = make_inputs(4, 24, 97, 1003, device=device, seed=43)
    # cuBLAS reads any layout: a strided launch keeps the plan's configuration (other plans take
    # the default's tiles there).
    assert tiles_for(torch.float32, "cublas", aligned=False).cublas_logits
    with tile_plan("cublas"):
        compare(lambda m, x: m.simpo_loss(x["hidden"][:, :-1], x["weight"], x["labels"][:, :-1], x["bias"],
                                          sft_weight=0.3), x).check(torch.float32)
        x = make_inputs(4, 24, 97, 1003, device=device, seed=44)
        out = compare(lambda m, x: m.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"],
                                                     return_entropy=True).entropy, x)
    out.check(torch.float32)
    assert not tiles_for(torch.float32, STATS_PLAN).cublas_logits


def test_fp16(device):
    x = make_inputs(4, 23, 97, 1003, dtype=torch.float16, device=device, seed=47)
    with tile_plan("cublas"):
        compare(lambda m, x: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"],
                                        ref_hidden=x["hidden"].detach().flip(0), sft_weight=0.5), x).check(torch.float16)
