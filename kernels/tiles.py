"""What the kernels share: the logits tile ``z = softcap(h @ w.T + b) / temperature``, the prologue every
logits-tile kernel starts with, the launch-time flags derived in one place, and the pieces of the
ahead-of-time build specs.

The forward (``linear_lse``) and the backward (``linear_grad``) build their
logits through ``logits_tile`` with the same ``TileConfig``, so the same element is rounded the same
way in every pass (Cut Cross-Entropy saw skewed gradients when the two used different MMA shapes),
and launch with ``logits_launch_args``, so their variant flags, dot flags and tiles cannot differ.
"""

import contextlib
import os
from dataclasses import dataclass
from importlib import metadata

import torch
import triton
import triton.language as tl


def triton_interprets() -> bool:
    """Whether Triton reads ``TRITON_INTERPRET`` as on now, by its own parser ("1", "true", "on",
    "yes" are on; "0", "false", "off", "" and unset are off).  Triton 3.3, before ``triton.knobs``,
    took "1" alone."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


# Triton turns @triton.jit functions into interpreter functions when this is set at definition
# time, so it is read once here, at import, as Triton reads it.
KERNELS_INTERPRETED = triton_interprets()


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def interpreter_problem(triton_version: str = triton.__version__, numpy_version: str | None = None) -> str | None:
    """Why Triton's interpreter cannot run these kernels with these versions, or None.

    Before 3.7 the interpreter turns a runtime loop bound into a Python int with ``int()`` on a
    one-element array, which NumPy 2.4 made a TypeError: every kernel fails at its first loop."""
    if numpy_version is None:
        try:
            numpy_version = metadata.version("numpy")
        except metadata.PackageNotFoundError:
            return "Triton's interpreter needs NumPy, which is not installed (pip install numpy)"
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run with NumPy {numpy_version} (before Triton 3.7 "
                "it converts loop bounds with int() on one-element arrays, an error since NumPy 2.4): "
                "install triton>=3.7 or numpy<2.4")
    return None


# The most bytes a kernel stage's workspace may hold: the backward's dz chunk, the forward's
# per-vocabulary-split partials.  A parameter of every call (``workspace_bytes``), never N x V.
WORKSPACE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TileConfig:
    """Block sizes, launch settings and program order shared by the forward and backward logits tiles.

    ``vocab_tiles_per_program``: how many BLOCK_V tiles a forward program walks with its online
    max / sum-exp before writing a partial log-sum-exp; None splits the vocabulary only as far as
    it takes to give the GPU two programs per SM.  ``group_rows``: row tiles that walk the vocabulary
    side by side (grouped program order, so a weight tile read from HBM serves them all from L2);
    None puts every row tile in one group, i.e. row-tile-fastest order.  ``cublas_logits``: cuBLAS
    computes the logits (fp32 out) and the kernels read them from memory (``stored_logits``) instead
    of computing tiles; ``block_n`` x ``block_v`` is then the backward's elementwise tile."""

    block_n: int = 64
    block_v: int = 128
    block_d: int = 32
    num_warps: int = 8
    num_stages: int = 3
    vocab_tiles_per_program: int | None = None
    group_rows: int | None = None
    cublas_logits: bool = False


