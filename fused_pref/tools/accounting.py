"""Memory accounting on the CPU: the peak bytes of live tensors that a forward+backward allocates
beyond its inputs and their gradients, for each implementation, at a model's full shape
(``python -m fused_pref memory``).

Measured, not assumed: ``LiveBytesRecorder`` follows every storage the step allocates at five
small shapes, a least-squares fit over the monomials ``N·V, N·D, V·D, N`` turns those peaks into a
formula, and the formula is evaluated at the full shape.  A backward strategy's workspace is not a
monomial (it is capped in bytes), so it is measured apart at the small shapes and taken out before
the fit, then added back at the full shape from the launcher's own rule, in the input dtype as on
a GPU.  Beside it stands the analytic formula, read off the code, so a wrong derivation or an
unexpected allocation shows as a disagreement.  The fused backward's figures are the CPU's: on
CUDA, where torch's ``addmm`` takes an fp32 ``out`` (``kernels/products.py``), cuBLAS adds each
chunk's ``d_hidden`` product into the fp32 accumulator, without the ``2·N·D``-byte product the CPU
makes first (``linear_grad.peak_temporaries``).
Everything is bf16, with ``validate=False`` (no
host sync), and ``N`` counts every token, since with ``validate=False`` the kernels' row index spans
all of them: an upper bound on a validated call's (``bench``'s), whose ``N·D`` terms count the
valid tokens only.
"""

import functools
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fused_pref.kernels import linear_grad
from fused_pref.kernels.linear_grad import vocab_chunk_size
from fused_pref.kernels.tiles import DEFAULT_PLAN, distinct_plans, tiles_for
from .memory import LiveBytesRecorder, Peak
from .workload import FUSED_PLANS, MODELS, library_implementations, make_batch

DTYPE = torch.bfloat16
MONOMIALS = ("N·V", "N·D", "V·D", "N")

# The shapes measured: R sequences of T tokens (N = R*T), hidden D, vocabulary V.  A base, each
# of T, D and V doubled alone, then all three: four monomials plus one point to check the fit.
R_MEASURED = 4
DESIGN = ((16, 16, 512), (32, 16, 512), (16, 32, 512), (16, 16, 1024), (32, 32, 1024))


def monomials(N, D, V) -> dict:
    return {"N·V": N * V, "N·D": N * D, "V·D": V * D, "N": N}


def vchunk_columns(N: int, V: int, plan: str = DEFAULT_PLAN) -> int:
    """Vocabulary columns per chunk of the V-chunked backward: the launcher's rule (at most
    256 MiB of workspace, at most V/16 columns, a multiple of BLOCK_V)."""
    return min(vocab_chunk_size(N, V, DTYPE.itemsize, tiles_for(DTYPE, plan).block_v), V)


@dataclass(frozen=True)
class Workspace:
    """A backward strategy's bounded ``[N, C]`` buffer, ``C = columns(N, V)``."""

    columns: Callable[[int, int], int]

    def gpu_bytes(self, N: int, V: int) -> int:
        return N * self.columns(N, V) * DTYPE.itemsize

    def measured_bytes(self, peak: Peak, N: int, V: int) -> int:
        """The ``[N, C]`` storages live at ``peak`` (``C`` or the last chunk's width): the workspace,
        and under the interpreter its per-chunk cast (there the kernel stores ``dz`` in fp32, see
        ``kernels/tiles.py``; a GPU stores the input dtype and casts nothing)."""
        C = self.columns(N, V)
        widths = {C, V - (math.ceil(V / C) - 1) * C}
        found = sum(s.nbytes for s in peak.live if len(s.shape) == 2 and s.shape[0] == N and s.shape[1] in widths)
        if found == 0:
            raise RuntimeError(f"no [N, C] workspace live at the peak (N {N}, C {C}): the accounting's model of "
                               "the backward is out of date")
        return found


# The workspace of each implementation that has one, by name: every tile plan runs the V-chunked
# backward, its chunks a multiple of the plan's BLOCK_V.
WORKSPACES = {f"fused-{name}": Workspace(functools.partial(vchunk_columns, plan=plan))
              for name, plan in FUSED_PLANS.items() if not tiles_for(DTYPE, plan).cublas_logits}


@dataclass(frozen=True)
class Term:
    bytes_per: float    # bytes per unit of the monomial
    monomial: str       # one of MONOMIALS
    what: str = ""


# Each backward strategy states its own peak temporaries beside the code that allocates them.
BACKWARD_TEMPORARIES = dict.fromkeys(WORKSPACES, linear_grad.peak_temporaries)


