"""Vocabulary parallelism, DDP, FSDP2 and DeepSpeed on CPU processes with gloo, and FSDP2's CPU
offload on GPUs (tests/distributed_worker.py).

Vocab-parallel results and gradients must equal the single-process reference on the unsharded
weight, for SimPO, DPO and cross-entropy, with V = 1003 divisible by neither world size, with the
shard given by hand (process_group) or as a DTensor lm_head from parallelize_module; so must the
per-token statistics (an argmax tied across shards among them), the z-loss and label smoothing,
a rank without vocabulary rows refused by every rank, the compiled calls, backward="in_forward" (with gradients, and a reference model's log-probs
without), and the TRL trainers' steps on a tensor-parallel lm_head; DDP and FSDP2 around a module
calling the losses; a transformers model under FSDP2 (per layer and root, fp32 and a
bf16 MixedPrecisionPolicy, the lm_head its own unit; refused, naming the way in, when called from
outside the root's forward) and under DeepSpeed ZeRO-3 through integrations.hf, FusedDPOTrainer's loss step with both models so wrapped and FusedGRPOTrainer's
per-token log-probs, against the single process.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("distributed_worker.py")

# The ranks are CPU processes on gloo running the kernels through the interpreter: a single lent GPU
# cannot host several NCCL ranks.
interpreted = pytest.mark.cpu_interpreter
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@contextlib.contextmanager
def _alone():
    """One group of ranks at a time on this machine, whichever pytest-xdist worker starts it: two at
    once on CI's two cores, each group waiting for all of its ranks at every collective, took five
    times as long (DeepSpeed's checks: 121 s beside another group, 24 s beside a single-process test)."""
    try:
        import fcntl
    except ImportError:     # not a POSIX system: no lock, only slower
        yield
        return
    # Per user: another's file of that name in the shared temporary directory could not be opened.
    with open(Path(tempfile.gettempdir()) / f"fused_pref-distributed-tests-{os.getuid()}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(world, checks, env):
    with _alone():
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", str(WORKER),
             *checks], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    # Libraries print too (DeepSpeed, building its ops): only rank 0's "ok" lines count.
    passed = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert passed == [f"ok {c} world={world}" for c in checks], done.stdout


def _deepspeed_installed():
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


# DeepSpeed is not in the test extras (its sdist builds against the installed torch only without
# build isolation).  .ci/run installs it and sets FUSED_PREF_REQUIRE_DEEPSPEED, so that a broken
# install fails CI instead of skipping these.
needs_deepspeed = pytest.mark.skipif(not _deepspeed_installed() and not os.environ.get("FUSED_PREF_REQUIRE_DEEPSPEED"),
                                     reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")


@pytest.mark.parametrize("world, checks", [
    (2, ["vocab-chunk", "vocab-split", "vocab-stats", "vocab-stats-cublas", "vocab-compile", "vocab-inforward",
         "dtensor", "trl-dtensor", "grpo-dtensor"]),
    (2, ["ddp", "fsdp", "hf-fsdp", "hf-fsdp-bf16", "hf-fsdp-head", "trl-fsdp", "trl-fsdp-head", "grpo-fsdp"]),
    # "cublas"'s statistics merge as narrow's (combine_partials): 2 ranks test that plan, within CI's time.
    (3, ["vocab-chunk", "vocab-split", "vocab-stats", "vocab-inforward", "dtensor", "trl-dtensor"]),
    pytest.param(2, ["hf-zero3", "zero3-direct", "trl-zero3", "grpo-zero3"], marks=needs_deepspeed),
], ids=["world2-vocabulary", "world2-data", "world3", "deepspeed-zero3"])
@interpreted
@needs_gloo
def test_distributed(world, checks):
    # DS_ACCELERATOR: DeepSpeed's CPU accelerator (gloo) whatever the machine has.
    _run(world, checks, {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_available() or not dist.is_nccl_available(),
                    reason="FSDP2's CPU offload needs an accelerator (NCCL ranks, one per GPU)")
def test_fsdp_cpu_offload_on_gpus():
    """FSDP2 with ``CPUOffloadPolicy`` (parameters on the host between uses, copied to the GPU for
    each gather), per layer and root and with the lm_head its own unit, one rank per GPU (one
    rank on a single GPU: the gathers and offload copies still run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _run(torch.cuda.device_count(), ["hf-fsdp-offload", "hf-fsdp-head-offload"],
         {**env, "FUSED_PREF_WORKER_DEVICE": "cuda", "OMP_NUM_THREADS": "1"})
