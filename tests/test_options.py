"""The options every public function shares (``fused_pref.options.Options``): one signature for the fused
path, the reference and the modules; checked once, when made, with the same message everywhere; the
workspace bound they carry to the backward; no host read without validation.  (The CPU fallback's
warning and errors: ``test_api.py``.)"""

import dataclasses
import fractions
import inspect

import pytest
import torch

import fused_pref
from fused_pref.options import PER_BATCH, Options
from fused_pref.testing import CASES, FUNCTIONS, count_host_reads, make_inputs, relative_error, value_of
from fused_pref.tools.memory import AllocationRecorder

OPTION_NAMES = [f.name for f in dataclasses.fields(Options)]
MODULES = {"simpo_loss": fused_pref.FusedSimPOLoss, "cpo_loss": fused_pref.FusedCPOLoss,
           "orpo_loss": fused_pref.FusedORPOLoss, "dpo_loss": fused_pref.FusedDPOLoss,
           "linear_cross_entropy": fused_pref.FusedLinearCrossEntropyLoss}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_fused_and_reference_share_one_signature_with_every_option(name):
    fused = inspect.signature(getattr(fused_pref, name))
    reference = inspect.signature(getattr(fused_pref.reference, name))
    assert fused == reference
    options = {p.name: p for p in fused.parameters.values() if p.name in OPTION_NAMES}
    assert list(options) == OPTION_NAMES
    for field in dataclasses.fields(Options):
        assert options[field.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert options[field.name].default == field.default, field.name


@pytest.mark.parametrize("name", MODULES)
def test_modules_take_every_option_but_the_per_batch_ones(name):
    parameters = inspect.signature(MODULES[name]).parameters
    assert [p for p in parameters if p in OPTION_NAMES] == [n for n in OPTION_NAMES if n not in PER_BATCH]
    own = [p for p in parameters if p not in OPTION_NAMES]
    function = [p for p in inspect.signature(getattr(fused_pref, name)).parameters
                if p not in OPTION_NAMES and p not in ("hidden", "weight", "labels", "bias")
                and not p.startswith("ref_")]
    assert own == function, "the module's hyper-parameters are its function's"
    with pytest.raises(TypeError, match=r"takes \['cu_seqlens'\] in forward, not in its constructor"):
        MODULES[name](cu_seqlens=torch.tensor([0, 4]))


BAD_OPTIONS = [
    pytest.param({"shift": 1}, TypeError, r"^shift must be a bool, got int", id="shift-int"),
    pytest.param({"validate": "no"}, TypeError, r"^validate must be a bool, got str", id="validate-str"),
    pytest.param({"workspace_bytes": 0}, ValueError, r"^workspace_bytes must be a positive int, got 0", id="ws-0"),
    pytest.param({"workspace_bytes": 1e6}, ValueError, r"^workspace_bytes must be a positive int, got 1000000.0",
                 id="ws-float"),
    pytest.param({"backend": "cuda"}, ValueError, r"^backend must be one of \('auto', 'triton', 'reference'\)",
                 id="backend"),
    pytest.param({"softcap": 0.0}, ValueError, r"^softcap must be a positive number or None, got 0.0", id="softcap-0"),
    pytest.param({"vocab_start": 3}, ValueError, r"^vocab_start is only meaningful with a process_group$",
                 id="vocab_start"),
]


@pytest.mark.parametrize("kwargs, cls, pattern", BAD_OPTIONS)
def test_options_are_checked_once_with_one_message_everywhere(kwargs, cls, pattern, device):
    x = make_inputs(2, 5, 8, 11, device=device)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    for module in (fused_pref, fused_pref.reference):
        with pytest.raises(cls, match=pattern):
            module.linear_cross_entropy(*args, **kwargs)
    with pytest.raises(cls, match=pattern):
        fused_pref.FusedLinearCrossEntropyLoss(**kwargs)      # at construction, not at the first batch
    with pytest.raises(cls, match=pattern):
        Options(**kwargs)


NUMPY_CASES = ("simpo_loss", "dpo_loss[ipo]", "linear_cross_entropy[smoothing,z_loss]", "kto_loss", "grpo_loss")


@pytest.mark.parametrize("name", NUMPY_CASES)
def test_numpy_scalars_are_the_numbers_they_hold(name, device):
    # From a config file or a sweep: np.float32 is no Python float, and refusing it, or handing it
    # to a kernel launch, would fail a call whose values are fine.
    np = pytest.importorskip("numpy")
    case = CASES[name].with_kwargs(softcap=30.0, temperature=0.7, ignore_index=-100)
    as_numpy = {k: np.float32(v) if isinstance(v, float) else np.int64(v) if type(v) is int else v
                for k, v in case.kwargs.items()}
    held = {k: v.item() if isinstance(v, np.generic) else v for k, v in as_numpy.items()}
    assert held["temperature"] != 0.7, "a value that float32 changes tells the calls apart"
    x = make_inputs(2, 5, 24, 37, device=device)
    x64 = {k: v.cpu().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in x.items()}
    for module, inputs in ((fused_pref, x), (fused_pref.reference, x64)):
        expected = value_of(case.with_kwargs(**held)(module, inputs))
        assert torch.equal(value_of(case.with_kwargs(**as_numpy)(module, inputs)), expected)


def test_numpy_scalars_in_modules_and_options():
    np = pytest.importorskip("numpy")
    module = fused_pref.FusedSimPOLoss(beta=np.float32(0.5), softcap=np.float32(30.0), ignore_index=np.int64(-1))
    assert module.hyper["beta"] == 0.5 and type(module.hyper["beta"]) is float
    assert module.options.softcap == 30.0 and module.options.ignore_index == -1
    assert type(module.options.ignore_index) is int
    with pytest.raises(ValueError, match=r"^beta must be a positive number, got -0.5"):
        fused_pref.FusedSimPOLoss(beta=np.float32(-0.5))
    with pytest.raises(TypeError, match=r"^shift must be a bool, got int"):
        Options(shift=np.int64(1))
    assert Options(shift=np.bool_(True)).shift is True
    # Any real number is the float it is: a Fraction passed the check and then failed in PyTorch.
    x = make_inputs(2, 5, 24, 37)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    assert torch.equal(fused_pref.linear_cross_entropy(*args, label_smoothing=fractions.Fraction(1, 8)),
                       fused_pref.linear_cross_entropy(*args, label_smoothing=0.125))
    # The Liger-compatible modules call the functions' .with_options, past the public wrappers: the
    # spec makes the launch's numbers Python floats (a GPU launch refuses NumPy's; the interpreter not).
    spec = fused_pref.arguments.simpo_loss(beta=np.float32(0.3), gamma=np.float32(0.5), label_smoothing=0.0,
                                           sft_weight=np.float32(0.1), token_metrics=False, options=Options())
    assert all(type(getattr(spec, name)) is float for name in ("beta", "gamma", "sft_weight"))


def test_unknown_keyword_names_the_function():
    x = make_inputs(2, 5, 8, 11)
    with pytest.raises(TypeError, match=r"^simpo_loss\(\) got an unexpected keyword argument 'softcapp'"):
        fused_pref.simpo_loss(x["hidden"], x["weight"], x["labels"], softcapp=30.0)


def _workspace_columns(x, **options):
    """Columns of the chunked backward's ``dz`` workspace, ``[valid tokens, C]``, in one step."""
    with AllocationRecorder() as recorder:
        fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], **options).backward()
    n_valid, D = int((x["labels"] != -100).sum()), x["hidden"].shape[-1]
    columns = {a.shape[1] for a in recorder.allocations if len(a.shape) == 2 and a.shape[0] == n_valid
               and a.shape[1] != D}
    assert len(columns) == 1, columns
    return columns.pop(), n_valid