# Tile plans: one configuration per input dtype each.  The forward and the backward of a call use
# the same plan, so every logit is rounded the same way in both (``LogprobParams.plan``).
#
# "narrow", the default, is what the H200 measured (benchmarks/NOTES.md): 64x128 tiles, BLOCK_D 32
# (16 in fp32), each forward program walking a vocabulary split.  On sm_90, 128x128 tiles spill in
# its layout and 64x128 with BLOCK_D 64 spills the fp32 forward.  fp32 runs 2 stages: with ieee
# dots (torch's default "highest" precision) and 3 stages the strided soft-capped forward spilled
# 8 bytes on sm_90 (bf16 was timed, fp32 never).
#
# "wide" follows DESIGN.md section 4's measured prototype: one output tile per forward program over
# the whole D in 64-wide steps, 8 warps, 3 stages, grouped order, the tile's max and sum-exp taken
# once (``ONE_TILE`` in the forward: no loop, the target gathered by index) and its partial
# log-sum-exp merged after.  128x128 without a softcap: on sm_90 112-126 registers forward and
# backward with triton 3.9 (two CTAs an SM fit), the forward 156-172 with 3.6; on sm_80 176-253.
#
# "widest" is "wide" with the prototype's own tile, 128x256 (22.3 ms at Llama-3-8B / 16k on an H200,
# against narrow's 58.5), on Hopper only (``HOPPER_TILES``): on sm_90 it compiles with no spills
# since neither kernel compares labels over the tile (forward 198-255 registers, backward
# 194-244); on sm_80 (mma.sync, no wgmma) it spills 16-84 bytes, so other GPUs run "wide"'s tiles.
#
# A softcap runs "wide"'s 128x128 tiles in both wide plans: with the one-tile forward and no label
# compare they compile with no spills (forward with the tiles' logit sum 173-255 registers, backward
# 127-225), where the looped forward spilled 8 bytes on sm_80 (triton 3.6); at 128x256 a softcap
# spills 16-220 bytes on sm_90.  Strided launches spill at 128x128 (20-500 bytes): they keep
# narrow's tiles (``tiles_for``), as does fp32.
# "cublas" has cuBLAS compute every logit, in fp32 (``torch.mm(..., out_dtype=torch.float32)``, the
# speed measured for it: 19.0 ms at Llama-3-8B / 12k valid tokens on an H200, against 22.3 for the
# best Triton prototype): the forward takes blocks of valid rows against the whole vocabulary and
# one pass of ``cross_entropy_block`` per row (lse, target, logit sum, token statistics); the
# backward, per vocabulary chunk, the chunk's fp32 logits and then the ``dz`` kernel reading them
# (``LOGITS_GIVEN``, with any per-row weights), before the same two products.  Its speed is cuBLAS's whatever Triton's
# codegen for wide tiles does, for ~8 bytes of traffic per logit and pass more than a tile's
# (cuBLAS's fp32 write, the kernel's read); any
# layout, a softcap and fp32 run it (the kernels read the logits, not the inputs).
# Not timed yet: opt-in (``tile_plan("wide")``, ``tile_plan("widest")``, ``tile_plan("cublas")``)
# until a GPU run of ``bench`` measures them.
#
# Every configuration compiles with no spills for sm_80 and sm_90 in the layouts and on the GPUs it
# runs on (tests/test_aot_compile.py), with triton 3.6 and 3.9.
_WIDE = TileConfig(block_n=128, block_v=128, block_d=64, vocab_tiles_per_program=1, group_rows=8)
_WIDEST = TileConfig(block_n=128, block_v=256, block_d=64, vocab_tiles_per_program=1, group_rows=8)
_NARROW_FP32 = TileConfig(block_d=16, num_stages=2)
# "cublas"'s kernels take no dot: 32x128 elementwise tiles, since at 64x128 the weighted backward (an
# entropy term, a z-loss, smoothing) reached the 8-warp cap of 128 registers (spilling 4 bytes in
# fp32 on sm_90 with triton 3.9); at 32x128 it takes 76-80.
_CUBLAS = TileConfig(block_n=32, num_stages=1, cublas_logits=True)
PLANS = {
    "narrow": {torch.bfloat16: TileConfig(), torch.float16: TileConfig(), torch.float32: _NARROW_FP32},
    "wide": {torch.bfloat16: _WIDE, torch.float16: _WIDE, torch.float32: _NARROW_FP32},
    "widest": {torch.bfloat16: _WIDE, torch.float16: _WIDE, torch.float32: _NARROW_FP32},
    "cublas": dict.fromkeys((torch.bfloat16, torch.float16, torch.float32), _CUBLAS),
}
# Where a plan runs other tiles on Hopper GPUs (compute capability 9.x).
HOPPER = 90
HOPPER_TILES = {"widest": {torch.bfloat16: _WIDEST, torch.float16: _WIDEST}}
DEFAULT_PLAN = "narrow"
# Calls that ask for per-token statistics, or whose backward takes per-row weights (an entropy
# term, a z-loss, label smoothing), run the active plan where it carries them (``STATS_PLANS``),
# else the default plan, forward and backward alike (``stats_plan``).  The wide forward with
# statistics spills 8 bytes on sm_80 (triton 3.6's ptxas), its 128x128 tile and the statistics'
# running sums and argmax holding more than 255 registers.  The "cublas" plan holds no logits tile
# in registers: its forward takes the statistics from the block kernel's first pass
# (``cross_entropy_block``) and its backward reads the weights beside the stored logits.  The
# weighted backward is built and checked ahead of time (python -m fused_pref kernels) in these
# plans only.
STATS_PLANS = (DEFAULT_PLAN, "cublas")
_active_plan = [DEFAULT_PLAN]


