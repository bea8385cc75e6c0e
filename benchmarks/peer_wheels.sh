#!/usr/bin/env bash
# The optional peers of `python -m fused_pref bench` as wheels, for a GPU machine that reaches no
# package index.  Here, with network access:
#
#     benchmarks/peer_wheels.sh .whl        # liger-kernel and cut-cross-entropy, pure-Python wheels
#
# then carry the folder to the GPU machine; benchmarks/gpu_check.sh installs what it finds in
# ./.whl (into /tmp/site, on PYTHONPATH) before it runs anything.  Both need only torch and triton,
# which that machine has.
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
python -m pip download --quiet --no-deps --only-binary=:all: -d "$1" liger-kernel cut-cross-entropy
ls "$1"
