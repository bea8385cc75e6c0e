"""Record every tensor an operation allocates, through a TorchDispatchMode.

Used by the memory tests to prove that the fused path never allocates a ``[tokens, vocab]``
tensor, at any dtype, forward or backward.
"""

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Allocation:
    op: str
    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class AllocationRecorder(TorchDispatchMode):
    """``with AllocationRecorder() as rec: ...`` then ``rec.largest()``: every tensor an op returned
    whose storage it did not share with an input (views are not allocations)."""

    allocations: list[Allocation] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append(Allocation(str(func), tuple(t.shape), t.dtype))
        return out

    def largest(self) -> Allocation:
        return max(self.allocations, key=lambda a: a.numel)