def active_plan() -> str:
    """The tile plan calls made now run with: ``DEFAULT_PLAN`` unless inside ``tile_plan``."""
    return _active_plan[-1]


@contextlib.contextmanager
def tile_plan(name: str):
    """Run the calls made inside with tile plan ``name`` (their backwards keep it, wherever they
    run).  For A/B timing: ``python -m fused_pref bench --impl fused-wide``."""
    if name not in PLANS:
        raise ValueError(f"tile plan must be one of {tuple(PLANS)}, got {name!r}")
    _active_plan.append(name)
    try:
        yield
    finally:
        _active_plan.pop()


def stats_plan(plan: str) -> str:
    """The plan a call with per-token statistics or per-row weights runs where ``plan`` is active:
    ``plan`` itself if it carries them (``STATS_PLANS``), else the default plan."""
    return plan if plan in STATS_PLANS else DEFAULT_PLAN


def tiles_for(dtype: torch.dtype, plan: str = DEFAULT_PLAN, *, aligned: bool = True,
              softcap: bool = False, arch: int | None = None) -> TileConfig:
    """The tiles of ``plan`` at ``dtype`` for a launch ``aligned`` or not (``aligned_launch``), with a
    softcap or without, on a GPU of compute capability ``arch`` (e.g. 90; None: not a GPU, as under
    the interpreter).  A strided launch takes the default plan's tiles and a soft-capped one no
    Hopper tiles: the only ones that compile without spills there.  cuBLAS's logits take any layout."""
    if not aligned and not PLANS[plan][dtype].cublas_logits:
        plan = DEFAULT_PLAN
    hopper = arch is not None and arch // 10 == HOPPER // 10 and not softcap
    if hopper and dtype in HOPPER_TILES.get(plan, {}):
        return HOPPER_TILES[plan][dtype]
    return PLANS[plan][dtype]


def distinct_plans(dtype: torch.dtype = torch.bfloat16, arch: int | None = None) -> list[str]:
    """The plans whose tiles at ``dtype`` differ on a GPU of compute capability ``arch`` (None: the
    interpreter), each under its first name: off Hopper "widest" runs "wide"'s tiles."""
    first = {}
    for plan in PLANS:
        first.setdefault(tiles_for(dtype, plan, arch=arch), plan)
    return list(first.values())


def gpu_arch(device: torch.device) -> int | None:
    """The compute capability of ``device`` as one number (8.0 -> 80, 9.0 -> 90); None off CUDA and
    on ROCm, whose numbers are not NVIDIA's (an MI300 reports 9.4)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def launch_tiles(plan: str, hidden, weight, bias, softcap) -> TileConfig:
    """The tiles a logits-tile launch over these inputs runs in ``plan`` (``tiles_for``): the forward
    and the backward of a call both ask here, so they agree."""
    return tiles_for(hidden.dtype, plan, aligned=aligned_launch(hidden, weight, bias), softcap=softcap is not None,
                     arch=gpu_arch(hidden.device))


def unit_stride_bias(bias):
    """The bias as the kernels read it, at ``b_ptr + v``: a strided or expanded one (a column of a
    parameter, a broadcast constant) copied, V elements; a contiguous one as it is.  For the callers
    that prepare a call's launches (``fused_pref/ops.py``); the launchers only check it."""
    return None if bias is None else bias.contiguous()


