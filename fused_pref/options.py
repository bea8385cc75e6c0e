"""The keyword arguments every public function shares: how the batch is laid out and how the kernels
run (not a loss's hyper-parameters, which each function names itself).

They are checked once, when :class:`Options` is made, and travel as that one frozen object through
``fused_pref.functional``, ``fused_pref.reference`` and the modules; the kernels see them only as
the launch arguments ``fused_pref/ops.py`` flattens them into.  Every public function takes each
field as a keyword (``@takes_options`` puts them in its signature, defaults included), so adding an
option is a field here, its check in ``validation.check_options``, the code that reads it, and a
line in the README.
"""

import dataclasses
import functools
import inspect
import os
import warnings
from dataclasses import dataclass

import torch

from . import validation
from .distributed import from_dtensors
from .kernels import KERNELS_INTERPRETED, WORKSPACE_BYTES, interpreter_problem


# eq=False: fields hold tensors and process groups, whose == is no verdict; options compare by identity.
@dataclass(frozen=True, eq=False)
class Options:
    """``ignore_index``: the label of tokens that carry no target.  ``softcap``: Gemma-2's
    ``z = softcap * tanh(z / softcap)`` on the logits, or None.  ``temperature``: the logits divided
    by it (after the softcap) before the softmax, as GRPO and PPO score sampled completions; a
    kernel scalar, ``hidden`` is never scaled or copied.  ``shift``: labels aligned with the
    input ids, as Hugging Face models take them (``hidden[t]`` predicts ``labels[t + 1]``).
    ``cu_seqlens``: ``[R + 1]`` sequence boundaries of a packed batch.  ``process_group`` and
    ``vocab_start``: vocabulary parallelism (``fused_pref.distributed``).  ``backward``: ``"auto"``
    or ``"chunked"``, the same exact V-chunked backward (``"fused"``, the atomic one, was removed);
    ``"in_forward"`` computes the gradients of a mean or summed cross-entropy, or of a pair loss,
    inside its forward (:mod:`fused_pref.gradient_in_forward`: 6NDV instead of 8NDV, for 4VD bytes
    more memory); per-sequence log-probs that need no gradient (a reference model's) come from its
    products alone.
    ``plan``: the tile plan the kernels run (``fused_pref.kernels.tiles.PLANS``), or None: the
    one ``tile_plan`` makes active where the call runs.  Per call, it holds wherever the call runs
    again: a checkpoint's recompute runs in the backward, outside a ``with tile_plan(...)`` around
    the forward.  Not with ``"in_forward"``, whose products are cuBLAS's own.
    ``deterministic``: kept for the callers that pass it; every backward is deterministic.
    ``workspace_bytes``: the most bytes the chunked backward's ``dz`` workspace may hold (it also
    never exceeds 1/16 of the logits, nor goes below one 128-column block), and the forward's
    partial log-sum-exps, and ``"in_forward"``'s block of logits.  ``validate``: the value
    checks that need a host sync (label range, empty sequences, ``cu_seqlens``).  ``backend``:
    ``"auto"``, ``"triton"`` or ``"reference"`` (see :func:`use_triton`)."""

    ignore_index: int = -100
    softcap: float | None = None
    temperature: float = 1.0
    shift: bool = False
    cu_seqlens: torch.Tensor | None = None
    process_group: object = None
    vocab_start: int | None = None
    backward: str = "auto"
    plan: str | None = None
    deterministic: bool | None = None
    workspace_bytes: int = WORKSPACE_BYTES
    validate: bool = True
    backend: str = "auto"

    def __post_init__(self):
        # The fields one by one: torch 2.11's dynamo cannot trace a dataclass's __dict__.
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, validation.python_scalar(getattr(self, f.name)))
        validation.check_options(self)
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))
        object.__setattr__(self, "temperature", float(self.temperature))


FIELDS = tuple(f.name for f in dataclasses.fields(Options))
# Per-batch tensors: a module takes them in ``forward``, not in its constructor.
PER_BATCH = ("cu_seqlens",)


def option_parameters(exclude=()) -> list[inspect.Parameter]:
    """The options as keyword-only parameters with their defaults, for a signature."""
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
            for f in dataclasses.fields(Options) if f.name not in exclude]


def takes_options(impl):
    """``impl(hidden, ..., *, <its own keywords>, options)`` as a public function that takes every
    option as a keyword instead of ``options``: its signature lists them with their defaults, and
    ``.with_options(..., options=...)`` calls ``impl`` with an :class:`Options` already made.
    DTensor arguments become the call they describe (:func:`fused_pref.distributed.from_dtensors`)."""
    signature = inspect.signature(impl)
    own = [p for name, p in signature.parameters.items() if name != "options"]
    assert len(own) < len(signature.parameters), f"{impl.__name__} takes no options"

    @functools.wraps(impl)
    def public(*args, **kwargs):
        kwargs = validation.python_scalars(kwargs)
        options = Options(**{name: kwargs.pop(name) for name in FIELDS if name in kwargs})
        args, kwargs, options = from_dtensors(args, kwargs, options)
        return impl(*args, **kwargs, options=options)

    public.__signature__ = signature.replace(parameters=own + option_parameters())
    public.with_options = impl
    return public


# Asked once: the installed versions do not change in a process, and torch 2.11's dynamo cannot
# trace the package-metadata lookup in a compiled call.
_INTERPRETER_PROBLEM = interpreter_problem() if KERNELS_INTERPRETED else None


def use_triton(hidden, options: Options) -> bool:
    """The device policy: CUDA tensors take the Triton kernels; CPU tensors take them under Triton's
    interpreter (``TRITON_INTERPRET=1`` set before import), otherwise the reference, with a
    one-time warning.  ``backend="triton"`` or ``"reference"`` forces a path."""
    if not isinstance(hidden, torch.Tensor):
        return True  # the fused path's checks name the argument
    device, backend = hidden.device, options.backend
    interpreted = device.type == "cpu" and KERNELS_INTERPRETED
    runnable = device.type == "cuda" or interpreted
    if interpreted and backend != "reference":
        validation.check_interpreter(_INTERPRETER_PROBLEM)
    validation.check_backend_runs(backend, runnable, device)
    triton = backend == "triton" or (backend == "auto" and runnable)
    if backend == "auto" and not runnable:
        _warn_cpu_fallback(device)
    return triton


_warned_cpu_fallback = False


def _warn_cpu_fallback(device):
    global _warned_cpu_fallback
    if _warned_cpu_fallback:
        return
    _warned_cpu_fallback = True
    warnings.warn(f"fused_pref: no Triton backend for {device} tensors (only CUDA tensors, or CPU tensors with "
                  "TRITON_INTERPRET=1 set before import); using the PyTorch reference, which materializes the "
                  "logits", stacklevel=_caller_stacklevel())


# Frames of this package and of torch (nn.Module's __call__) between the user's line and the warning.
_SKIPPED = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (validation, torch))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that names the user's line: the first frame outside this package and torch,
    however many of our wrappers, modules and integrations the call went through."""
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_SKIPPED):
        frame, level = frame.f_back, level + 1
    return level
