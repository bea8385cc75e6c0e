#!/usr/bin/env bash
# The GPU protocol, one command on a lent H100/H200, from the repository root or anywhere:
#
#     benchmarks/gpu_check.sh OUT_DIR [--no-tests | --no-bench] [python -m fused_pref bench options]
#
# 1. prints the GPU, driver, CUDA, torch and triton versions;
# 2. runs the test suite on the GPU (every test's kernels on CUDA tensors against the fp64
#    reference; the tests that only the CPU interpreter can run skip themselves), in parallel
#    processes when pytest-xdist is installed, since most of its time is Triton compiling each
#    kernel variant; a failure is reported in the exit status but does not stop step 3;
# 3. runs the benchmark at every model and tokens per step (`--all-shapes`; further options, e.g.
#    `--impl fused-vchunk --impl reference`, `--model llama3-8b` or `--loss simpo`, narrow it to
#    fit a time budget; see benchmarks/NOTES.md for an estimate),
#    writing OUT_DIR/<gpu>-<date>.json and its PNG, rewritten after every case.
# `--no-tests` / `--no-bench` leave out step 2 / step 3, to split the protocol over two calls that
# each fit a time limit.  Wheels in ./.whl (benchmarks/peer_wheels.sh) are installed first, so the
# optional peers (Liger-Kernel, Cut Cross-Entropy) take part.  Logs go to OUT_DIR/pytest.log and OUT_DIR/bench.log.  To publish: copy
# the JSON into benchmarks/results/ and run `python benchmarks/publish.py readme`.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT_DIR [--no-tests | --no-bench] [python -m fused_pref bench options]" >&2
    exit 2
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
run_tests=1 run_bench=1
case "${1:-}" in
    --no-tests) run_tests=0; shift ;;
    --no-bench) run_bench=0; shift ;;
esac
cd "$(dirname "$0")/.."

export PYTHONUNBUFFERED=1
# Peers carried as wheels (benchmarks/peer_wheels.sh): the lent machine has no package index.
# setuptools into the interpreter itself: installing this checkout, and the wheel test's build (run
# without PYTHONPATH), need 77 or newer, which the image may not have.
if compgen -G ".whl/setuptools-*.whl" > /dev/null \
        && ! python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
    python -m pip install --quiet --no-index --no-deps .whl/setuptools-*.whl \
        || echo "warning: the carried setuptools did not install; installing this checkout may fail" >&2
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# cuBLAS is deterministic only with a fixed workspace; the determinism tests turn on
# torch.use_deterministic_algorithms, which refuses cuBLAS products without this.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The package must import from this checkout (kernels/ installs as fused_pref.kernels); the lent
# machine reaches no package index, so install without dependencies or build isolation.
if ! python -c "import fused_pref.kernels" 2>/dev/null; then
    python -m pip install --quiet --no-deps --no-build-isolation -e .
fi
python -c "import torch, triton, fused_pref; print('torch', torch.__version__, '| CUDA', torch.version.cuda, \
'| triton', triton.__version__, '| fused_pref', fused_pref.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device visible to torch')"

# A failing test does not cancel the benchmark (the lent time is scarce); it fails the script.
tests=0
if [[ $run_tests == 1 ]]; then
    parallel=()
    if python -c "import xdist" 2>/dev/null; then
        parallel=(-n 8)
    fi
    # The whole suite, the ahead-of-time compile included: no build spills with the GPU image's
    # triton 3.6 either (checked on the CPU with 3.6 and 3.9).
    pytest tests -q "${parallel[@]}" 2>&1 | tee "$out/pytest.log" || tests=$?
fi
if [[ $run_bench == 1 ]]; then
    python -m fused_pref bench --all-shapes --out "$out" "$@" 2>&1 | tee "$out/bench.log"
fi
exit "$tests"