def check_unit_stride_bias(bias):
    assert bias is None or bias.stride(0) == 1, "the kernels read the bias at b_ptr + v: pass unit_stride_bias(bias)"


def aligned_launch(*tensors) -> bool:
    """Whether Triton compiles a launch over ``tensors`` (None skipped) in the aligned layout the
    plans' configurations are checked in: unit inner stride, the other strides multiples of 16
    elements and the data 16-byte aligned (Triton's specialization hints).  Forward and backward
    see the same tensors, so they agree."""
    return all(t is None or (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in t.stride()[:-1]))
               for t in tensors)


def dot_flags(dtype: torch.dtype, *, interpreted: bool = KERNELS_INTERPRETED,
              float32_matmul_precision: str | None = None) -> dict:
    """Constexprs for ``dot_acc``, derived in one place from the input dtype.

    ``DOT_IN_FP32``: the interpreter multiplies bf16 bit patterns as integers in ``tl.dot``
    (triton-lang/triton#11584), so under it bf16 operands are upcast; a bf16 x bf16 product is exact
    in fp32, so the math is unchanged.  On a GPU the dot stays bf16 on the tensor cores.
    ``DOT_PRECISION``: fp32 inputs follow ``torch.get_float32_matmul_precision()`` as cuBLAS does.
    ``interpreted`` and ``float32_matmul_precision`` default to this process's; the ahead-of-time
    builds (``aot_logits_variants``) name a GPU's.
    """
    precision = float32_matmul_precision or torch.get_float32_matmul_precision()
    ieee = dtype != torch.float32 or precision == "highest"
    return {
        "DOT_IN_FP32": interpreted and dtype == torch.bfloat16,
        "DOT_PRECISION": "ieee" if ieee else "tf32",
    }


def logits_constexprs(dtype: torch.dtype, tiles: TileConfig, *, has_bias: bool, has_softcap: bool,
                      has_temperature: bool = False, **dot) -> dict:
    """The constexprs every logits-tile kernel (``linear_lse``, ``linear_grad``)
    takes: the variant flags, ``dot_flags`` (``dot`` passes its keywords) and the block sizes."""
    return {
        "HAS_BIAS": has_bias, "HAS_SOFTCAP": has_softcap, "HAS_TEMPERATURE": has_temperature,
        **dot_flags(dtype, **dot),
        "BLOCK_N": tiles.block_n, "BLOCK_V": tiles.block_v, "BLOCK_D": tiles.block_d,
    }


def launch_options(tiles: TileConfig) -> dict:
    return {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}


def logits_launch_args(dtype: torch.dtype, bias, softcap, temperature: float, tiles: TileConfig) -> dict:
    """The keyword arguments every logits-tile launch shares, derived here once (STYLE.md #2): the
    ``softcap`` and ``inv_temperature`` scalars, the constexprs of ``logits_constexprs`` and the
    launch options.  Without a softcap its scalar is never read; 1.0 keeps it a valid divisor all
    the same.  A temperature of 1 compiles the kernels without the multiply (``HAS_TEMPERATURE``)."""
    return {
        "softcap": 1.0 if softcap is None else float(softcap),
        "inv_temperature": 1.0 / temperature,
        **logits_constexprs(dtype, tiles, has_bias=bias is not None, has_softcap=softcap is not None,
                            has_temperature=temperature != 1.0),
        **launch_options(tiles),
    }


def workspace_dtype(dtype: torch.dtype, *, interpreted: bool = KERNELS_INTERPRETED) -> torch.dtype:
    """The dtype the backward kernel stores its ``dz`` tile in: the input dtype, except bf16 under
    the interpreter, whose fp32 -> bf16 cast truncates (with or without ``fp_downcast_rounding``)
    where a GPU rounds to nearest even.  Truncation is biased, so it does not average out over a
    GEMM's sum: it doubled the bf16 gradient error on CPU.  There the kernel stores fp32 and torch
    rounds to bf16 (to nearest even), so CPU runs see the GPU's rounding."""
    return torch.float32 if interpreted and dtype == torch.bfloat16 else dtype


