"""Ahead-of-time compilation of every kernel for real GPUs, on any machine (no GPU needed).

The interpreter accepts code that the GPU compiler rejects, so each kernel is also compiled for
sm_80 and sm_90 at its shipped configuration and the register / spill figures are read from
``ptxas -v`` of the ptxas Triton itself uses for that architecture.

Triton specializes every launch on its arguments: an integer equal to 1 becomes a constant and an
integer or pointer that is a multiple of 16 gets a divisibility hint, which is what lets loads be
vectorized and the pipeliner multi-buffer them with ``cp.async``.  So each kernel is compiled in two
layouts: ``strided`` with no hint (the code any input can fall back to) and ``aligned`` with the
hints that contiguous inputs whose sizes are multiples of 16 get (every benchmarked model head).
Must run in a process without ``TRITON_INTERPRET`` (``python -m fused_pref kernels`` re-executes
itself without it).
"""

import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = (80, 90)
LAYOUTS = ("strided", "aligned")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class KernelBuild:
    kernel: str
    variant: str
    layout: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


def _linear_specs(dtype):
    """(kernel, variant name, fn, signature, constexprs, options) for the two logits kernels."""
    from fused_pref.kernels import linear_grad, linear_grad_fused, linear_lse
    from fused_pref.kernels.tiles import tiles_for

    tiles = tiles_for(TORCH_DTYPES[dtype])
    tile_constexprs = {"BLOCK_N": tiles.block_n, "BLOCK_V": tiles.block_v, "BLOCK_D": tiles.block_d}
    options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    precision = "tf32" if dtype == "fp32" else "ieee"
    for flags in ((False, False), (True, True)):
        has_bias, has_softcap = flags
        variant = f"{dtype}{'+bias' if has_bias else ''}{'+softcap' if has_softcap else ''}"
        base = {"HAS_BIAS": has_bias, "HAS_SOFTCAP": has_softcap, "DOT_IN_FP32": False,
                "DOT_PRECISION": precision, **tile_constexprs}
        lse_sig = {
            "h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "labels_ptr": "*i64",
            "rows_ptr": "*i32", "n_valid_ptr": "*i32", "max_ptr": "*fp32", "sumexp_ptr": "*fp32",
            "target_ptr": "*fp32", "logit_sum_ptr": "*fp32",
            "N": "i32", "V": "i32", "D": "i32", "T": "i32", "v_per_split": "i32",
            "stride_h_r": "i64", "stride_h_t": "i64", "stride_h_d": "i32", "stride_w_v": "i64", "stride_w_d": "i32",
            "softcap": "fp32",
        }
        # The tiles sum logits only under a softcap (linear_lse.py); that is the larger variant there.
        lse_const = {**base, "LOGIT_SUM": has_softcap}
        yield ("linear_lse", variant, linear_lse.linear_lse_kernel, lse_sig, lse_const, options)
        sum_sig = {"h_ptr": f"*{dtype}", "w_sum_ptr": "*fp64", "b_sum_ptr": "*fp64", "rows_ptr": "*i32",
                   "n_valid_ptr": "*i32", "out_ptr": "*fp32", "D": "i32", "T": "i32",
                   "stride_h_r": "i64", "stride_h_t": "i64", "stride_h_d": "i32"}
        sum_const = {"HAS_BIAS": has_bias, "BLOCK_N": linear_lse.LOGIT_SUM_BLOCK_N,
                     "BLOCK_D": linear_lse.LOGIT_SUM_BLOCK_D}
        yield ("logit_sum", f"{dtype}{'+bias' if has_bias else ''}", linear_lse.logit_sum_kernel, sum_sig, sum_const,
               {"num_warps": 4})
        grad_sig = {
            "h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "labels_ptr": "*i64",
            "rows_ptr": "*i32", "n_valid_ptr": "*i32", "lse_ptr": "*fp32", "dz_ptr": f"*{dtype}",
            "V": "i32", "D": "i32", "T": "i32", "v_chunk_start": "i32", "v_chunk_end": "i32",
            "stride_h_r": "i64", "stride_h_t": "i64", "stride_h_d": "i32", "stride_w_v": "i64",
            "stride_w_d": "i32", "stride_dz_p": "i64",
            "softcap": "fp32",
        }
        yield ("linear_grad", variant, linear_grad.linear_grad_kernel, grad_sig, base, options)
        fused_sig = {
            "h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "labels_ptr": "*i64",
            "rows_ptr": "*i32", "n_valid_ptr": "*i32", "lse_ptr": "*fp32", "g_ptr": "*fp32", "dh_ptr": "*fp32",
            "dw_ptr": "*fp32", "db_ptr": "*fp32", "V": "i32", "D": "i32", "T": "i32",
            "stride_h_r": "i64", "stride_h_t": "i64", "stride_h_d": "i32", "stride_w_v": "i64", "stride_w_d": "i32",
            "softcap": "fp32",
        }
        fused_const = {**base, "NEED_H": True, "NEED_W": True, "NEED_B": has_bias}
        yield ("linear_grad_fused", variant, linear_grad_fused.linear_grad_fused_kernel, fused_sig, fused_const,
               options)
    column_sig = {"w_ptr": f"*{dtype}", "out_ptr": "*fp64", "V": "i32", "D": "i32", "v_per_split": "i32",
                  "stride_w_v": "i64", "stride_w_d": "i32"}
    yield ("column_sum", dtype, linear_lse.column_sum_kernel, column_sig,
           {"BLOCK_V": linear_lse.COLUMN_SUM_BLOCK_V, "BLOCK_D": linear_lse.COLUMN_SUM_BLOCK_D}, {"num_warps": 4})


