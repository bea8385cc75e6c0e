"""The command line, ``python -m fused_pref check | kernels | demo | memory | bench``.

``check``   fused vs reference errors for every public function (the real Triton kernels: through
            the interpreter when there is no GPU).
``kernels`` compiles every kernel ahead of time for sm_80 and sm_90 and prints registers, spills and
            shared memory; exits non-zero on any spill or shared memory over the GPU's limit.
``demo``    trains a tiny Llama-style model with SimPO, fused and reference side by side, and shows
            the loss curves match and the loss memory saved (``fused_pref/tools/demo.py``).
``memory``  peak bytes of live tensors beyond inputs and gradients, per implementation, at a model's
            full shape: measured on the CPU at scaled shapes, fitted, beside the analytic formula.
``bench``   on a GPU, times and peak memory of the fused path, the reference, torch.compile of it and
            the installed peers, written to ``benchmarks/results/<gpu>-<date>.json`` and a PNG; on a
            machine without CUDA, says so and runs the memory accounting instead.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from fused_pref.kernels import interpreter_problem, triton_interprets
from fused_pref.kernels.tiles import DEFAULT_PLAN, PLANS
from fused_pref.testing import CASES, TOLERANCE

from .peers import IMPLEMENTATION_ORDER
from .workload import LOSSES, MODELS, PROMPT_FRACTION, PROMPT_FRACTIONS, TOKENS_PER_STEP


RESULTS_DIR = Path("benchmarks/results")


def _reexec_with_interpreter(wanted: bool, argv):
    """Triton reads TRITON_INTERPRET when kernels are defined, which ``python -m fused_pref`` has
    already done by the time this runs; so re-execute with the variable as the command needs it."""
    if wanted and (problem := interpreter_problem()):
        raise SystemExit(f"fused_pref {argv[0]}: this command runs the kernels through Triton's interpreter, but "
                         f"{problem}")
    if triton_interprets() == wanted:
        return
    env = dict(os.environ)
    if wanted:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    os.execve(sys.executable, [sys.executable, "-m", "fused_pref", *argv], env)


def _check(args) -> int:
    from .check import DTYPES, run_check

    cuda = torch.cuda.is_available()
    _reexec_with_interpreter(not cuda, args.argv)
    device = "cuda" if cuda else "cpu"
    torch.set_float32_matmul_precision("highest")
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    if not cuda and args.case is None and args.dtype is None:
        where += " (about 40 s on two cores)"
    plan = args.plan or DEFAULT_PLAN
    # backward="in_forward" runs cuBLAS products of its own, no tile plan.
    mode = f"tile plan {plan}, backward auto" if args.backward == "auto" else "backward in_forward"
    print(f"fused_pref check on {where}, {mode}: fused vs fp64 reference, ||out - ref|| / ||ref||", flush=True)
    dtypes = DTYPES if args.dtype is None else tuple(getattr(torch, name) for name in dict.fromkeys(args.dtype))
    return 1 if run_check(device, dtypes, cases=args.case, out=lambda line: print(line, flush=True), plan=plan,
                          backward=args.backward) else 0


def _kernels(args) -> int:
    _reexec_with_interpreter(False, args.argv)
    from .aot import TABLE_HEADER, failed, format_row, iter_builds, verdict

    print("Compiling every kernel ahead of time (no GPU needed; about four minutes on two CPU cores the first time, "
          "one once Triton's cache holds them), a row per build as it is done:", flush=True)
    print(TABLE_HEADER, flush=True)
    builds, start = [], time.perf_counter()
    for build in iter_builds():
        builds.append(build)
        print(format_row(build), flush=True)
    print(verdict(builds, time.perf_counter() - start))
    return 1 if failed(builds) else 0


def _demo(args) -> int:
    from .demo import run_demo

    cuda = torch.cuda.is_available()
    _reexec_with_interpreter(not cuda, args.argv)
    result = run_demo(steps=args.steps, pairs=args.pairs, seed=args.seed)
    return 0 if result.curves_match else 1


def _memory(args) -> int:
    from .accounting import account, format_report

    # The accounting runs the real kernels on CPU tensors, so through the interpreter, GPU or not.
    _reexec_with_interpreter(True, args.argv)
    print(format_report(args.model, args.tokens, args.loss, account(args.model, args.tokens, args.loss)))
    return 0


def _bench(args) -> int:
    models = args.model or (list(MODELS) if args.all_shapes else ["llama3-8b"])
    tokens = args.tokens or (list(TOKENS_PER_STEP) if args.all_shapes else [16384])
    losses = args.loss or list(LOSSES)
    prompt_fractions = args.prompt_fraction or [PROMPT_FRACTION]
    cuda = torch.cuda.is_available()
    _reexec_with_interpreter(not cuda, args.argv)
    if not cuda:
        gpu_only = {"--impl": args.impl, "--prompt-fraction": args.prompt_fraction, "--out": args.out != RESULTS_DIR,
                    "--no-plot": args.no_plot, "--no-profile": args.no_profile}
        ignored = [flag for flag, given in gpu_only.items() if given]
        print("No CUDA device on this machine: the GPU benchmark (times, peak CUDA memory, peers) is skipped.\n"
              "Running the part a CPU can measure instead: the memory accounting of `python -m fused_pref "
              "memory`, at scaled-down shapes, extrapolated to each full shape."
              + (f"\nIgnored here, as they shape the GPU run: {', '.join(ignored)}." if ignored else "") + "\n",
              flush=True)
        from .accounting import account, format_summary

        print(format_summary({(m, t, loss): account(m, t, loss) for m in models for t in tokens for loss in losses}))
        return 0
    from .benchmark import cases, run

    run(cases(models, tokens, losses, prompt_fractions), args.out, args.impl, make_plot=not args.no_plot,
        profile=not args.no_profile)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _prompt_fraction(text: str) -> float:
    """A name of ``PROMPT_FRACTIONS`` or a number in [0, 1): below 1, every sequence keeps a label."""
    if text in PROMPT_FRACTIONS:
        return PROMPT_FRACTIONS[text]
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be {' or '.join(PROMPT_FRACTIONS)} or a number in [0, 1), got {text!r}")
    return value


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fused_pref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="fused vs reference errors of every public function")
    check.add_argument("--case", action="append", choices=CASES, metavar="CASE",
                       help=f"only this case, repeatable (default all: {', '.join(CASES)})")
    check.add_argument("--plan", choices=PLANS,
                       help=f"the tile plan the kernels run (default {DEFAULT_PLAN}; see the README's tile plans)")
    check.add_argument("--dtype", action="append", choices=[str(d).removeprefix("torch.") for d in TOLERANCE],
                       help="only this input dtype, repeatable (default float32 and bfloat16; float16's gradients "
                            "are compared loss-scaled, as fp16 training runs)")
    check.add_argument("--backward", choices=("auto", "in_forward"), default="auto",
                       help="auto (the default path, also called 'chunked'); in_forward: every call computes its "
                            "gradients in the forward (the README's 'Gradient in the forward'), the cases that mode "
                            "does not run left out")
    check.set_defaults(run=_check)
    commands.add_parser("kernels", help="AOT-compile every kernel for sm_80/sm_90, report spills").set_defaults(
        run=_kernels)

    demo = commands.add_parser("demo", help="train a tiny Llama with SimPO, fused against the reference")
    demo.add_argument("--steps", type=_positive_int, default=30)
    demo.add_argument("--pairs", type=_positive_int, default=8, help="preference pairs per step")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    memory = commands.add_parser("memory", help="peak extra memory of each implementation at a model's shape")
    memory.add_argument("--model", choices=MODELS, default="llama3-8b")
    memory.add_argument("--tokens", type=_positive_int, default=16384, help="tokens per step (default 16384)")
    memory.add_argument("--loss", choices=LOSSES, default="simpo")
    memory.set_defaults(run=_memory)

    bench = commands.add_parser("bench", help="GPU times and peak memory against the reference and the peers")
    bench.add_argument("--model", choices=MODELS, action="append", help="repeatable (default llama3-8b)")
    bench.add_argument("--tokens", type=int, choices=TOKENS_PER_STEP, action="append",
                       help="tokens per step, repeatable (default 16384)")
    bench.add_argument("--loss", choices=LOSSES, action="append", help="repeatable (default all)")
    bench.add_argument("--prompt-fraction", type=_prompt_fraction, action="append", metavar="FRACTION",
                       help=f"the share of each sequence that is prompt (label -100), repeatable: "
                            f"{', '.join(f'{k} ({v:g})' for k, v in PROMPT_FRACTIONS.items())} or a number in "
                            f"[0, 1) (default {PROMPT_FRACTION:g}); GPU runs only, since the memory accounting "
                            "run without a GPU counts every token, prompt or not")
    bench.add_argument("--all-shapes", action="store_true",
                       help="every model at every tokens per step (--model / --tokens still narrow it)")
    bench.add_argument("--impl", action="append", choices=IMPLEMENTATION_ORDER, metavar="IMPL",
                       help=f"only these implementations, repeatable: {', '.join(IMPLEMENTATION_ORDER)} (default "
                            "all; fused-* but fused-inforward are the tile plans, fused-inforward "
                            "backward='in_forward', validated, a workspace holding a pair)")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR,
                       help="directory of the results file and plot (default benchmarks/results)")
    bench.add_argument("--no-plot", action="store_true", help="write no PNG")
    bench.add_argument("--no-profile", action="store_true",
                       help="leave out the profiled call that splits each implementation's GPU time by kernel")
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    if args.command == "check" and args.backward == "in_forward" and args.plan is not None:
        check.error(f"--plan {args.plan} has no effect with --backward in_forward, which runs cuBLAS products of its "
                    "own, not the tile plans")
    args.argv = argv
    return args.run(args)

