"""What ``bench`` makes of its measurements: the results file and its name, the speed and memory
ratios against each peer, the console table and the PNG plot.  (Publishing a results file in this
repository's README is ``benchmarks/publish.py``, which is not part of the package.)

A results file is JSON with the environment (``gpu``, ``driver``, ``cuda``, ``torch``, ``triton``),
``date`` and ``created``, and ``rows``: one per (model, tokens, prompt_fraction, loss, impl, mode)
with ``valid_tokens``, ``ms``, ``peak_gb`` and ``tflops``, or ``error``; profiled rows also have
``kernels_ms`` (one call's GPU time per kernel family, ``kernel_times``) or ``kernels_error``.
"""

import itertools
import json
import re
from pathlib import Path

from .peers import IMPLEMENTATION_ORDER

# Results files written before ``bench --prompt-fraction`` have no ``prompt_fraction`` in their rows:
# they ran every case with a quarter of prompt.
LEGACY_PROMPT_FRACTION = 0.25


def results_path(out_dir, gpu: str, date: str) -> Path:
    """``out_dir/<gpu>-<date>.json``, the GPU's name with every run of other characters made one '-'."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-") or "gpu"
    return Path(out_dir) / f"{slug}-{date}.json"


def write_results(path: Path, results: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def prompt_fraction(row) -> float:
    return row.get("prompt_fraction", LEGACY_PROMPT_FRACTION)


def case_key(row):
    return row["model"], row["tokens"], prompt_fraction(row), row["loss"], row["mode"]


def ratios(rows: list[dict]) -> list[dict]:
    """For every fused row and every other implementation measured on the same case and mode: the
    peer's time and peak memory over the fused path's (above 1: the fused path is faster, smaller)."""
    ok = [r for r in rows if "ms" in r]
    out = []
    for fused in (r for r in ok if r["impl"].startswith("fused-")):
        for peer in ok:
            if case_key(peer) == case_key(fused) and peer["impl"] != fused["impl"]:
                out.append({"model": fused["model"], "tokens": fused["tokens"],
                            "prompt_fraction": prompt_fraction(fused), "loss": fused["loss"], "mode": fused["mode"],
                            "fused": fused["impl"], "peer": peer["impl"],
                            "speed": peer["ms"] / fused["ms"],
                            "memory": peer["peak_gb"] / fused["peak_gb"] if fused["peak_gb"] > 0 else None})
    return out


def ordered_implementations(rows):
    """The implementations in ``rows`` in the order ``bench`` runs them (the default backward
    strategy first: it is the baseline of every ratio), whatever order a merge left the rows in."""
    seen = list(dict.fromkeys(r["impl"] for r in rows))
    rank = {name: i for i, name in enumerate(IMPLEMENTATION_ORDER)}
    return sorted(seen, key=lambda name: (rank.get(name, len(rank)), seen.index(name)))


def format_cell(row) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "OOM" if row["error"] == "out of memory" else "error"
    return f"{row['ms']:.1f} ms, {row['peak_gb']:.2f} GB"


def rows_by_case(rows, mode):
    grouped = {}
    for r in rows:
        if r["mode"] == mode:
            grouped.setdefault((r["loss"], r["model"], r["tokens"], prompt_fraction(r)), {})[r["impl"]] = r
    return grouped


def format_table(results: dict) -> str:
    """Console table: per case and mode, each implementation's ms, GB, TFLOP/s against the FLOP
    floor, and the ratios of its time and memory to the (first) fused path's."""
    rows = results["rows"]
    lines = [f"{results['gpu']} (driver {results['driver']}, CUDA {results['cuda']}, torch {results['torch']}, "
             f"triton {results['triton']}), {results['dtype']}; TFLOP/s against the FLOP floor (8NDV with the "
             "backward, 2NDV without, +2NDV for DPO's reference model, N the valid tokens, those after each "
             "sequence's prompt fraction); x: time and memory over the fused path's",
             f"{'loss':<14} {'model':<11} {'tokens':>6} {'prompt':>6} {'mode':<8} {'impl':<18} {'ms':>9} {'GB':>8} "
             f"{'TFLOP/s':>8} {'x time':>7} {'x mem':>7}"]
    for mode in ("fwd", "fwd+bwd"):
        for (loss, model, tokens, fraction), by_impl in rows_by_case(rows, mode).items():
            ordered = {name: by_impl[name] for name in ordered_implementations(by_impl.values())}
            fused = next((r for name, r in ordered.items() if name.startswith("fused-") and "ms" in r), None)
            for name, r in ordered.items():
                head = f"{loss:<14} {model:<11} {tokens:>6} {fraction:>6g} {mode:<8} {name:<18}"
                if "error" in r:
                    lines.append(f"{head} {r['error'][:60]}")
                    continue
                rel = (f"{r['ms'] / fused['ms']:>7.2f} {r['peak_gb'] / fused['peak_gb']:>7.1f}"
                       if fused and fused["peak_gb"] > 0 else "")
                lines.append(f"{head} {r['ms']:>9.2f} {r['peak_gb']:>8.2f} {r['tflops']:>8.1f} {rel}")
    return "\n".join(lines)


