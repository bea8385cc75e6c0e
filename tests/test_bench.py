"""``python -m fused_pref bench`` without a GPU: the plain message and the CPU part; the run loop,
results file and table (GPU figures faked); the peers' notes and parity; the GPU microbenchmarks
and protocol scripts failing early and cleanly.  (Results files themselves: ``test_publish.py``.)"""

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import fused_pref
from fused_pref.tools import benchmark
from fused_pref.tools.kernel_times import COPIES, GEMM, INDUCTOR, TORCH_KERNELS, by_family, kernel_family, kernel_times
from fused_pref.tools.peers import implementations
from fused_pref.testing import kernel_device
from fused_pref.testing import TOLERANCE, relative_error
from fused_pref.tools.workload import FUSED_PLANS, LOSSES, MODELS, HeadShape, library_implementations, make_batch

REPO = Path(__file__).resolve().parents[1]


def _cpu_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@pytest.mark.cpu_interpreter  # hides CUDA; the accounting runs through the interpreter
def test_bench_without_cuda_says_so_and_runs_the_memory_accounting(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fused_pref", "bench", "--loss", "simpo", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=_cpu_env())
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("No CUDA device on this machine: the GPU benchmark"), done.stdout
    row = next(line for line in lines if line.startswith("llama3-8b"))
    assert row.split()[:3] == ["llama3-8b", "16384", "simpo"], row
    assert "simpo: fused-vchunk" in done.stdout and "simpo: reference" in done.stdout
    assert list(tmp_path.iterdir()) == [], "no results file without a GPU"
    assert lines[1].endswith("extrapolated to each full shape.") and lines[2] == "Ignored here, as they shape the " \
        "GPU run: --out.", done.stdout


def test_run_writes_results_ratios_and_table(tmp_path, monkeypatch, capsys):
    # The GPU figures are faked; everything around them runs: implementations, fresh batches
    # (on the kernels' device), rows, notes, ratios, the file and the table.
    monkeypatch.setitem(MODELS, "tiny", HeadShape("Tiny", hidden=40, vocab=257))
    monkeypatch.setattr(benchmark, "SEQUENCE_LENGTH", 8)
    monkeypatch.setattr(benchmark, "sequences_for", lambda tokens: 2)
    monkeypatch.setattr(benchmark, "DEVICE", kernel_device())
    monkeypatch.setattr(benchmark, "environment", lambda: {"gpu": "Fake GPU 1", "driver": "1", "cuda": "12",
                                                           "torch": "t", "triton": "tr", "fused_pref": "0"})
    fake = {"fused-vchunk": (10.0, 1.0), "reference": (30.0, 8.0)}

    def measure(fn, batch, mode):
        name = [k for k, f in funcs.items() if f is fn][0]
        ignored = int((batch.labels == -100).sum())
        assert ignored == {0.25: 2 * 2, 0.5: 2 * 4}[batch.prompt_fraction]  # of 2 sequences of 8 tokens
        loss = fn(*batch.inputs())
        assert torch.isfinite(loss)
        if mode == "fwd+bwd":
            loss.backward()
            assert all(t.grad is not None for t in batch.grads)
        ms, gb = fake[name]
        return {"ms": ms, "peak_gb": gb}

    def profile_kernels(fn, batch, mode):
        profiled.add(([k for k, f in funcs.items() if f is fn][0], mode))
        return {"kernels_ms": {"linear_lse_kernel": 6.0, GEMM: 3.0}}

    funcs, profiled = {}, set()
    real_implementations = benchmark.implementations

    def recording_implementations(*args, **kwargs):
        found, notes = real_implementations(*args, **kwargs)
        funcs.update(found)
        return found, notes

    monkeypatch.setattr(benchmark, "measure", measure)
    monkeypatch.setattr(benchmark, "profile_kernels", profile_kernels)
    monkeypatch.setattr(benchmark, "implementations", recording_implementations)
    path = benchmark.run(benchmark.cases(["tiny"], [16], ["simpo", "dpo"], [0.25, 0.5]), tmp_path,
                         ["fused-vchunk", "reference", "cce"], make_plot=False)

    assert path.name.startswith("Fake-GPU-1-") and path.suffix == ".json"
    results = json.loads(path.read_text())
    assert len(results["rows"]) == 2 * 2 * 2 * 2  # losses x prompt fractions x implementations x modes
    assert {r["impl"] for r in results["rows"]} == {"fused-vchunk", "reference"}
    assert results["fused_calls"] == benchmark.FUSED_CALLS   # how the fused path was called, recorded
    # 2 sequences of 8 tokens: 6 valid each after a quarter of prompt, 4 after half.
    assert {(r["prompt_fraction"], r["valid_tokens"]) for r in results["rows"]} == {(0.25, 12), (0.5, 8)}
    assert all(r["tflops"] > 0 for r in results["rows"])
    assert {(r["peer"], r["speed"], r["memory"]) for r in results["ratios"]} == {("reference", 3.0, 8.0)}
    assert sorted(r["prompt_fraction"] for r in results["ratios"]) == [0.25] * 4 + [0.5] * 4
    assert "cce skipped for simpo: Cut Cross-Entropy has no preference losses" in results["notes"]
    table = capsys.readouterr().out
    assert "Fake GPU 1" in table and "   3.00     8.0" in table
    # The kernel split: every implementation but the reference, each mode, printed after the table.
    assert profiled == {("fused-vchunk", "fwd"), ("fused-vchunk", "fwd+bwd")}
    assert sum("kernels_ms" in r for r in results["rows"]) == 8
    breakdown = table[table.index("GPU time of one profiled call"):table.index("note:")].splitlines()
    split = "fused-vchunk       linear_lse_kernel 6.0, cuBLAS products 3.0"
    assert len(breakdown) == 1 + 8 and all(line.endswith(split) for line in breakdown[1:]), breakdown


def test_bench_runs_the_fused_calls_validated_and_the_accounting_not(device):
    # Validated, as a user's default call: the backward's products then cover the valid tokens only.
    # A label outside the vocabulary is what only validation sees.
    batch = make_batch(2, 8, 16, 50, dtype=torch.float32, device=device, seed=0)
    batch.labels[0, -1] = 50
    timed, _ = implementations("simpo", None, [f"fused-{name}" for name in FUSED_PLANS] + ["fused-inforward"])
    assert len(timed) == len(FUSED_PLANS) + 1
    for name, fn in timed.items():
        with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
            fn(*batch.inputs())
    accounted = {name: fn for name, fn in library_implementations("simpo", validate=False).items()
                 if name.startswith("fused-")}
    for name, fn in accounted.items():
        fn(*batch.inputs())   # no host read: the label goes unchecked


def test_a_profiler_that_sees_nothing_leaves_the_row_its_timing(monkeypatch, device):
    def sees_nothing(step):
        step()
        raise RuntimeError("the profiler recorded no GPU kernel (is CUPTI available?)")

    monkeypatch.setattr(benchmark, "kernel_times", sees_nothing)
    batch = make_batch(2, 8, 16, 50, dtype=torch.float32, device=device)
    fn = library_implementations("simpo")["fused-vchunk"]
    assert benchmark.profile_kernels(fn, batch, "fwd+bwd") == {
        "kernels_error": "RuntimeError: the profiler recorded no GPU kernel (is CUPTI available?)"}


def test_kernel_families_name_triton_kernels_and_group_the_rest():
    assert kernel_family("linear_lse_kernel") == "linear_lse_kernel"
    assert kernel_family("_cce_backward_kernel") == "_cce_backward_kernel"
    gemms = ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off"
             "_kernel__5x_cublas",
             "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_32x3_tn_align8>"
             "(cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_32x3_tn_align8::Params)",
             "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn")
    assert {kernel_family(name) for name in gemms} == {GEMM}
    assert kernel_family("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                         "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)") \
        == TORCH_KERNELS
    assert kernel_family("Memset (Device)") == kernel_family("Memcpy DtoD (Device -> Device)") == COPIES
    assert kernel_family("triton_red_fused_sum_0") == INDUCTOR
    times = by_family([("linear_grad_kernel", 1500.0), (gemms[0], 1000.0), (gemms[1], 2500.0),
                       ("Memset (Device)", 10.0)])
    assert list(times.items()) == [(GEMM, 3.5), ("linear_grad_kernel", 1.5), (COPIES, 0.01)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the profiler sees GPU kernels on CUDA only")
def test_kernel_times_split_a_fused_step_on_the_gpu(device):
    funcs, _ = implementations("simpo", None, ["fused-vchunk"])
    batch = make_batch(4, 256, 512, 1003, dtype=torch.bfloat16, device=device, seed=0)

    def step():
        funcs["fused-vchunk"](*batch.inputs()).backward()

    step()
    times = kernel_times(step)
    # The narrow plan's forward and dz kernels, and the backward's two cuBLAS products.
    assert times["linear_lse_kernel"] > 0 and times["linear_grad_kernel"] > 0 and times[GEMM] > 0, times
    assert list(times.values()) == sorted(times.values(), reverse=True)


def test_bench_takes_prompt_fractions_by_name_or_number(monkeypatch):
    # The options reach the cases; the GPU run itself is replaced.
    from fused_pref.tools import cli

    ran = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "_reexec_with_interpreter", lambda wanted, argv: None)
    monkeypatch.setattr(benchmark, "run", lambda selected, *args, **kwargs: ran.append(selected))
    assert cli.main(["bench", "--loss", "simpo", "--prompt-fraction", "half", "--prompt-fraction", "0.1"]) == 0
    assert cli.main(["bench", "--loss", "simpo"]) == 0
    assert [[c.prompt_fraction for c in selected] for selected in ran] == [[0.5, 0.1], [0.25]]
    for wrong in ("third", "1", "-0.5"):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--prompt-fraction", wrong])


