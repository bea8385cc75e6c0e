"""Vocabulary parallelism, DDP and FSDP on CPU processes with gloo (tests/distributed_worker.py).

Vocab-parallel results and gradients must equal the single-process reference on the unsharded
weight, for SimPO, DPO and cross-entropy, with V = 1003 divisible by neither world size, with the
shard given by hand (process_group) or as a DTensor lm_head from parallelize_module; DDP and FSDP2
around a module calling the losses, and a transformers model under FSDP2 (per layer and root, fp32
and a bf16 MixedPrecisionPolicy) through integrations.hf, against the single process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("distributed_worker.py")

# The ranks are CPU processes on gloo running the kernels through the interpreter: a single lent GPU
# cannot host several NCCL ranks.
pytestmark = [pytest.mark.cpu_interpreter,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


@pytest.mark.parametrize("world, checks", [
    (2, ["vocab-chunk", "vocab-split", "dtensor", "ddp", "fsdp", "hf-fsdp", "hf-fsdp-bf16"]),
    (3, ["vocab-chunk", "vocab-split", "dtensor"]),
], ids=["world2", "world3"])
def test_distributed(world, checks):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", str(WORKER),
         *checks], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.split("\n")[:len(checks)] == [f"ok {c} world={world}" for c in checks], done.stdout
