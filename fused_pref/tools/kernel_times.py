"""Where a step's GPU time goes: the kernels one call runs, by torch's profiler, summed per family.

``bench`` times each implementation end to end (``do_bench``'s median); this adds, per results row,
one profiled call's GPU time split into the Triton kernels (each under its own name, ours and the
peers'), cuBLAS's products, torch's own kernels (elementwise, reductions, gathers) and copies and
fills.  So one GPU run tells which part of a path is short of its model in ``benchmarks/NOTES.md``
(the forward kernel, the ``dz`` kernel, the products), not only by how much.  The split is of one
call, not a median: a few percent of noise, and the profiler's own launch overhead is not in it
(it counts GPU time only).
"""

import torch

GEMM = "cuBLAS products"
TORCH_KERNELS = "torch's kernels"
COPIES = "copies and fills"
INDUCTOR = "Inductor's kernels"
# GPU-side events that are waits, not work (recorded where CUDA sync events are switched on).
_WAITS = ("Context Sync", "Stream Sync", "Event Sync")
# Substrings of the names of cuBLAS's (and cuBLASLt's) kernels: sm90_xmma_gemm_..., nvjet_... on
# Hopper with CUDA 12.8 and later, cutlass_80_tensorop_... and ..._gemm_... elsewhere.
_GEMM_MARKERS = ("gemm", "nvjet", "cutlass", "xmma")


def kernel_family(name: str) -> str:
    """The family a GPU kernel's ``name`` (as the profiler reports it) is summed under: a Triton
    kernel keeps its function's name; the others are grouped."""
    lowered = name.lower()
    if any(marker in lowered for marker in _GEMM_MARKERS):
        return GEMM
    if lowered.startswith(("memset", "memcpy")):
        return COPIES
    if name.startswith("triton_"):
        return INDUCTOR
    if "::" in name or " " in name or "<" in name:
        return TORCH_KERNELS
    return name


def by_family(kernels) -> dict[str, float]:
    """``(name, microseconds)`` pairs summed per ``kernel_family``, in milliseconds, largest first."""
    totals = {}
    for name, us in kernels:
        family = kernel_family(name)
        totals[family] = totals.get(family, 0.0) + us / 1e3
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def kernel_times(step) -> dict[str, float]:
    """Milliseconds of GPU time per kernel family in one call of ``step`` (CUDA); raises where the
    profiler saw no GPU work (CUPTI unavailable), so that no row reads as profiled and empty."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        step()
        torch.cuda.synchronize()
    # GPU-side events only (kernels, copies, fills); user annotations mirrored on the GPU span
    # kernels already counted, and sync events are waits.
    times = by_family((event.name, event.time_range.elapsed_us()) for event in profiler.events()
                      if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
                      and event.name not in _WAITS)
    if not times:
        raise RuntimeError("the profiler recorded no GPU kernel (is CUPTI available?)")
    return times


__all__ = ["by_family", "kernel_family", "kernel_times"]
