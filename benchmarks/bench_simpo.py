"""Time the fused and the reference SimPO forward+backward on one GPU and record peak memory.

    python benchmarks/bench_simpo.py [--tokens 16384] [--hidden 4096] [--vocab 128256] [--out results/]

bf16, Llama-3-8B's head by default.  Skips (exit 0, with a note) without CUDA.  Writes a JSON
file naming the GPU, driver, torch and triton versions.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch


def _versions():
    import triton

    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    return {"gpu": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__}


def _inputs(tokens, D, V, T=1024, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    R = max(2, tokens // T // 2 * 2)
    hidden = (torch.randn(R, tokens // R, D, device="cuda", generator=gen) / math.sqrt(D)).bfloat16()
    weight = torch.randn(V, D, device="cuda", generator=gen).bfloat16()  # logits ~ N(0, 1)
    labels = torch.randint(0, V, (R, tokens // R), device="cuda", generator=gen)
    labels[:, : tokens // R // 4] = -100  # a prompt quarter, as in a preference batch
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _measure(fn, hidden, weight, labels):
    from triton.testing import do_bench

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).loss.backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(step, warmup=200, rep=1000, return_mode="median")
    return {"ms": ms, "peak_extra_gb": peak / 1e9}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmarks skipped (see `python -m fused_pref kernels` for the CPU part)")
        return 0
    import fused_pref

    hidden, weight, labels = _inputs(args.tokens, args.hidden, args.vocab)
    valid = int((labels != -100).sum())
    flops = 8 * valid * args.hidden * args.vocab  # DESIGN.md section 4: the fused floor
    rows = {}
    for name, module in (("fused", fused_pref), ("reference", fused_pref.reference)):
        try:
            rows[name] = _measure(module.simpo_loss, hidden, weight, labels)
            rows[name]["tflops_vs_8NDV"] = flops / rows[name]["ms"] / 1e9
        except torch.OutOfMemoryError as error:
            rows[name] = {"error": f"out of memory: {error}"}
        torch.cuda.empty_cache()
        print(name, rows[name], flush=True)
    result = {**_versions(), "shape": {"tokens": args.tokens, "valid_tokens": valid, "D": args.hidden,
                                       "V": args.vocab, "dtype": "bfloat16"}, "simpo_fwd_bwd": rows,
              "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = result["gpu"].replace(" ", "-")
    path = args.out / f"{gpu}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