@pytest.mark.parametrize("budget_columns, columns", [(0, 128), (200, 128), (300, 256)])
def test_workspace_bytes_bounds_the_backward_workspace(budget_columns, columns, device):
    # V = 8209: by default a chunk is V/16 = 512 columns.  A budget below that shrinks it, to a
    # multiple of the 128-column block, and down to one block at the least; the gradients do not
    # change beyond summation order.
    x = make_inputs(2, 35, 40, 8209, device=device, bias=False)
    default, n_valid = _workspace_columns(x)
    default_grads = [t.grad.clone() for t in (x["hidden"], x["weight"])]
    for t in (x["hidden"], x["weight"]):
        t.grad = None
    workspace_bytes = max(1, budget_columns * n_valid * 4)
    assert (default, _workspace_columns(x, workspace_bytes=workspace_bytes)[0]) == (512, columns)
    assert columns * n_valid * 4 <= max(workspace_bytes, 128 * n_valid * 4)
    for ours, theirs in zip((x["hidden"].grad, x["weight"].grad), default_grads):
        assert relative_error(ours, theirs) < 1e-6


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_validate_false_reads_nothing_back_to_the_host(case, device):
    # The only host synchronisations are validation's (DESIGN.md section 4): without it a step runs
    # ahead of the device.  On a GPU, CUDA's own sync detector checks what Python cannot see.
    x = make_inputs(4, 7, 40, 101, device=device)
    quiet = case.with_kwargs(validate=False)
    value_of(quiet(fused_pref, x)).sum().backward()   # compile and warm up first
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with count_host_reads() as reads:
            value_of(quiet(fused_pref, x)).sum().backward()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert not reads, reads
    with count_host_reads() as reads:                  # the counter counts: validation reads
        value_of(case(fused_pref, x)).sum().backward()
    assert reads
