"""Everything derived from a benchmark results file: its name, the speed and memory ratios against
each peer, the console table, the PNG plot and README.md's generated performance section.

A results file is JSON with the environment (``gpu``, ``driver``, ``cuda``, ``torch``, ``triton``),
``date`` and ``created``, and ``rows``: one per (model, tokens, loss, impl, mode) with ``ms``,
``peak_gb`` and ``tflops``, or ``error``.
"""

import json
import re
from pathlib import Path

README_START, README_END = "<!-- perf:start -->", "<!-- perf:end -->"
NO_RESULTS = ("No GPU numbers are published yet: no benchmark has run on a GPU.  `benchmarks/gpu_check.sh` "
              "measures them on one and `python -m fused_pref bench --readme` writes them here; until then, "
              "`python -m fused_pref memory` predicts the memory on any machine.")


def results_path(out_dir, gpu: str, date: str) -> Path:
    """``out_dir/<gpu>-<date>.json``, the GPU's name with every run of other characters made one '-'."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-") or "gpu"
    return Path(out_dir) / f"{slug}-{date}.json"


def write_results(path: Path, results: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def newest_results(results_dir) -> Path | None:
    """The results file in ``results_dir`` created last (by its ``created`` field), or None."""
    found = []
    for path in Path(results_dir).glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "created" in data and "rows" in data:
            found.append((data["created"], path.name, path))
    return max(found)[2] if found else None


def _key(row):
    return row["model"], row["tokens"], row["loss"], row["mode"]


ENVIRONMENT = ("gpu", "driver", "cuda", "torch", "triton", "fused_pref")


def merge_results(runs: list[dict]) -> dict:
    """One results file from several runs on the same GPU and software (a benchmark split over calls
    that each fit a time limit): rows in run order, a later run's row replacing an earlier one of
    the same case, implementation and mode; the newest ``created``; ratios recomputed."""
    if not runs:
        raise ValueError("no results to merge")
    for run in runs[1:]:
        differing = [k for k in ENVIRONMENT if run.get(k) != runs[0].get(k)]
        if differing:
            raise ValueError(f"results from different environments cannot be merged: {differing} differ")
    rows = {}
    for run in runs:
        for row in run["rows"]:
            rows.pop((*_key(row), row["impl"]), None)
            rows[(*_key(row), row["impl"])] = row
    newest = max(runs, key=lambda run: run["created"])
    notes = list(dict.fromkeys(note for run in runs for note in run.get("notes", [])))
    merged = {**newest, "rows": list(rows.values()), "notes": notes}
    merged["ratios"] = ratios(merged["rows"])
    return merged


def ratios(rows: list[dict]) -> list[dict]:
    """For every fused row and every other implementation measured on the same case and mode: the
    peer's time and peak memory over the fused path's (above 1: the fused path is faster, smaller)."""
    ok = [r for r in rows if "ms" in r]
    out = []
    for fused in (r for r in ok if r["impl"].startswith("fused-")):
        for peer in ok:
            if _key(peer) == _key(fused) and peer["impl"] != fused["impl"]:
                out.append({"model": fused["model"], "tokens": fused["tokens"], "loss": fused["loss"],
                            "mode": fused["mode"], "fused": fused["impl"], "peer": peer["impl"],
                            "speed": peer["ms"] / fused["ms"],
                            "memory": peer["peak_gb"] / fused["peak_gb"] if fused["peak_gb"] > 0 else None})
    return out


def _impls(rows):
    """The implementations in ``rows`` in the order ``bench`` runs them (the default backward
    strategy first: it is the baseline of every ratio), whatever order a merge left the rows in."""
    from .peers import IMPLEMENTATION_ORDER

    seen = list(dict.fromkeys(r["impl"] for r in rows))
    rank = {name: i for i, name in enumerate(IMPLEMENTATION_ORDER)}
    return sorted(seen, key=lambda name: (rank.get(name, len(rank)), seen.index(name)))


def _cell(row) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "OOM" if row["error"] == "out of memory" else "error"
    return f"{row['ms']:.1f} ms, {row['peak_gb']:.2f} GB"


def _by_case(rows, mode):
    grouped = {}
    for r in rows:
        if r["mode"] == mode:
            grouped.setdefault((r["loss"], r["model"], r["tokens"]), {})[r["impl"]] = r
    return grouped


def format_table(results: dict) -> str:
    """Console table: per case and mode, each implementation's ms, GB, TFLOP/s against the FLOP
    floor, and the ratios of its time and memory to the (first) fused path's."""
    rows = results["rows"]
    lines = [f"{results['gpu']} (driver {results['driver']}, CUDA {results['cuda']}, torch {results['torch']}, "
             f"triton {results['triton']}), {results['dtype']}; TFLOP/s against the FLOP floor (8NDV with the "
             "backward, 2NDV without, +2NDV for DPO's reference model, N the valid tokens); x: time and memory "
             "over the fused path's",
             f"{'loss':<14} {'model':<11} {'tokens':>6} {'mode':<8} {'impl':<18} {'ms':>9} {'GB':>8} "
             f"{'TFLOP/s':>8} {'x time':>7} {'x mem':>7}"]
    for mode in ("fwd", "fwd+bwd"):
        for (loss, model, tokens), by_impl in _by_case(rows, mode).items():
            ordered = {name: by_impl[name] for name in _impls(by_impl.values())}
            fused = next((r for name, r in ordered.items() if name.startswith("fused-") and "ms" in r), None)
            for name, r in ordered.items():
                head = f"{loss:<14} {model:<11} {tokens:>6} {mode:<8} {name:<18}"
                if "error" in r:
                    lines.append(f"{head} {r['error'][:60]}")
                    continue
                rel = (f"{r['ms'] / fused['ms']:>7.2f} {r['peak_gb'] / fused['peak_gb']:>7.1f}"
                       if fused and fused["peak_gb"] > 0 else "")
                lines.append(f"{head} {r['ms']:>9.2f} {r['peak_gb']:>8.2f} {r['tflops']:>8.1f} {rel}")
    return "\n".join(lines)


