"""``python -m fused_pref bench`` on a GPU: time and peak CUDA memory of every implementation, side
by side, at the heads of real models (``workload.MODELS``), bf16.

For each case (model, tokens per step, loss, prompt fraction), implementation and mode (forward;
forward+backward) the inputs are made afresh, random (never zeros) and identical across
implementations; a first call outside every figure compiles and autotunes; peak memory is the growth of
``torch.cuda.max_memory_allocated`` over the inputs during one call (gradients included, since a
training step allocates them); time is the median of ``triton.testing.do_bench``; and, unless
``--no-profile``, once a case's timings are done, one more call of each implementation under torch's
profiler splits its GPU time by kernel (``kernel_times``: which part of a path is slow, not only how
slow; after the timings, so that no profiler state can weigh on them).  The results file is rewritten
after every case, so a run cut short keeps what it measured.
"""

import datetime
import gc
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fused_pref import __version__
from .kernel_times import kernel_times
from .peers import implementations
from .results import format_breakdown, format_table, plot, ratios, results_path, write_results
from .workload import MODELS, SEQUENCE_LENGTH, floor_flops, make_batch, sequences_for

MODES = ("fwd", "fwd+bwd")
# How the fused path is called (``workload.library_implementations``), as every results file records it.
FUSED_CALLS = "validated (validate=True, the default): products over the valid tokens"
DEVICE = "cuda"
# do_bench's budgets: warm-up and timed repetitions, in milliseconds of GPU time per figure.
WARMUP_MS, REP_MS = 100, 500


@dataclass(frozen=True)
class Case:
    model: str
    tokens: int
    loss: str
    prompt_fraction: float


def cases(models, tokens, losses, prompt_fractions) -> list[Case]:
    return [Case(m, t, loss, f) for m in models for t in tokens for loss in losses for f in prompt_fractions]


def environment() -> dict:
    """What every results file names: the GPU, its driver, CUDA, torch, triton and this package."""
    import triton

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    return {"gpu": torch.cuda.get_device_name(), "driver": driver, "cuda": torch.version.cuda,
            "torch": torch.__version__, "triton": triton.__version__, "fused_pref": __version__}


def _clear_grads(batch):
    for t in batch.grads:
        t.grad = None


def _step(fn, batch, mode: str):
    def step():
        loss = fn(*batch.inputs())
        if mode == "fwd+bwd":
            loss.backward()
    return step


def measure(fn, batch, mode: str) -> dict:
    """``ms`` (median) and ``peak_gb`` of ``fn(*batch.inputs())``, with ``.backward()`` for "fwd+bwd"."""
    from triton.testing import do_bench

    step = _step(fn, batch, mode)
    step()
    _clear_grads(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    _clear_grads(batch)
    ms = do_bench(step, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=batch.grads, return_mode="median")
    return {"ms": ms, "peak_gb": peak / 1e9}


def profile_kernels(fn, batch, mode: str) -> dict:
    """``kernels_ms``: one call's GPU time per kernel family (``kernel_times``, after a warm call), or
    ``kernels_error`` where the profiler failed."""
    step = _step(fn, batch, mode)
    step()
    _clear_grads(batch)
    try:
        return {"kernels_ms": kernel_times(step)}
    except Exception as error:  # CUPTI unavailable, say: the row's timing still stands
        return {"kernels_error": f"{type(error).__name__}: {error}"[:300]}


def _progress(items):
    try:
        from tqdm import tqdm
    except ImportError:
        for i, item in enumerate(items):
            print(f"[{i + 1}/{len(items)}] {item}", file=sys.stderr, flush=True)
            yield item
        return
    yield from tqdm(items, unit="case")


def run_case(case: Case, names=None, *, seed=0, profile=True) -> tuple[list[dict], list[str]]:
    """Rows (one per implementation and mode) and notes (skipped peers) for one case; ``profile``:
    then the kernel split of every measured implementation but the plain-PyTorch reference
    (``profile_kernels``)."""
    head = MODELS[case.model]
    R = sequences_for(case.tokens)
    funcs, notes = implementations(case.loss, head.softcap, names)

    def fresh_batch():
        return make_batch(R, SEQUENCE_LENGTH, head.hidden, head.vocab, dtype=torch.bfloat16, device=DEVICE,
                          seed=seed, reference_model=case.loss == "dpo", prompt_fraction=case.prompt_fraction)

    def release(batch):
        del batch
        gc.collect()
        torch.cuda.empty_cache()

    rows = []
    for name, fn in funcs.items():
        for mode in MODES:
            batch = fresh_batch()
            row = {"model": case.model, "tokens": case.tokens, "prompt_fraction": case.prompt_fraction,
                   "valid_tokens": batch.valid_tokens, "loss": case.loss, "D": head.hidden, "V": head.vocab,
                   "softcap": head.softcap, "impl": name, "mode": mode}
            try:
                row.update(measure(fn, batch, mode))
                flops = floor_flops(case.loss, batch.valid_tokens, head.hidden, head.vocab,
                                    backward=mode == "fwd+bwd")
                row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as error:  # a peer's API drift must not end the run: record it, go on
                row["error"] = f"{type(error).__name__}: {error}"[:300]
                print(f"{name} {mode} {case}: {row['error']}", file=sys.stderr, flush=True)
            rows.append(row)
            release(batch)
    if profile:
        for row in rows:
            if "ms" in row and row["impl"] != "reference":
                batch = fresh_batch()
                row.update(profile_kernels(funcs[row["impl"]], batch, row["mode"]))
                release(batch)
    return rows, notes


def run(selected: list[Case], out_dir: Path, names=None, *, make_plot=True, profile=True) -> Path:
    """Measure every case, write ``out_dir/<gpu>-<date>.json`` (and a PNG), print the table and
    (``profile``) where each implementation's GPU time went."""
    now = datetime.datetime.now()
    results = {**environment(), "date": now.strftime("%Y-%m-%d"), "created": now.isoformat(timespec="seconds"),
               "dtype": "bfloat16", "sequence_length": SEQUENCE_LENGTH,
               "timing": f"triton.testing.do_bench median, warmup {WARMUP_MS} ms, rep {REP_MS} ms",
               "memory": "torch.cuda.max_memory_allocated growth over the inputs, gradients included",
               "fused_calls": FUSED_CALLS,
               "notes": [], "rows": [], "ratios": []}
    path = results_path(out_dir, results["gpu"], results["date"])
    for case in _progress(selected):
        rows, notes = run_case(case, names, profile=profile)
        results["rows"] += rows
        results["notes"] += [n for n in notes if n not in results["notes"]]
        results["ratios"] = ratios(results["rows"])
        write_results(path, results)
    print(format_table(results))
    if profile:
        print(format_breakdown(results))
    for note in results["notes"]:
        print("note:", note)
    print("wrote", path)
    if make_plot:
        print(plot(results, path.with_suffix(".png")))
    return path