def test_missing_or_inapplicable_peers_are_skipped_with_a_note():
    funcs, notes = implementations("simpo", softcap=30.0, names=["fused-vchunk", "liger", "cce"])
    assert list(funcs) == ["fused-vchunk"]
    assert any(n.startswith("liger skipped for simpo: ") for n in notes), notes
    assert "cce skipped for simpo: Cut Cross-Entropy has no preference losses" in notes
    with pytest.raises(ValueError, match="unknown implementations \\['ligr'\\]"):
        implementations("simpo", names=["ligr"])


def test_trl_chunked_without_trl_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)  # what an import of a missing module meets
    funcs, notes = implementations("dpo", names=["trl-chunked"])
    assert funcs == {} and len(notes) == 1, notes
    assert notes[0].startswith("trl-chunked skipped for dpo: TRL's chunked LM head not found"), notes


def test_gpu_microbenchmarks_skip_cleanly_without_cuda():
    # The pytest script, not `python -m pytest`, which would put the repository root on sys.path.
    pytest_script = Path(sys.executable).with_name("pytest")
    done = subprocess.run([str(pytest_script), "benchmarks/test_bench_gpu.py", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=_cpu_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skipped" in done.stdout and "passed" not in done.stdout and "error" not in done.stdout.lower()


@pytest.mark.parametrize("loss", LOSSES)
def test_peers_compute_the_same_loss_and_gradients_as_ours(loss, device):
    # The benchmark must time the same work: each installed peer's loss and gradients equal the fused
    # path's on one batch.
    peers = ["reference-compile", "liger", "trl-chunked"]
    funcs, notes = implementations(loss, None, ["fused-vchunk", "fused-wide", "fused-cublas", "fused-inforward",
                                                *peers])
    for optional in ("liger", "trl-chunked"):
        if optional not in funcs:
            assert any(n.startswith(f"{optional} skipped") for n in notes), notes
    assert "fused-inforward" in funcs   # every loss bench times has the gradient-in-forward mode
    results = {}
    for name, fn in funcs.items():
        batch = make_batch(4, 16, 64, 300, dtype=torch.float32, device=device, seed=1, reference_model=loss == "dpo")
        value = fn(*batch.inputs())
        value.backward()
        results[name] = [value.detach(), *(t.grad for t in batch.grads)]
    assert {"reference-compile", "fused-wide", "fused-cublas"} <= set(results)
    for name, got in results.items():
        for what, a, b in zip(("loss", "d_hidden", "d_weight"), got, results["fused-vchunk"], strict=True):
            assert relative_error(a, b) < 1e-5, (name, what, relative_error(a, b))


@pytest.mark.parametrize("loss", ["cross_entropy", "dpo"])  # SimPO's difference of means hardly feels a softcap
def test_trl_chunked_head_applies_the_softcap_as_the_reference(loss, device):
    # TRL's head reads Gemma-2's softcap from the model config; without it these losses move by 2e-4
    # or more at these logits.
    pytest.importorskip("trl")
    funcs, notes = implementations(loss, 30.0, ["reference", "trl-chunked"])
    assert list(funcs) == ["reference", "trl-chunked"], notes
    results = {}
    for name, fn in funcs.items():
        batch = make_batch(4, 16, 64, 300, dtype=torch.float32, device=device, seed=2, reference_model=loss == "dpo")
        value = fn(*batch.inputs())
        value.backward()
        results[name] = [value.detach(), *(t.grad for t in batch.grads)]
    for what, a, b in zip(("loss", "d_hidden", "d_weight"), results["trl-chunked"], results["reference"], strict=True):
        assert relative_error(a, b) < 1e-5, (what, relative_error(a, b))


def test_trl_chunked_keeps_no_batch_alive(device):
    # bench frees each batch before it makes the next one and measures memory above it.
    pytest.importorskip("trl")
    funcs, notes = implementations("dpo", names=["trl-chunked"])
    assert list(funcs) == ["trl-chunked"], notes
    batch = make_batch(4, 16, 64, 300, dtype=torch.float32, device=device, reference_model=True)
    funcs["trl-chunked"](*batch.inputs()).backward()
    alive = [weakref.ref(t) for t in (batch.hidden, batch.weight, batch.ref_hidden, batch.ref_weight)]
    del batch
    gc.collect()
    assert [ref() is None for ref in alive] == [True] * 4


def test_cut_cross_entropy_computes_the_same_loss_and_gradients(device):
    # Its kernels need a GPU (not the interpreter) and its backward bf16 or fp16 inputs; against the
    # fp64 reference at the bf16 tolerance, as our own bf16 path is checked.
    if device != "cuda":
        pytest.skip("Cut Cross-Entropy runs on CUDA only")
    pytest.importorskip("cut_cross_entropy")
    funcs, notes = implementations("cross_entropy", None, ["cce"])
    assert list(funcs) == ["cce"], notes
    batch = make_batch(4, 16, 64, 300, dtype=torch.bfloat16, device=device, seed=1)
    value = funcs["cce"](*batch.inputs())
    value.backward()
    hidden, weight = (t.detach().cpu().double().requires_grad_() for t in (batch.hidden, batch.weight))
    expected = fused_pref.reference.linear_cross_entropy(hidden, weight, batch.labels.cpu())
    expected.backward()
    for what, a, b in zip(("loss", "d_hidden", "d_weight"), [value, *(t.grad for t in batch.grads)],
                          [expected, hidden.grad, weight.grad], strict=True):
        assert relative_error(a, b) < TOLERANCE[torch.bfloat16], (what, relative_error(a, b))


@pytest.mark.parametrize("script", ["gpu_check.sh", "peer_wheels.sh"])
def test_gpu_protocol_scripts_parse_and_ask_for_their_folder(script):
    # They run where a mistake costs lent GPU time: at least the syntax and the usage line hold.
    path = REPO / "benchmarks" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    done = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(f"usage: {path}"), done.stderr
