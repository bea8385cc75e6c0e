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

What to build is stated by each kernel module beside its launcher (``aot_specs``: the constexpr
values of each variant, the element dtypes of the pointer arguments and the launch options, from the
constants and TileConfig the launcher itself uses).  The rest of each signature is derived here from
the kernel's own argument names by one naming rule (``signature``), so an argument added to a kernel
and not covered fails by name instead of compiling against a stale hand-copied signature.
"""

import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_pref.kernels.tiles import DTYPE_NAMES, AotSpec, triton_interprets

ARCHS = (80, 90)
# The most shared memory one CTA may use (the opt-in maximum): A100 163 KiB, H100/H200 227 KiB.  A
# build over it compiles but cannot launch.
SHARED_MEMORY_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
LAYOUTS = ("strided", "aligned")
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}   # "bf16" -> torch.bfloat16, ...

# The naming rule that types every runtime argument of every kernel (STYLE.md #3 names them so);
# the kernels' own specs (``aot_specs`` beside each launcher) give only the pointers' element types.
#   <name>_ptr      a pointer to the spec's dtype for it
#   stride_*_d      i32: the innermost stride (1 for contiguous inputs)
#   stride_*        i64: a row stride times a row index passes 2^31 (N*D, V*D elements)
#   one capital     i32: a size (N, V, D, T, B)
#   v_*             i32: a vocabulary position or count (v_per_split, v_chunk_start, v_chunk_end)
#   n_*, p_*        i32: a count of tiles or rows (n_row_tiles, n_splits), a row-index position (p_start)
#   FLOAT_SCALARS   fp32
FLOAT_SCALARS = ("softcap", "inv_temperature", "beta", "gamma", "label_smoothing", "tau")
POINTER_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64"}


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


def shipped_specs(dtypes=tuple(TORCH_DTYPES)) -> list[AotSpec]:
    """Every kernel module's ahead-of-time builds (its ``aot_specs``), for each input dtype named in
    ``dtypes``, then the preference head's (fp32 whatever the inputs)."""
    from fused_pref.kernels import cross_entropy_block, linear_grad, linear_lse, pref_head

    specs = []
    for name in dtypes:
        for module in (linear_lse, linear_grad, cross_entropy_block):
            specs += module.aot_specs(TORCH_DTYPES[name])
    return specs + linear_lse.merge_aot_specs() + pref_head.aot_specs()


def _is_constexpr(annotation) -> bool:
    # tl.constexpr itself, or its name where annotations are strings (from __future__ import annotations).
    return annotation is tl.constexpr or (isinstance(annotation, str) and annotation.split(".")[-1] == "constexpr")


def _argument_type(name: str, spec: AotSpec) -> tuple[str | None, str]:
    """(Triton type of runtime argument ``name`` under the naming rule, or None; why not)."""
    if name.endswith("_ptr"):
        if name not in spec.pointers:
            return None, "a pointer whose element dtype the spec does not give"
        dtype = spec.pointers[name]
        if dtype not in POINTER_TYPES:
            return None, f"a pointer to {dtype}, which has no Triton type here (POINTER_TYPES)"
        return f"*{POINTER_TYPES[dtype]}", ""
    if name.startswith("stride_"):
        return ("i32" if name.endswith("_d") else "i64"), ""
    if name in FLOAT_SCALARS:
        return "fp32", ""
    if re.fullmatch(r"[A-Z]", name) or name.startswith(("v_", "n_", "p_")):
        return "i32", ""
    return None, ("a scalar the naming rule (fused_pref.tools.aot) does not type (not *_ptr, stride_*, a one-letter "
                  f"size, v_*, n_*, p_*, nor one of FLOAT_SCALARS {FLOAT_SCALARS})")


