#!/usr/bin/env bash
# The optional peers of `python -m fused_pref bench` as wheels, for a GPU machine that reaches no
# package index.  Here, with network access:
#
#     benchmarks/peer_wheels.sh .whl        # the peers' pure-Python wheels
#
# then carry the folder to the GPU machine; benchmarks/gpu_check.sh installs what it finds in
# ./.whl (into /tmp/site, on PYTHONPATH) before it runs anything.  liger-kernel and
# cut-cross-entropy need only torch and triton, which that machine has; TRL (the peer trl-chunked)
# also needs datasets, and datasets dill and multiprocess, which its image lacks (it has
# transformers, accelerate, pyarrow, pandas, xxhash and fsspec).
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
# multiprocess ships one wheel per Python version: the lent machine runs 3.12 (override: PEER_PYTHON).
# setuptools: gpu_check.sh installs this checkout without build isolation, and pyproject.toml needs
# setuptools 77 or newer, which the lent image may not have (gpu_check.sh installs it first).
python -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PEER_PYTHON:-3.12}" \
    --implementation cp -d "$1" liger-kernel cut-cross-entropy \
    "trl>=1.16" datasets dill multiprocess "setuptools>=77"
ls "$1"