def format_breakdown(results: dict, top: int = 5) -> str:
    """Console lines: for every profiled row, where one call's GPU time went (``kernels_ms``), its
    ``top`` kernel families in milliseconds and the rest as "other"."""
    lines = ["GPU time of one profiled call per kernel family, ms (Triton kernels by name):"]
    for r in results["rows"]:
        head = (f"{r['loss']:<14} {r['model']:<11} {r['tokens']:>6} {prompt_fraction(r):>6g} {r['mode']:<8} "
                f"{r['impl']:<18}")
        if "kernels_error" in r:
            lines.append(f"{head} profiler failed: {r['kernels_error'][:80]}")
        elif "kernels_ms" in r:
            times = list(r["kernels_ms"].items())
            parts = [f"{name} {ms:.1f}" for name, ms in times[:top]]
            rest = sum(ms for _, ms in times[top:])
            lines.append(f"{head} {', '.join(parts + ([f'other {rest:.1f}'] if rest else []))}")
    return "\n".join(lines) if len(lines) > 1 else "no row was profiled"


def plot(results: dict, png: Path) -> str:
    """Time and peak memory against tokens per step (forward+backward), one column per model, a
    pair of rows per loss, a colour per implementation and a line style per prompt fraction.  Needs
    matplotlib (the ``bench`` extra); says so when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in results["rows"] if r["mode"] == "fwd+bwd"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    if not rows:
        return "no plot: no forward+backward rows"
    fig, axes = plt.subplots(2 * len(losses), len(models), figsize=(4 * len(models), 2.8 * 2 * len(losses)),
                             squeeze=False)
    impls = ordered_implementations(rows)
    tokens = sorted({r["tokens"] for r in rows})
    fractions = sorted({prompt_fraction(r) for r in rows})
    styles = ("-", "--", ":", "-.")
    for i, loss in enumerate(losses):
        for j, model in enumerate(models):
            for k, (metric, unit) in enumerate((("ms", "ms"), ("peak_gb", "GB, log scale"))):
                ax = axes[2 * i + k][j]
                # One colour per implementation and one line style per prompt fraction in every panel.
                for (color, impl), (style, fraction) in itertools.product(enumerate(impls), enumerate(fractions)):
                    line = (loss, model, impl, fraction)
                    pts = sorted((r["tokens"], r[metric]) for r in rows
                                 if metric in r and (r["loss"], r["model"], r["impl"], prompt_fraction(r)) == line)
                    if pts:
                        label = impl if len(fractions) == 1 else f"{impl}, prompt {fraction:g}"
                        ax.plot(*zip(*pts), marker="o", color=f"C{color}", linestyle=styles[style % len(styles)],
                                label=label)
                ax.set_xscale("log", base=2)
                ax.set_xticks(tokens, [f"{t // 1024}k" for t in tokens])
                if metric == "peak_gb":
                    ax.set_yscale("log")
                ax.set_title(f"{loss}, {model}", fontsize=9)
                ax.set_xlabel("tokens per step", fontsize=8)
                ax.set_ylabel(unit, fontsize=8)
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['gpu']}, {results['date']}, bf16, forward+backward, prompt fraction "
                 f"{', '.join(f'{f:g}' for f in fractions)} (a missing point: out of memory or not run)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return f"wrote {png}"