# ---- Ahead-of-time builds ------------------------------------------------------------------------
# Each kernel module states its own builds beside its launcher (``aot_specs``), from the constants
# and TileConfig the launcher uses; fused_pref/tools/aot.py collects them and compiles each for
# sm_80 and sm_90 (python -m fused_pref kernels, tests/test_aot_compile.py).

# The input dtypes the kernels ship configurations for, by the names Triton's signatures use.
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class AotSpec:
    """One ahead-of-time build of ``fn``: its ``constexprs`` (the variant), the element dtype of each
    of its pointer (``*_ptr``) arguments, and the launch ``options``.  Every other argument is typed
    by the AOT tool's naming rule (``fused_pref.tools.aot.signature``), which names any argument
    that neither covers rather than compile from a stale signature."""

    kernel: str
    variant: str
    fn: object
    pointers: dict
    constexprs: dict
    options: dict
    layouts: tuple = ("strided", "aligned")   # the layouts the launchers run it in (``aligned_launch``)
    archs: tuple = (80, 90)                   # the GPUs (compute capability) the launchers run it on


def logits_input_pointers(dtype: torch.dtype) -> dict:
    """Element dtypes of the inputs every logits-tile kernel takes, as the launchers pass them."""
    return {"h_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "labels_ptr": torch.int64,
            "rows_ptr": torch.int32, "n_valid_ptr": torch.int32}


@dataclass(frozen=True)
class LogitsBuild:
    """One ahead-of-time build of a logits-tile kernel (``aot_logits_variants``): its variant name,
    the constexprs of ``logits_constexprs``, launch options, the layouts and GPUs it runs in, and
    whether a forward program holds one tile (``ONE_TILE``) and whether the kernels read cuBLAS's
    logits (``TileConfig.cublas_logits``); ``plan`` the first plan in ``PLANS`` with these tiles."""

    plan: str
    variant: str
    constexprs: dict
    options: dict
    layouts: tuple
    archs: tuple
    one_tile: bool
    cublas_logits: bool = False


def _plan_tiles(dtype: torch.dtype, archs=(80, HOPPER)):
    """``(plan, tiles, the archs of ``archs`` that run them)``, each plan's tiles once, skipping any
    that an earlier plan already runs on the same GPU."""
    seen = set()
    for plan in PLANS:
        by_tiles = {}
        for arch in archs:
            tiles = tiles_for(dtype, plan, arch=arch)
            if (tiles, arch) not in seen:
                seen.add((tiles, arch))
                by_tiles.setdefault(tiles, []).append(arch)
        for tiles, on in by_tiles.items():
            yield plan, tiles, tuple(on)


def aot_logits_variants(dtype: torch.dtype):
    """The ``LogitsBuild`` of the logits-tile kernels' ahead-of-time builds at ``dtype``'s tiles in every
    plan, in the launches and on the GPUs that run them (``tiles_for``): without bias, softcap and
    temperature, and with all three (the most registers; without the softcap where these tiles do
    not run it); the default plan's strided and aligned, another plan's aligned only.
    Built for a GPU: no interpreter upcast; fp32 dots in tf32 (torch's "high" matmul precision) and,
    for the soft-capped variant, also in ieee (the default "highest": the most registers)."""
    for plan, tiles, archs in _plan_tiles(dtype):
        default = plan == DEFAULT_PLAN
        layouts = ("strided", "aligned") if default else ("aligned",)
        # The larger build carries the softcap where these tiles run soft-capped launches too.
        capped = all(tiles_for(dtype, plan, softcap=True, arch=arch) == tiles for arch in archs)
        for has_bias, has_softcap in ((False, False), (True, capped)):
            # The "cublas" plan's kernels take no dot: their one fp32 build stands for both precisions.
            both = dtype == torch.float32 and has_softcap and not tiles.cublas_logits
            precisions = ("high", "highest") if both else ("high",)
            for precision in precisions:
                variant = (DTYPE_NAMES[dtype] + ("+bias" if has_bias else "") + ("+softcap" if has_softcap else "")
                           + ("+temperature" if has_bias else "")
                           + ("+ieee" if precision == "highest" else "") + ("" if plan == DEFAULT_PLAN else f" {plan}"))
                # A temperature rides with the bias: one more multiply per logit, in the larger build.
                constexprs = logits_constexprs(dtype, tiles, has_bias=has_bias, has_softcap=has_softcap,
                                               has_temperature=has_bias, interpreted=False,
                                               float32_matmul_precision=precision)
                yield LogitsBuild(plan, variant, constexprs, launch_options(tiles), layouts, archs,
                                  tiles.vocab_tiles_per_program == 1, tiles.cublas_logits)


