"""The device policy, the module wrappers and the `python -m fused_pref check` command."""

import os
import re
import subprocess
import sys

import pytest
import torch

import fused_pref
from fused_pref.testing import CASES, Case, as_reference, make_inputs, relative_error, value_of
from fused_pref.tools.memory import AllocationRecorder


def _run_without_interpreter(code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_cpu_without_interpreter_falls_back_to_reference_with_one_warning():
    done = _run_without_interpreter(
        "import warnings, torch, fused_pref as fp\n"
        "from fused_pref.testing import make_inputs\n"
        "x = make_inputs(2, 7, 40, 257)\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    a = fp.simpo_loss(x['hidden'], x['weight'], x['labels'], x['bias']).loss\n"
        "    b = fp.simpo_loss(x['hidden'], x['weight'], x['labels'], x['bias']).loss\n"
        "ref = fp.reference.simpo_loss(x['hidden'], x['weight'], x['labels'], x['bias']).loss\n"
        "print(len([w for w in seen if 'reference' in str(w.message)]), bool(a == ref), bool(b == ref))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True", "True"]


@pytest.mark.parametrize("value, interpreted", [("false", False), ("off", False), ("0", False), ("true", True),
                                                ("1", True)])
def test_triton_interpret_is_read_as_triton_reads_it(value, interpreted):
    # "false" read as on would send CPU tensors to kernels that Triton compiles for a GPU: the flag
    # must say what Triton made of the kernels when they were defined.
    env = {**os.environ, "TRITON_INTERPRET": value, "CUDA_VISIBLE_DEVICES": ""}
    code = ("import fused_pref; from fused_pref.kernels import linear_lse; "
            "print(fused_pref.kernels.KERNELS_INTERPRETED, type(linear_lse.linear_lse_kernel).__name__)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(interpreted), "InterpretedFunction" if interpreted else "JITFunction"]


def test_compare_refuses_cpu_inputs_without_the_interpreter():
    # Else the parity harness would compare the reference with itself and pass.
    done = _run_without_interpreter(
        "from fused_pref.testing import compare, make_inputs\n"
        "x = make_inputs(2, 7, 40, 257)\n"
        "compare(lambda m, x: m.simpo_loss(x['hidden'], x['weight'], x['labels'], x['bias']).loss, x)\n"
    )
    assert done.returncode == 1 and "RuntimeError: compare checks fused_pref's kernels" in done.stderr, done.stderr


def test_cpu_fallback_warning_names_the_callers_line():
    # A module call goes through nn.Module.__call__, the module, the public wrapper and the device
    # policy: the warning must still point at the line that called the loss.
    done = _run_without_interpreter(
        "import warnings, fused_pref as fp\n"
        "from fused_pref.testing import make_inputs\n"
        "x = make_inputs(2, 7, 40, 257)\n"
        "loss = fp.FusedSimPOLoss()\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    loss(x['hidden'], x['weight'], x['labels'])\n"
        "print([(w.filename, w.lineno) for w in seen])\n"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == ["[('<string>', 7)]"], lines


def test_forcing_triton_on_cpu_without_interpreter_is_an_error():
    done = _run_without_interpreter(
        "import fused_pref as fp\n"
        "from fused_pref.testing import make_inputs\n"
        "x = make_inputs(2, 7, 40, 257)\n"
        "try:\n"
        "    fp.linear_cross_entropy(x['hidden'], x['weight'], x['labels'], backend='triton')\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ValueError backend='triton' cannot run on cpu tensors"), done.stdout


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_backend_picks_the_path(backend, device):
    # Where the kernels run (CUDA, or the interpreter here), "auto" takes them; only the reference
    # materializes [tokens, vocab] logits, which tells the paths apart.  Each agrees with fp64.
    x = make_inputs(2, 7, 40, 257, device=device)
    with AllocationRecorder() as recorder:
        out = fused_pref.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], backend=backend)
    logits = [a for a in recorder.allocations if a.numel >= 2 * 7 * 257]
    assert bool(logits) == (backend == "reference"), logits
    ref = fused_pref.reference.linear_cross_entropy(**as_reference(x))
    assert relative_error(out, ref) < 1e-5


MODULE_CASES = {
    "simpo": (fused_pref.FusedSimPOLoss, fused_pref.simpo_loss, dict(beta=2.5, gamma=0.3, softcap=30.0)),
    "cpo": (fused_pref.FusedCPOLoss, fused_pref.cpo_loss, dict(beta=0.2, sft_weight=0.5)),
    "orpo": (fused_pref.FusedORPOLoss, fused_pref.orpo_loss, dict(beta=0.3, shift=True)),
    "cross_entropy": (fused_pref.FusedLinearCrossEntropyLoss, fused_pref.linear_cross_entropy, dict(reduction="sum")),
}


@pytest.mark.parametrize("case", MODULE_CASES.values(), ids=MODULE_CASES.keys())
def test_modules_equal_functions(case, device):
    module_cls, function, options = case
    x = make_inputs(4, 23, 97, 1003, device=device)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    module = module_cls(**options)
    assert all(f"{k}={v!r}" in repr(module) for k, v in options.items())
    ours, theirs = module(*args), function(*args, **options)
    ours, theirs = (ours.loss, theirs.loss) if hasattr(ours, "loss") else (ours, theirs)
    assert torch.equal(ours, theirs)


# A value its function refuses at every call, refused when the module is built: the same message.
BAD_MODULES = {
    "simpo-beta": (fused_pref.FusedSimPOLoss, dict(beta=-1.0), ValueError, r"^beta must be a positive number"),
    "cpo-token_metrics": (fused_pref.FusedCPOLoss, dict(token_metrics=1), TypeError, r"^token_metrics must be a bool"),
    "orpo-beta": (fused_pref.FusedORPOLoss, dict(beta=0), ValueError, r"^beta must be a positive number"),
    "dpo-loss_type": (fused_pref.FusedDPOLoss, dict(loss_type="sigmod"), ValueError, r"^loss_type must be one of"),
    "dpo-aot-in_forward": (fused_pref.FusedDPOLoss, dict(loss_type="aot", backward="in_forward"), ValueError,
                           r"^backward='in_forward' does not run with loss_type='aot'"),
    "kto-in_forward": (fused_pref.FusedKTOLoss, dict(backward="in_forward"), ValueError,
                       r"^backward='in_forward' computes the gradients inside the forward"),
    "ce-reduction": (fused_pref.FusedLinearCrossEntropyLoss, dict(reduction="avg"), ValueError,
                     r"^reduction must be one of"),
    "ce-smoothing-in_forward": (fused_pref.FusedLinearCrossEntropyLoss, dict(label_smoothing=0.1,
                                backward="in_forward"), ValueError, r"^label_smoothing does not run with backward="),
    "ce-ce_weight": (fused_pref.FusedLinearCrossEntropyLoss, dict(ce_weight=[1.0]), TypeError,
                     r"^ce_weight must be a floating-point torch.Tensor"),
    "grpo-in_forward": (fused_pref.FusedGRPOLoss, dict(backward="in_forward"), ValueError,
                        r"^backward='in_forward' computes the gradients inside the forward"),
}


@pytest.mark.parametrize("case", BAD_MODULES.values(), ids=BAD_MODULES.keys())
def test_modules_refuse_what_their_function_refuses_when_built(case, device):
    module_cls, kwargs, cls, pattern = case
    with pytest.raises(cls, match=pattern):
        module_cls(**kwargs)
    x = make_inputs(4, 7, 16, 37, device=device)
    batch = {fused_pref.FusedDPOLoss: dict(ref_logps=torch.zeros(4, device=device)),
             fused_pref.FusedKTOLoss: dict(desirable=torch.ones(4, dtype=torch.bool, device=device), kl=0.0,
                                           ref_logps=torch.zeros(4, device=device)),
             fused_pref.FusedGRPOLoss: dict(advantages=torch.ones(4, device=device))}.get(module_cls, {})
    with pytest.raises(cls, match=pattern):
        module_cls.function(x["hidden"], x["weight"], x["labels"], x["bias"], **kwargs, **batch)


def test_cross_entropy_module_holds_its_class_weights_as_a_buffer(device):
    # As nn.CrossEntropyLoss's weight: moved and cast with the module, saved in its state_dict.
    ce_weight = torch.rand(1003, generator=torch.Generator().manual_seed(4))
    module = fused_pref.FusedLinearCrossEntropyLoss(ce_weight=ce_weight).to(device)
    assert module.ce_weight.device.type == device and list(module.state_dict()) == ["ce_weight"]
    x = make_inputs(4, 23, 97, 1003, device=device)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    assert torch.equal(module(*args), fused_pref.linear_cross_entropy(*args, ce_weight=ce_weight.to(device)))
    assert module.double().ce_weight.dtype == torch.float64
    assert list(fused_pref.FusedLinearCrossEntropyLoss().state_dict()) == []


def test_dpo_module_takes_reference_inputs_in_forward(device):
    x = make_inputs(4, 23, 97, 1003, device=device)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    ref_logps = -torch.rand(4, device=device) * 10
    dpo = fused_pref.FusedDPOLoss(beta=0.3, loss_type="ipo")
    assert torch.equal(dpo(*args, ref_logps=ref_logps).loss,
                       fused_pref.dpo_loss(*args, ref_logps=ref_logps, beta=0.3, loss_type="ipo").loss)


def test_metrics_follow_trl_names(device):
    x = make_inputs(4, 23, 97, 1003, device=device)
    metrics = fused_pref.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"]).metrics()
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["rewards/accuracies"] in (0.0, 0.5, 1.0)
    assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"], abs=1e-5)


def test_check_command_passes():
    # The README's first command, end to end (it re-executes itself under the interpreter on CPU); two
    # cases of the table (tests/test_parity.py runs them all through the same harness).
    chosen = ["simpo_loss[packed,shift,sft]", "dpo_loss[discopop]"]
    done = subprocess.run([sys.executable, "-m", "fused_pref", "check", *(f"--case={c}" for c in chosen)],
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("fused_pref check on ") and lines[1].split()[:3] == ["case", "dtype", "value"]
    assert [line.split()[:2] for line in lines[2:-1]] == [[c, d] for d in ("float32", "bfloat16") for c in chosen]
    assert all(line.endswith("  yes") for line in lines[2:-1]), lines
    assert re.fullmatch(r"4 of 4 cases within tolerance \(.*\), 0 failed, in \d+ s", lines[-1]), lines[-1]


def test_check_runs_the_plan_it_is_given(device, monkeypatch):
    from fused_pref.kernels import linear_lse
    from fused_pref.tools.check import run_check

    blocks, forward = [], linear_lse._forward_by_cublas
    monkeypatch.setattr(linear_lse, "_forward_by_cublas", lambda *a, **k: blocks.append(1) or forward(*a, **k))
    lines = []
    assert run_check(device, dtypes=(torch.float32,), cases=["simpo_loss"], out=lines.append, plan="cublas") == 0
    assert blocks and lines[-1].startswith("1 of 1 cases within tolerance"), lines


def test_check_runs_the_gradient_in_the_forward_where_that_mode_runs(device, monkeypatch):
    from fused_pref import gradient_in_forward
    from fused_pref.tools.check import run_check

    # Each case line paired with the block products run since the line before it.
    blocks, lines, forward = [], [], gradient_in_forward.gradients_by_blocks
    monkeypatch.setattr(gradient_in_forward, "gradients_by_blocks",
                        lambda *a, **k: blocks.append(1) or forward(*a, **k))
    cases = ["linear_logprobs", "linear_cross_entropy[flat,softcap]", "simpo_loss"]
    assert run_check(device, dtypes=(torch.float32,), cases=cases, backward="in_forward",
                     out=lambda line: lines.append((line, len(blocks)))) == 0
    assert lines[0][0] == "not run: backward='in_forward' does not run linear_logprobs", lines
    assert [line.split()[0] for line, _ in lines[2:-1]] == cases[1:], lines
    assert lines[1][1] == 0 and lines[2][1] > 0 and lines[3][1] > lines[2][1], lines
    assert lines[-1][0].startswith("2 of 2 cases within tolerance"), lines
    # Nothing left to run is a failure, not a pass.
    assert run_check(device, dtypes=(torch.float32,), cases=cases[:1], backward="in_forward", out=[].append) == 1


@pytest.mark.parametrize("name", CASES)
def test_a_case_runs_in_forward_exactly_where_validation_accepts_that_mode(name, device):
    case = CASES[name].with_kwargs(backward="in_forward")
    x = make_inputs(4, 23, 16, 67, device=device, seed=list(CASES).index(name))
    if case.runs_in_forward():
        value_of(case(fused_pref, x)).backward()
    else:
        with pytest.raises(ValueError, match="backward='in_forward'"):
            case(fused_pref, x)


def test_check_command_passes_the_dtypes_it_is_given(monkeypatch, capsys):
    # What the command hands run_check (which test_parity runs in every dtype, fp16 included).
    from fused_pref.tools import check, cli

    calls = []
    monkeypatch.setattr(cli, "_reexec_with_interpreter", lambda *args: None)
    monkeypatch.setattr(check, "run_check", lambda device, dtypes, **kwargs: calls.append((dtypes, kwargs)) or 0)
    assert cli.main(["check", "--dtype=float16", "--dtype=float32", "--dtype=float16", "--case=cpo_loss"]) == 0
    assert cli.main(["check"]) == 0
    assert [dtypes for dtypes, _ in calls] == [(torch.float16, torch.float32), check.DTYPES]
    assert calls[0][1]["cases"] == ["cpo_loss"]
    # The CPU's time estimate is the whole table's: a header for one case does not promise a minute.
    partial, whole = capsys.readouterr().out.splitlines()
    assert "about" not in partial and ("about 40 s" in whole) == (not torch.cuda.is_available()), whole
    assert "tile plan narrow, backward auto:" in partial and calls[0][1]["plan"] == "narrow", partial
    # The gradient-in-the-forward mode runs no tile plan, and its header names none.
    assert cli.main(["check", "--backward", "in_forward", "--case=cpo_loss"]) == 0
    header = capsys.readouterr().out
    assert "backward in_forward:" in header and "tile plan" not in header, header


@pytest.mark.parametrize("argv, message", [
    (["check", "--plan", "wide", "--backward", "in_forward"], "--plan wide has no effect with --backward in_forward"),
    (["check", "--plan", "narrow", "--backward", "in_forward"], "--plan narrow has no effect with --backward"),
    (["demo", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["demo", "--pairs", "-2"], "argument --pairs: must be a positive integer, got -2"),
    (["bench", "--impl", "fused-vhcunk"], "argument --impl: invalid choice: 'fused-vhcunk'"),
])
def test_commands_refuse_arguments_that_cannot_run(argv, message, capsys):
    from fused_pref.tools import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_check_command_names_the_cases_it_knows():
    done = subprocess.run([sys.executable, "-m", "fused_pref", "check", "--case", "simpo"], capture_output=True,
                          text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 2 and "invalid choice: 'simpo'" in done.stderr and "dpo_loss[ipo]" in done.stderr


SECOND_ORDER_CASES = {**CASES,
                      "linear_cross_entropy[in_forward]": Case("linear_cross_entropy", {"backward": "in_forward"}),
                      "simpo_loss[in_forward]": Case("simpo_loss", {"backward": "in_forward"})}


@pytest.mark.parametrize("case", SECOND_ORDER_CASES.values(), ids=SECOND_ORDER_CASES.keys())
def test_a_second_derivative_is_refused_not_silently_zero(case, device):
    # create_graph=True alone works and gives the same gradients; differentiating them again raises,
    # where the kernels' graph-less gradients would otherwise make it 0 (or a penalty on them a constant).
    x = make_inputs(2, 5, 24, 37, device=device)
    inputs = (x["hidden"], x["weight"])
    plain = torch.autograd.grad(value_of(case(fused_pref, x)).sum(), inputs)
    graphed = torch.autograd.grad(value_of(case(fused_pref, x)).sum(), inputs, create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, graphed))
    assert all(g.requires_grad for g in graphed)
    graphed[0].mul_(1.0)   # first-order edits in place, as without create_graph (no view of ours refuses them)
    with pytest.raises(RuntimeError, match=r"^fused_pref's kernels have no second derivative: .* fused_pref.reference"):
        sum(g.square().sum() for g in graphed).backward()


def test_the_reference_has_the_second_derivative_the_message_points_to():
    x = as_reference(make_inputs(2, 5, 24, 37))
    loss = fused_pref.reference.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"]).loss
    d_hidden, = torch.autograd.grad(loss, x["hidden"], create_graph=True)
    d_hidden.square().sum().backward()
    assert x["hidden"].grad.abs().sum() > 0 and torch.isfinite(x["hidden"].grad).all()


AUTOCAST_CALLS = {
    "default": lambda h, w, lab, b: fused_pref.linear_cross_entropy(h, w, lab, b),
    "cublas": lambda h, w, lab, b: fused_pref.linear_cross_entropy(h, w, lab, b, plan="cublas"),
    "cross_entropy[in_forward]": lambda h, w, lab, b: fused_pref.linear_cross_entropy(h, w, lab, b,
                                                                                      backward="in_forward"),
    "simpo[in_forward]": lambda h, w, lab, b: fused_pref.simpo_loss(h, w, lab, b, backward="in_forward").loss,
    "dpo[in_forward, reference model]": lambda h, w, lab, b: fused_pref.dpo_loss(
        h, w, lab, b, ref_hidden=h.detach().flip(0), backward="in_forward").loss,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", AUTOCAST_CALLS)
def test_autocast_leaves_the_products_fp32(name, dtype, device):
    # The kernels' products are fp32 whatever autocast is on: an eager call inside
    # torch.autocast ran the cuBLAS paths' in its dtype (bf16 logits and gradients, ~1e-3 off).
    x = make_inputs(4, 7, 40, 257, dtype=dtype, device=device, seed=1)
    args = (x["hidden"], x["weight"], x["labels"], x["bias"])
    plain = AUTOCAST_CALLS[name](*args)
    plain_grads = torch.autograd.grad(plain, args[:2] + args[3:])
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        under = AUTOCAST_CALLS[name](*args)
        grads = torch.autograd.grad(under, args[:2] + args[3:])
    assert relative_error(under, plain) < 1e-6
    for ours, theirs in zip(grads, plain_grads):
        assert relative_error(ours, theirs) < 1e-6
