"""pytest-benchmark microbenchmarks of the fused path (each tile plan) at real model heads,
bf16, forward and forward+backward.  Skipped without CUDA; not collected by the default ``pytest``
run (``testpaths = ["tests"]``).  Run on a GPU with

    pytest benchmarks/test_bench_gpu.py --benchmark-columns=median,iqr,rounds --benchmark-sort=name

Each benchmark also stores its peak memory (growth of ``torch.cuda.max_memory_allocated`` over the
inputs, gradients included) and the TFLOP/s achieved against the FLOP floor in ``extra_info``.
``python -m fused_pref bench`` puts the same numbers beside the reference and the peers.
"""

import pytest
import torch

from fused_pref.tools.workload import (FUSED_PLANS, LOSSES, MODELS, SEQUENCE_LENGTH, TOKENS_PER_STEP, floor_flops,
                                       library_implementations, make_batch, sequences_for)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU microbenchmarks need CUDA")

ROUNDS, WARMUP_ROUNDS = 10, 2


@pytest.fixture(autouse=True)
def _release_cached_memory():
    # The next case must not inherit this one's cached blocks (32k tokens x 256k vocab is large).
    yield
    torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("tokens", TOKENS_PER_STEP)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("plan", FUSED_PLANS)
def test_fused(benchmark, plan, loss, model, tokens, mode):
    head = MODELS[model]
    batch = make_batch(sequences_for(tokens), SEQUENCE_LENGTH, head.hidden, head.vocab, device="cuda",
                       reference_model=loss == "dpo")
    fn = library_implementations(loss, head.softcap)[f"fused-{plan}"]   # as bench runs it

    def clear_grads():
        for t in batch.grads:
            t.grad = None

    def step():
        out = fn(*batch.inputs())
        if mode == "fwd+bwd":
            out.backward()
        torch.cuda.synchronize()  # pytest-benchmark reads a host clock

    step()  # compile and warm up outside the peak-memory figure
    clear_grads()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    benchmark.extra_info["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    benchmark.pedantic(step, setup=clear_grads, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    if benchmark.stats is not None:  # None under --benchmark-disable
        flops = floor_flops(loss, batch.valid_tokens, head.hidden, head.vocab, backward=mode == "fwd+bwd")
        benchmark.extra_info["tflops_vs_floor"] = flops / benchmark.stats.stats.median / 1e12