@triton.jit
def dot_acc(a, b, acc, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def tanh(x):
    # One formula for the GPU and the interpreter, where libdevice.tanh does not run.  Near 0,
    # 2 sigmoid(2x) - 1 cancels (its error is ~ulp(1), absolute), which the GPU's approximate exp
    # turned into 3e-5 relative error in a vocabulary mean of soft-capped logits (H200,
    # 2026-11-26): below 1/8 the odd Taylor series to x^7 takes over (truncation under 2e-10).
    # Worst relative error in fp32: 1.1e-6, just above 1/8.
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    return tl.where(tl.abs(x) < 0.125, series, 2.0 * tl.sigmoid(2.0 * x) - 1.0)


@triton.jit
def row_tile_start(n_valid_ptr, row_tile, BLOCK_N: tl.constexpr):
    """``(p0, n_valid)``: where row tile ``row_tile``'s BLOCK_N rows start in the valid-first row
    index, and the number of valid rows, read on the device.  A program with ``p0 >= n_valid`` has
    no row to compute and returns at once (the kernel itself returns: a helper cannot return for
    it), so ignored tokens cost nothing and the host never synchronises."""
    return row_tile * BLOCK_N, tl.load(n_valid_ptr)


@triton.jit
def grouped_tile(n_row_tiles, n_vocab_tiles, n_group_rows):
    """``(row tile, vocabulary tile)`` of this program (1-D grid) in grouped order: ``n_group_rows``
    row tiles take each vocabulary tile in turn, so the programs running at once share their weight
    tiles through L2 instead of each reading them from HBM.  With ``n_group_rows == n_row_tiles``
    this is row-tile-fastest order, as a 2-D ``(rows, vocabulary)`` grid launches."""
    pid = tl.program_id(0)
    per_group = n_group_rows * n_vocab_tiles
    first_row_tile = (pid // per_group) * n_group_rows
    rows_here = tl.minimum(n_row_tiles - first_row_tile, n_group_rows)
    in_group = pid % per_group
    return first_row_tile + in_group % rows_here, in_group // rows_here


def group_rows(tiles: TileConfig, n_row_tiles: int) -> int:
    """``n_group_rows`` for ``grouped_tile``: the configuration's, at most every row tile."""
    return max(1, min(tiles.group_rows or n_row_tiles, n_row_tiles))


@triton.jit
def valid_rows(rows_ptr, n_valid, p0, T, stride_h_r, stride_h_t, BLOCK_N: tl.constexpr):
    """Rows ``p0 .. p0+BLOCK_N`` of the valid-first row index: (token id, hidden offset, mask)."""
    offs_p = p0 + tl.arange(0, BLOCK_N)
    p_mask = offs_p < n_valid
    row = tl.load(rows_ptr + offs_p, mask=p_mask, other=0).to(tl.int64)
    # hidden is addressed as [R, T, D] so that strided views such as h[:, :-1] need no copy.
    h_offset = (row // T) * stride_h_r + (row % T) * stride_h_t
    return offs_p, row, p_mask, h_offset


@triton.jit
def load_labels(labels_ptr, row, p_mask, V):
    """Labels of the gathered rows; one outside [0, V) (possible only with validate=False) becomes
    -1, so it can never match a padded vocabulary column of the last tile."""
    label = tl.load(labels_ptr + row, mask=p_mask, other=-1)
    return tl.where((label >= 0) & (label < V), label, -1)


@triton.jit
def labelled_rows(rows_ptr, labels_ptr, n_valid, p0, V, T, stride_h_r, stride_h_t, BLOCK_N: tl.constexpr):
    """``valid_rows`` and their labels (``load_labels``): what every logits-tile kernel starts with."""
    offs_p, row, p_mask, h_offset = valid_rows(rows_ptr, n_valid, p0, T, stride_h_r, stride_h_t, BLOCK_N)
    return offs_p, row, p_mask, h_offset, load_labels(labels_ptr, row, p_mask, V)


@triton.jit
def labelled_rows_lse(rows_ptr, labels_ptr, lse_ptr, n_valid, p0, V, T, stride_h_r, stride_h_t,
                      BLOCK_N: tl.constexpr):
    """``labelled_rows`` and the lse the forward stored for them: what both backward kernels start
    with.  The lse is loaded here, before the logits loop: loaded after it (in ``logp_grad_tile``)
    it cost the backward kernels up to 51 more registers (ptxas, sm_80: 193 -> 244)."""
    offs_p, row, p_mask, h_offset, label = labelled_rows(rows_ptr, labels_ptr, n_valid, p0, V, T,
                                                         stride_h_r, stride_h_t, BLOCK_N)
    return offs_p, row, p_mask, h_offset, label, tl.load(lse_ptr + row, mask=p_mask, other=0.0)


@triton.jit
def logits_tile(
    h_ptr, w_ptr, b_ptr,
    h_offset, p_mask, v0,
    V, D,
    stride_h_d, stride_w_v, stride_w_d,
    softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """fp32 logits of BLOCK_N gathered rows against vocabulary entries ``v0 .. v0+BLOCK_V``."""
    offs_v = v0 + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    w_row = offs_v.to(tl.int64) * stride_w_v
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(
            h_ptr + h_offset[:, None] + offs_d[None, :] * stride_h_d,
            mask=p_mask[:, None] & d_mask[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + w_row[None, :] + offs_d[:, None] * stride_w_d,
            mask=d_mask[:, None] & v_mask[None, :], other=0.0,
        )
        acc = dot_acc(h, w, acc, DOT_IN_FP32, DOT_PRECISION)
    # The bias is added once per tile, after the whole D loop (CCE added it per D-block).
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return transform_logits(acc, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE), offs_v, v_mask


@triton.jit
def stored_logits(z_rows, b_ptr, r_mask, v0, v_end, softcap, inv_temperature,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """``logits_tile``'s logits from products cuBLAS stored in fp32: columns ``v0 .. v0+BLOCK_V`` (those
    before ``v_end``) of the rows at ``z_rows`` (``[rows, 1]`` pointers to each row's column 0),
    plus the bias, transformed.  Returns ``(z, offs_v, mask)``, the mask 2-D."""
    offs_v = v0 + tl.arange(0, BLOCK_V)
    v_mask = offs_v < v_end
    mask = r_mask[:, None] & v_mask[None, :]
    z = tl.load(z_rows + offs_v[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return transform_logits(z, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE), offs_v, mask


@triton.jit
def transform_logits(z, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """``softcap * tanh(z / softcap)`` (Gemma-2), then ``/ temperature`` (GRPO's sampling temperature)."""
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    if HAS_TEMPERATURE:
        z = z * inv_temperature
    return z


@triton.jit
def logp_grad_tile(z, offs_v, label, lse, softcap, inv_temperature,
                   HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """d logp / d (the product's logit u) for a tile of ``z = c * tanh(u / c) / T``:
    ``onehot(label) - softmax(z)``, taken to ``u`` by ``chain_to_product``."""
    dz = tl.where(offs_v[None, :] == label[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None])
    return chain_to_product(dz, z, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)


@triton.jit
def chain_to_product(dz, z, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """A gradient with respect to the logits ``z = c * tanh(u / c) / T`` taken to the product's
    ``u``: times ``1 / T`` under a temperature and ``1 - tanh^2 = 1 - (z T / c)^2`` under a softcap."""
    if HAS_TEMPERATURE:
        dz = dz * inv_temperature
    if HAS_SOFTCAP:
        capped = z / softcap
        if HAS_TEMPERATURE:
            capped = capped / inv_temperature
        dz = dz * (1.0 - capped * capped)
    return dz