def analytic_terms(implementation: str, loss: str, softcap) -> list[Term]:
    """The dominant terms (bf16 inputs), read off the code; O(N) per-token state (tens of bytes
    per token) is left out."""
    if implementation in BACKWARD_TEMPORARIES:
        return [Term(bytes_per, monomial, f"backward: {what}")
                for bytes_per, monomial, what in BACKWARD_TEMPORARIES[implementation](DTYPE.itemsize)]
    assert implementation == "reference", f"no analytic formula for {implementation}"
    logits = [Term(4, "N·V", "fp32 log_softmax, saved for backward")]
    if loss == "dpo" and softcap is not None:
        # The peak is the reference model's forward, under no_grad: the policy graph holds its
        # log_softmax and tanh outputs while the reference logits, z / c and tanh are alive.
        logits += [Term(4, "N·V", "fp32 tanh output, saved for backward"),
                   Term(12, "N·V", "reference model's forward: fp32 logits, z / c, tanh")]
    else:
        # The peak is the gather's backward (zeros + scatter_add) next to the saved log_softmax;
        # for DPO the reference model's forward ties with it (its logits and log_softmax).
        if softcap is not None:
            logits.append(Term(4, "N·V", "fp32 tanh output, saved for backward"))
        logits.append(Term(8, "N·V", "gather's backward: zeros and scatter_add, fp32"))
    return logits + [Term(4, "V·D", "fp32 copy of weight, saved by the matmul"),
                     Term(4, "N·D", "fp32 copy of hidden, saved by the matmul")]


def _combine(terms: list[Term]) -> dict:
    total = dict.fromkeys(MONOMIALS, 0.0)
    for t in terms:
        total[t.monomial] += t.bytes_per
    return total


@dataclass(frozen=True)
class Fit:
    """Peak live bytes at each measured shape and the least-squares formula through them."""

    implementation: str
    loss: str
    softcap: float | None
    points: tuple          # ((N, D, V, peak bytes), ...)
    coefficients: dict     # monomial -> bytes per unit
    max_error: float       # largest |formula - measured| over the points, bytes

    def bytes_at(self, N, D, V) -> float:
        workspace = WORKSPACES.get(self.implementation)
        m = monomials(N, D, V)
        return sum(c * m[k] for k, c in self.coefficients.items()) + (workspace.gpu_bytes(N, V) if workspace else 0)


def peak_extra(step, batch) -> Peak:
    """Peak live bytes that ``step(*batch.inputs())`` and its backward allocate beyond the batch's
    inputs and the gradients it leaves in them, and what was live then."""
    # The recorder collects garbage after each kernel op (see LiveBytesRecorder); freezing what
    # exists now keeps each of those collections to the objects the step made.
    gc.collect()
    gc.freeze()
    try:
        with LiveBytesRecorder(collect_garbage=True) as recorder:
            step(*batch.inputs()).backward()
    finally:
        gc.unfreeze()
    return recorder.peak(exclude=[t.grad for t in batch.grads])


@functools.cache
def fit_implementation(implementation: str, loss: str, softcap=None, design=DESIGN) -> Fit:
    """Measured at the ``design`` shapes and fitted; once per process for each argument set (a fit
    depends on the loss and the softcap, not on the model's sizes)."""
    step = library_implementations(loss, softcap, validate=False)[implementation]
    workspace = WORKSPACES.get(implementation)
    points, rows, targets = [], [], []
    for seed, (T, D, V) in enumerate(design):
        N = R_MEASURED * T
        batch = make_batch(R_MEASURED, T, D, V, dtype=DTYPE, seed=seed, reference_model=loss == "dpo")
        peak = peak_extra(step, batch)
        points.append((N, D, V, peak.nbytes))
        rows.append([float(v) for v in monomials(N, D, V).values()])
        targets.append(float(peak.nbytes - (workspace.measured_bytes(peak, N, V) if workspace else 0)))
    A, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)
    solution = torch.linalg.lstsq(A, y[:, None], driver="gelsd").solution.flatten()
    max_error = (A @ solution - y).abs().max().item()
    return Fit(implementation, loss, softcap, tuple(points), dict(zip(MONOMIALS, solution.tolist())), max_error)


@dataclass(frozen=True)
class Accounting:
    fit: Fit
    analytic: list[Term]
    N: int
    D: int
    V: int

    @property
    def implementation(self) -> str:
        return self.fit.implementation

    @property
    def fitted_bytes(self) -> float:
        return self.fit.bytes_at(self.N, self.D, self.V)

    @property
    def analytic_bytes(self) -> float:
        return analytic_bytes(self.implementation, self.analytic, self.N, self.D, self.V)


def analytic_bytes(implementation: str, terms: list[Term], N: int, D: int, V: int) -> float:
    """The analytic peak extra bytes of ``implementation`` at a full shape, workspace included."""
    m = monomials(N, D, V)
    workspace = WORKSPACES.get(implementation)
    return sum(t.bytes_per * m[t.monomial] for t in terms) + (workspace.gpu_bytes(N, V) if workspace else 0)


def account(model: str, tokens: int, loss: str) -> list[Accounting]:
    """Accounting of every library implementation for ``loss`` at ``MODELS[model]`` with ``tokens``
    tokens per step."""
    head = MODELS[model]
    return [Accounting(fit_implementation(implementation, loss, head.softcap),
                       analytic_terms(implementation, loss, head.softcap), tokens, head.hidden, head.vocab)
            for implementation in accounted_implementations(loss, head.softcap)]


