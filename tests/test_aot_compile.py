"""Every kernel compiles ahead of time for sm_80 and sm_90 at its shipped configs, without spills,
both with no specialization hints (strided inputs) and with the hints contiguous, 16-aligned inputs get.

The interpreter accepts code the GPU compiler rejects, so this runs the real compiler, in a
subprocess without TRITON_INTERPRET (Triton reads it when kernels are defined).
"""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from fused_pref.kernels.tiles import AotSpec
from fused_pref.tools import aot


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    # Through `python -m fused_pref kernels`, which re-executes itself without TRITON_INTERPRET: a row
    # per build as it is done, then one verdict line.
    done = subprocess.run([sys.executable, "-m", "fused_pref", "kernels"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Compiling every kernel ahead of time") and lines[1] == aot.TABLE_HEADER
    # kernel, then a variant that may hold spaces ("bf16 wide"), then six fixed columns.
    rows = [(line.split()[0], *line.split()[-6:]) for line in lines[2:-1]]
    assert {r[0] for r in rows} == {"column_sum", "cross_entropy_block", "linear_grad", "linear_lse", "logit_sum",
                                    "merge_splits", "pref_head"}
    assert {r[2] for r in rows} == {"sm_80", "sm_90"} and {r[1] for r in rows} == {"aligned", "strided"}
    # Every spec, in each layout and on each arch it runs on; the wide plans' tiles only aligned, and
    # the widest plan's own 128x256 tiles only on Hopper.
    assert len(rows) == sum(len(spec.layouts) * len(spec.archs) for spec in aot.shipped_specs())
    assert any(" wide" in line for line in lines) and not any(" wide" in line and "strided" in line for line in lines)
    widest = [line for line in lines if " widest" in line]
    assert widest and all("sm_90" in line for line in widest)
    assert [r for r in rows if r[4:6] != ("0", "0")] == [], "spills"
    # The pipelined stages fit each GPU's shared memory (a build over it compiles but cannot launch).
    assert [r for r in rows if int(r[6]) > aot.SHARED_MEMORY_LIMITS[int(r[2][3:])]] == [], "shared memory"
    assert re.fullmatch(rf"{len(rows)} builds for sm_80, sm_90 in \d+ s: 0 spill registers, 0 over the shared memory "
                        "limit", lines[-1]), lines[-1]


# ---- The signatures come from the kernels' own arguments ---------------------------------------
# Each kernel module states its builds beside its launcher (``aot_specs``: constexprs, pointer dtypes,
# launch options); the tool types every other argument by one naming rule.  These run in-process (the
# kernels are interpreted here, but their argument names are the same) and compile nothing.

@triton.jit
def _toy_kernel(x_ptr, out_ptr, N, stride_x_n, stride_x_d, softcap, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride_x_n, mask=offs < N, other=0.0)
    tl.store(out_ptr + offs, x * softcap, mask=offs < N)


@triton.jit
def _toy_kernel_grown(x_ptr, out_ptr, extra_ptr, N, stride_x_n, stride_x_d, softcap, alpha, BLOCK: tl.constexpr,
                      FLAG: tl.constexpr):
    # _toy_kernel after an edit: a pointer, a float scalar and a constexpr its spec does not know.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride_x_n, mask=offs < N, other=0.0) + tl.load(extra_ptr + offs, mask=offs < N)
    tl.store(out_ptr + offs, x * softcap * alpha, mask=offs < N)


TOY = {"kernel": "toy", "variant": "bf16", "pointers": {"x_ptr": torch.bfloat16, "out_ptr": torch.float32},
       "constexprs": {"BLOCK": 128}, "options": {"num_warps": 4}}


def test_the_naming_rule_types_every_runtime_argument_in_the_kernels_order():
    assert aot.signature(AotSpec(fn=_toy_kernel, **TOY)) == {
        "x_ptr": "*bf16", "out_ptr": "*fp32", "N": "i32", "stride_x_n": "i64", "stride_x_d": "i32", "softcap": "fp32"}


def test_arguments_a_kernel_gained_but_its_spec_does_not_cover_are_named():
    with pytest.raises(ValueError, match="_toy_kernel_grown") as raised:
        aot.signature(AotSpec(fn=_toy_kernel_grown, **TOY))
    message = str(raised.value)
    for name in ("extra_ptr", "alpha", "FLAG"):
        assert f"\n  {name}: " in message, message
    for covered in ("x_ptr", "out_ptr", "softcap", "BLOCK"):
        assert f"\n  {covered}: " not in message, message


def test_names_a_spec_gives_that_the_kernel_does_not_take_are_named():
    stale = {**TOY, "pointers": {**TOY["pointers"], "gone_ptr": torch.float32}, "constexprs": {"BLOCK": 128, "GONE": 1}}
    with pytest.raises(ValueError) as raised:
        aot.signature(AotSpec(fn=_toy_kernel, **stale))
    assert "\n  gone_ptr: " in str(raised.value) and "\n  GONE: " in str(raised.value)


def test_every_shipped_spec_covers_its_kernels_arguments():
    specs = aot.shipped_specs()
    assert {(s.kernel, s.variant.split()[0].split("+")[0]) for s in specs if s.kernel != "pref_head"} == {
        (k, d) for k in ("linear_lse", "logit_sum", "linear_grad", "column_sum", "cross_entropy_block")
        for d in ("bf16", "fp16", "fp32")
    } | {("merge_splits", "fp32")}
    for spec in specs:
        assert list(aot.signature(spec)) == [n for n in spec.fn.arg_names if n not in spec.constexprs]
    # A real kernel whose spec has fallen behind (here: one that never learnt of lse_ptr) is caught by name.
    grad = next(s for s in specs if s.kernel == "linear_grad")
    behind = dataclasses.replace(grad, pointers={k: v for k, v in grad.pointers.items() if k != "lse_ptr"})
    with pytest.raises(ValueError, match=r"linear_grad_kernel(.|\n)*\n  lse_ptr: a pointer whose element dtype"):
        aot.signature(behind)


def test_a_build_over_its_gpus_shared_memory_fails():
    # 227 KiB of pipelined stages fit an H100's CTA but not an A100's (163 KiB): it would compile there
    # and fail to launch.
    fits = aot.KernelBuild("k", "v", "aligned", 90, 128, 0, 0, 227 * 1024)
    over = dataclasses.replace(fits, arch=80)
    assert not aot.failed([fits]) and aot.failed([fits, over])
    assert aot.verdict([fits, over], 1.0).endswith("0 spill registers, 1 over the shared memory limit: k v aligned sm_80")