def _head_specs():
    from fused_pref.kernels import pref_head

    sig = {"chosen_ptr": "*fp32", "rejected_ptr": "*fp32", "ref_chosen_ptr": "*fp32", "ref_rejected_ptr": "*fp32",
           "loss_ptr": "*fp32", "d_chosen_ptr": "*fp32", "d_rejected_ptr": "*fp32", "B": "i32",
           "beta": "fp32", "gamma": "fp32", "label_smoothing": "fp32", "tau": "fp32"}
    for loss, loss_id in pref_head.LOSS_IDS.items():
        yield ("pref_head", loss, pref_head.preference_head_kernel, sig,
               {"HAS_REF": loss != "odds_ratio", "LOSS": loss_id, "BLOCK_B": pref_head.BLOCK_B}, {"num_warps": 4})


def shipped_specs(dtypes=tuple(TORCH_DTYPES)):
    for dtype in dtypes:
        yield from _linear_specs(dtype)
    yield from _head_specs()


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself assembles ``sm_<arch>`` with: which binary of its wheel that is, and
    how it says so, changed between releases (3.4 and 3.5 take no arch, 3.3 returns a tuple)."""
    from triton.backends.nvidia import compiler as nvidia

    tool = nvidia.get_ptxas(arch) if inspect.signature(nvidia.get_ptxas).parameters else nvidia.get_ptxas()
    return tool[0] if isinstance(tool, tuple) else tool.path


def _ptxas_figures(ptx: str, arch: int):
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def _specialize(fn, signature, constexprs, layout):
    """The signature, constants and hints Triton would compile a launch in ``layout`` with."""
    if layout == "strided":
        return signature, constexprs, {}
    inner_strides = [name for name in signature if name.startswith("stride_") and name.endswith("_d")]
    signature = {name: kind for name, kind in signature.items() if name not in inner_strides}
    constexprs = {**constexprs, **{name: 1 for name in inner_strides}}
    aligned = [name for name, kind in signature.items() if kind.startswith("*") or kind in ("i32", "i64")]
    return signature, constexprs, {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}


def compile_kernel(fn, signature, constexprs, options, arch, layout="strided"):
    """Compile one kernel for ``sm_<arch>``; returns Triton's compiled kernel (PTX in ``.asm``)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compilation needs a process without TRITON_INTERPRET")
    signature, constexprs, attrs = _specialize(fn, signature, constexprs, layout)
    full_sig = {**signature, **{k: "constexpr" for k in constexprs}}
    ordered = {name: full_sig[name] for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=ordered, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def build_all(archs=ARCHS, dtypes=tuple(TORCH_DTYPES), layouts=LAYOUTS) -> list[KernelBuild]:
    builds = []
    for kernel, variant, fn, signature, constexprs, options in shipped_specs(dtypes):
        for layout in layouts:
            for arch in archs:
                compiled = compile_kernel(fn, signature, constexprs, options, arch, layout)
                registers, spill_stores, spill_loads = _ptxas_figures(compiled.asm["ptx"], arch)
                builds.append(KernelBuild(kernel, variant, layout, arch, registers, spill_stores, spill_loads,
                                          compiled.metadata.shared))
    return builds


def format_table(builds) -> str:
    lines = [f"{'kernel':<18} {'variant':<20} {'layout':<8} {'arch':<6} {'regs':>5} {'spill st':>9} {'spill ld':>9} "
             f"{'smem B':>8}"]
    for b in builds:
        lines.append(f"{b.kernel:<18} {b.variant:<20} {b.layout:<8} sm_{b.arch:<3} {b.registers:>5} "
                     f"{b.spill_stores:>9} {b.spill_loads:>9} {b.shared_bytes:>8}")
    return "\n".join(lines)