def accounted_implementations(loss: str, softcap=None) -> list[str]:
    """``library_implementations`` less the tile plans that repeat another's tiles through the
    interpreter (where the accounting runs: "widest" runs "wide"'s there), and the "cublas" plan,
    whose products make fp32 copies on the CPU that a GPU never makes (as the gradient-in-forward
    mode, also left out)."""
    left_out = {f"fused-{name}" for name, plan in FUSED_PLANS.items() if plan not in distinct_plans()}
    left_out |= {f"fused-{name}" for name in FUSED_PLANS} - WORKSPACES.keys()
    return [name for name in library_implementations(loss, softcap) if name not in left_out]


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_formula(coefficients: dict, workspace: bool) -> str:
    # Coefficients under 0.05 byte per unit are fit noise (the measured peaks are exact integers).
    parts = [f"{c:.1f}·{k}" if k != "N" else f"{c:.0f}·N" for k, c in coefficients.items() if abs(c) >= 0.05]
    if workspace:
        parts.append("W")
    return " + ".join(parts) or "0"


def _details(a: Accounting) -> list[str]:
    workspace = a.implementation in WORKSPACES
    lines = [f"{a.implementation}",
             f"  measured fit  {format_formula(a.fit.coefficients, workspace)}"
             f"   (largest error at the measured shapes: {a.fit.max_error:.0f} B)",
             f"  analytic      {format_formula(_combine(a.analytic), workspace)}"]
    lines += [f"    {t.bytes_per:g}·{t.monomial:<5} {t.what}" for t in a.analytic]
    if workspace:
        rule = WORKSPACES[a.implementation]
        lines.append(f"    W        {human_bytes(rule.gpu_bytes(a.N, a.V))}: the backward's dz workspace, [N, C] bf16 "
                     f"with C = {rule.columns(a.N, a.V)} vocabulary columns (at most 256 MiB and V/16)")
    return lines


def format_report(model: str, tokens: int, loss: str, accountings: list[Accounting]) -> str:
    """The ``memory`` command's report: the totals first, then each formula and its terms."""
    head = MODELS[model]
    cap = f", softcap {head.softcap:g}" if head.softcap else ""
    lines = [f"{head.name} head (D {head.hidden}, V {head.vocab}{cap}), {tokens} tokens per step, bf16, "
             f"{loss} forward+backward.",
             "Peak of live tensor bytes beyond the inputs and their gradients:",
             "",
             f"  {'implementation':<16} {'measured':>10} {'analytic':>10}"]
    reference = next((a for a in accountings if a.implementation == "reference"), None)
    for a in accountings:
        ratio = ""
        if reference is not None and a is not reference:
            ratio = f"   (reference: {reference.fitted_bytes / a.fitted_bytes:.1f}x this)"
        lines.append(f"  {a.implementation:<16} {human_bytes(a.fitted_bytes):>10} "
                     f"{human_bytes(a.analytic_bytes):>10}{ratio}")
    points = accountings[0].fit.points
    span = [f"{name} {min(p[i] for p in points)}..{max(p[i] for p in points)}" for i, name in enumerate("NDV")]
    lines += ["",
              f"Measured on the CPU (TorchDispatchMode over the real kernels) at {len(points)} scaled shapes "
              f"({', '.join(span)}),",
              "fitted over N·V, N·D, V·D, N (W, the fused backward's workspace, taken out first) and evaluated "
              f"at N = {tokens}, D = {head.hidden}, V = {head.vocab}.",
              "Analytic: the dominant terms, read off the code.  GB = 1e9 bytes.",
              ""]
    for a in accountings:
        lines += _details(a)
    return "\n".join(lines)


def format_summary(accountings: dict) -> str:
    """One line per shape, ``{(model, tokens, loss): [Accounting, ...]}``, then each fitted formula
    once: the CPU part of ``python -m fused_pref bench``."""
    names = list(dict.fromkeys(a.implementation for accs in accountings.values() for a in accs))
    lines = [f"{'model':<11} {'tokens':>6} {'loss':<14} " + " ".join(f"{n:>14}" for n in names)
             + "  reference / fused"]
    formulas = {}
    for (model, tokens, loss), accs in accountings.items():
        by_name = {a.implementation: a for a in accs}
        cells = " ".join(f"{human_bytes(by_name[n].fitted_bytes) if n in by_name else '-':>14}" for n in names)
        fused = next(a for a in accs if a.implementation.startswith("fused-"))
        ratio = f"{by_name['reference'].fitted_bytes / fused.fitted_bytes:.1f}x" if "reference" in by_name else "-"
        lines.append(f"{model:<11} {tokens:>6} {loss:<14} {cells}  {ratio:>10}")
        for a in accs:
            softcap = f", softcap {a.fit.softcap:g}" if a.fit.softcap else ""
            formulas[f"{loss}{softcap}: {a.implementation}"] = format_formula(
                a.fit.coefficients, a.implementation in WORKSPACES)
    lines += ["", "Peak of live tensor bytes beyond inputs and gradients, measured on the CPU at scaled shapes "
              "and extrapolated by these fits (N tokens, D hidden, V vocabulary, W the fused backward's "
              "workspace; `python -m fused_pref memory` details each against its analytic formula):"]
    lines += [f"  {key:<42} {formula}" for key, formula in formulas.items()]
    return "\n".join(lines)