def signature(spec: AotSpec) -> dict:
    """The Triton signature of ``spec.fn``'s runtime arguments, in the kernel's order, from its own
    ``arg_names`` by the naming rule above and the spec's pointer dtypes.  Raises ValueError naming
    every argument that neither covers (a kernel argument added or renamed since its spec was
    written), every constexpr the spec gives no value, and every name the spec gives that the kernel
    does not take."""
    fn = spec.fn
    parameters = inspect.signature(fn.fn).parameters
    constexprs = [name for name, p in parameters.items() if _is_constexpr(p.annotation)]
    problems = []
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            if name not in spec.constexprs:
                problems.append(f"{name}: a constexpr the spec gives no value")
            continue
        kind, why = _argument_type(name, spec)
        if kind is None:
            problems.append(f"{name}: {why}")
        else:
            sig[name] = kind
    problems += [f"{name}: the spec gives it a dtype, but the kernel takes no such pointer"
                 for name in spec.pointers if name not in fn.arg_names or not name.endswith("_ptr")]
    problems += [f"{name}: the spec gives it a value, but the kernel has no such constexpr"
                 for name in spec.constexprs if name not in constexprs]
    if problems:
        raise ValueError(f"AOT spec of {fn.__name__} ({spec.kernel} {spec.variant}, {fn.fn.__module__}.aot_specs) "
                         "does not match the kernel's arguments:\n  " + "\n  ".join(problems))
    return sig


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
    if triton_interprets():
        raise RuntimeError("AOT compilation needs a process without TRITON_INTERPRET")
    signature, constexprs, attrs = _specialize(fn, signature, constexprs, layout)
    full_sig = {**signature, **{k: "constexpr" for k in constexprs}}
    ordered = {name: full_sig[name] for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=ordered, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def iter_builds(archs=ARCHS, dtypes=tuple(TORCH_DTYPES), layouts=LAYOUTS):
    """Compile every shipped kernel variant in each layout for each arch, yielding each build as it is done."""
    # Every signature first: a stale spec fails at once, not after minutes of compiling the others.
    specs = [(spec, signature(spec)) for spec in shipped_specs(dtypes)]
    for spec, sig in specs:
        for layout in (layout for layout in layouts if layout in spec.layouts):
            for arch in (arch for arch in archs if arch in spec.archs):
                compiled = compile_kernel(spec.fn, sig, spec.constexprs, spec.options, arch, layout)
                registers, spill_stores, spill_loads = _ptxas_figures(compiled.asm["ptx"], arch)
                yield KernelBuild(spec.kernel, spec.variant, layout, arch, registers, spill_stores, spill_loads,
                                  compiled.metadata.shared)


def build_all(archs=ARCHS, dtypes=tuple(TORCH_DTYPES), layouts=LAYOUTS) -> list[KernelBuild]:
    return list(iter_builds(archs, dtypes, layouts))


TABLE_HEADER = (f"{'kernel':<19} {'variant':<34} {'layout':<8} {'arch':<6} {'regs':>5} {'spill st':>9} {'spill ld':>9} "
                f"{'smem B':>8}")


def format_row(b: KernelBuild) -> str:
    return (f"{b.kernel:<19} {b.variant:<34} {b.layout:<8} sm_{b.arch:<3} {b.registers:>5} "
            f"{b.spill_stores:>9} {b.spill_loads:>9} {b.shared_bytes:>8}")


def format_table(builds) -> str:
    return "\n".join([TABLE_HEADER, *map(format_row, builds)])


def over_shared_memory(build: KernelBuild) -> bool:
    return build.shared_bytes > SHARED_MEMORY_LIMITS[build.arch]


def failed(builds) -> bool:
    """Whether any build spills registers or needs more shared memory than its GPU has."""
    return any(b.spill_stores or b.spill_loads or over_shared_memory(b) for b in builds)


def verdict(builds, seconds: float) -> str:
    """One line: how many builds, whether any spills registers and whether any needs more shared
    memory than its GPU has (and which)."""
    def named(bad, what):
        where = "; ".join(f"{b.kernel} {b.variant} {b.layout} sm_{b.arch}" for b in bad)
        return f"{len(bad)} {what}: {where}" if bad else f"0 {what}"

    spilled = named([b for b in builds if b.spill_stores or b.spill_loads], "spill registers")
    over = named([b for b in builds if over_shared_memory(b)], "over the shared memory limit")
    archs = ", ".join(f"sm_{a}" for a in sorted({b.arch for b in builds}))
    return f"{len(builds)} builds for {archs} in {seconds:.0f} s: {spilled}, {over}"
