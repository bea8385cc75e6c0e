"""The memory accounting (``python -m fused_pref memory``): the live-bytes recorder, the fused path's
peak extra memory growing with the workspace and not with tokens x vocabulary, the fitted formulas
against the analytic ones, and the command's output."""

import torch

from fused_pref.memory import AllocationRecorder, LiveBytesRecorder


def test_live_bytes_recorder_follows_each_storage_to_its_release():
    with LiveBytesRecorder() as recorder:
        a = torch.ones(1000)            # 4000 B
        view = a[10:]                   # a view: no new storage
        b = torch.ones(2000)            # 8000 B: the peak, 12000 B
        del a, view, b
        c = torch.ones(100)             # 400 B, alive at the end
        grad = torch.ones(10)           # 40 B, to be excluded as a gradient
    assert recorder.peak().nbytes == 12000
    assert recorder.peak(exclude=[c]).nbytes == 12000
    assert [s.nbytes for s in recorder.peak().live] == [8000, 4000]
    del c
    assert recorder.peak(exclude=[grad]).nbytes == 12000


@torch.library.custom_op("fused_pref_test::with_temporary", mutates_args=())
def _with_temporary(x: torch.Tensor) -> torch.Tensor:
    temporary = torch.ones(1000, device=x.device)   # 4000 B, freed before the op returns
    return x + temporary[:1]


def test_recorders_see_inside_custom_ops():
    # The library's kernels are custom ops: a mode sees them as one call unless it enters them.
    x = torch.ones(10)
    with LiveBytesRecorder() as live, AllocationRecorder() as allocations:
        y = _with_temporary(x)
    assert live.peak(exclude=[y]).nbytes == 4000
    assert [a.numel for a in allocations.allocations] == [1000, 10]
