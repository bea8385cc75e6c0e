"""Record the tensors an operation allocates, through a TorchDispatchMode.

``AllocationRecorder`` lists every allocation (the memory tests use it to prove that the fused path
never allocates a ``[tokens, vocab]`` tensor); ``LiveBytesRecorder`` also follows each storage to
its release and gives the peak of live bytes, the figure ``python -m fused_pref memory`` reports.
Both see only what PyTorch allocates, on any device, so they work on the CPU.
"""

import gc
import weakref
from dataclasses import dataclass

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


def _new_tensors(args, kwargs, out):
    """Tensors in ``out`` whose storage no input shares (views and in-place results are not new)."""
    inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
              if isinstance(t, torch.Tensor)}
    return [t for t in tree_flatten(out)[0]
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]


_BACKEND_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


class _RecordingMode(TorchDispatchMode):
    """Calls ``_record(func, new tensors)`` for every op, custom ops included.

    A mode is switched off while it handles an op, so it would see a custom op (the library's
    ``torch.library.custom_op`` kernels) as one call and miss every temporary inside it.  A custom
    op is therefore run here through its backend kernel with the mode switched back on: its inner
    ops come through one by one, and its outputs are among theirs.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prim", "prims"):
            device = next(t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
            keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _BACKEND_KEYS[device.type]))
            with self:
                out = func.redispatch(keys, *args, **kwargs)
            self._after_custom_op()
            return out
        out = func(*args, **kwargs)
        self._record(func, _new_tensors(args, kwargs, out))
        return out

    def _record(self, func, tensors):
        raise NotImplementedError

    def _after_custom_op(self):
        pass


class AllocationRecorder(_RecordingMode):
    """``with AllocationRecorder() as rec: ...`` then ``rec.largest()``: every tensor an op returned
    whose storage it did not share with an input (views are not allocations)."""

    def __init__(self):
        super().__init__()
        self.allocations: list[Allocation] = []

    def _record(self, func, tensors):
        self.allocations += [Allocation(str(func), tuple(t.shape), t.dtype) for t in tensors]

    def largest(self) -> Allocation:
        return max(self.allocations, key=lambda a: a.numel)


@dataclass(frozen=True)
class LiveStorage:
    """One storage allocated under the recorder: its size and the op and tensor that made it."""

    nbytes: int
    op: str
    shape: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class Peak:
    nbytes: int                      # live bytes at the peak
    live: tuple[LiveStorage, ...]    # what was live then, largest first


class LiveBytesRecorder(_RecordingMode):
    """``with LiveBytesRecorder() as rec: step()`` then ``rec.peak(exclude=[...])``.

    Logs each new storage an op returns and, through a finalizer on the storage (PyTorch keeps a
    storage's Python object alive exactly as long as the storage), its release.  Storages that
    existed before the recorder (the inputs) are never counted; ``peak(exclude=...)`` also leaves
    out the storages of the given tensors (the gradients), wherever they were made.

    ``collect_garbage=True`` runs the garbage collector after every custom op.  Triton's
    interpreter keeps each launch's arguments in a reference cycle (a dict of their storages), so
    under it a buffer dropped inside a kernel op (the forward's partial sums) lives on until the
    collector happens to run, and the peak would depend on when that was; on a GPU the buffer goes
    when the op returns, and so it does here.
    """

    def __init__(self, collect_garbage=False):
        super().__init__()
        self.collect_garbage = collect_garbage
        self._storages: list[LiveStorage] = []
        self._events: list[tuple[int, int]] = []   # (+1 alloc / -1 free, index into _storages)
        self._live: dict[int, int] = {}              # data_ptr -> index, storages alive now

    def _record(self, func, tensors):
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() == 0 or ptr in self._live:
                continue
            index = len(self._storages)
            self._storages.append(LiveStorage(storage.nbytes(), str(func), tuple(t.shape), t.dtype))
            self._live[ptr] = index
            self._events.append((1, index))
            weakref.finalize(storage, self._release, ptr, index)

    def _after_custom_op(self):
        if self.collect_garbage:
            gc.collect()

    def _release(self, ptr, index):
        if self._live.get(ptr) == index:
            del self._live[ptr]
        self._events.append((-1, index))

    def peak(self, exclude=()) -> Peak:
        """Peak of live recorded bytes, leaving out the storages of the tensors in ``exclude``."""
        skip = {self._live[t.untyped_storage().data_ptr()] for t in exclude
                if t is not None and t.untyped_storage().data_ptr() in self._live}
        live, best, best_live = set(), 0, set()
        total = 0
        for sign, index in self._events:
            if index in skip:
                continue
            total += sign * self._storages[index].nbytes
            (live.add if sign > 0 else live.discard)(index)
            if total > best:
                best, best_live = total, set(live)
        storages = sorted((self._storages[i] for i in best_live), key=lambda s: -s.nbytes)
        return Peak(best, tuple(storages))