def readme_section(results: dict | None, source: str = "") -> str:
    """README.md's performance text: the forward+backward table of ``results``, or, with none, the
    statement that no GPU numbers are published yet."""
    if results is None:
        return NO_RESULTS
    rows = results["rows"]
    impls = _impls(rows)
    fused_names = [n for n in impls if n.startswith("fused-")]
    lines = [f"Measured on **{results['gpu']}** (driver {results['driver']}, CUDA {results['cuda']}, torch "
             f"{results['torch']}, triton {results['triton']}) on {results['date']}: {results['dtype']}, "
             f"forward+backward, sequences of {results.get('sequence_length', 1024)} tokens with a quarter of "
             "prompt.  Each cell: median time (`triton.testing.do_bench`) and peak memory "
             "(growth of `torch.cuda.max_memory_allocated`, gradients included); for a peer, its time and "
             f"memory over `{fused_names[0] if fused_names else 'fused'}`'s in brackets.  "
             "TFLOP/s divides the FLOP floor (8·N·D·V over the N valid tokens, 10·N·D·V for DPO) by the "
             f"fused path's time.  Generated from `{source}` by "
             "`python -m fused_pref bench --readme`.",
             "",
             "| loss | model | tokens | " + " | ".join(impls) + " | fused TFLOP/s |",
             "| --- | --- | ---: | " + " | ".join("---" for _ in impls) + " | ---: |"]
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cases = sorted(_by_case(rows, "fwd+bwd").items(),
                   key=lambda item: (losses.index(item[0][0]), models.index(item[0][1]), item[0][2]))
    for (loss, model, tokens), by_impl in cases:
        fused = next((by_impl[n] for n in fused_names if n in by_impl and "ms" in by_impl[n]), None)
        cells = []
        for name in impls:
            r = by_impl.get(name)
            cell = _cell(r)
            if fused is not None and r is not None and "ms" in r and not name.startswith("fused-"):
                cell += f" ({r['ms'] / fused['ms']:.1f}x, {r['peak_gb'] / max(fused['peak_gb'], 1e-9):.1f}x)"
            cells.append(cell)
        tflops = f"{fused['tflops']:.0f}" if fused else "-"
        lines.append(f"| {loss} | {model} | {tokens} | " + " | ".join(cells) + f" | {tflops} |")
    for note in results.get("notes", []):
        lines.append(f"\nNote: {note}.")
    return "\n".join(lines)


def update_readme(readme: Path, section: str):
    """Replace the text between README_START and README_END in ``readme`` with ``section``."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers")
    readme.write_text(text[: start + len(README_START)] + "\n" + section + "\n" + text[end:])


def plot(results: dict, png: Path) -> str:
    """Time and peak memory against tokens per step (forward+backward), one column per model, a
    pair of rows per loss.  Needs matplotlib (the ``bench`` extra); says so when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'fused-pref[bench]')"
    rows = [r for r in results["rows"] if r["mode"] == "fwd+bwd"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    if not rows:
        return "no plot: no forward+backward rows"
    fig, axes = plt.subplots(2 * len(losses), len(models), figsize=(4 * len(models), 2.8 * 2 * len(losses)),
                             squeeze=False)
    impls = _impls(rows)
    tokens = sorted({r["tokens"] for r in rows})
    for i, loss in enumerate(losses):
        for j, model in enumerate(models):
            for k, (metric, unit) in enumerate((("ms", "ms"), ("peak_gb", "GB, log scale"))):
                ax = axes[2 * i + k][j]
                for color, impl in enumerate(impls):  # one colour per implementation in every panel
                    pts = sorted((r["tokens"], r[metric]) for r in rows
                                 if (r["loss"], r["model"], r["impl"]) == (loss, model, impl) and metric in r)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", color=f"C{color}", label=impl)
                ax.set_xscale("log", base=2)
                ax.set_xticks(tokens, [f"{t // 1024}k" for t in tokens])
                if metric == "peak_gb":
                    ax.set_yscale("log")
                ax.set_title(f"{loss}, {model}", fontsize=9)
                ax.set_xlabel("tokens per step", fontsize=8)
                ax.set_ylabel(unit, fontsize=8)
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['gpu']}, {results['date']}, bf16, forward+backward (a missing point: out of memory "
                 "or not run)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return f"wrote {png}"
