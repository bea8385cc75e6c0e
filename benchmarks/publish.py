"""Publishing benchmark results in this repository (not part of the package):

    python benchmarks/publish.py readme [--results DIR] [--readme-path README.md]
    python benchmarks/publish.py merge RUN.json [RUN.json ...] [--out DIR] [--no-plot]

``readme`` rewrites the README's performance section (between its ``perf`` markers) from the newest
results file in ``benchmarks/results/``, naming the GPU and the versions it ran; ``merge`` joins the
results files of one benchmark split over several calls on the same GPU (``benchmarks/gpu_check.sh``
on a lent machine whose calls have a time limit) into one, with its plot.
"""

import argparse
import json
import sys
from pathlib import Path

from fused_pref.tools.results import (case_key, format_cell, ordered_implementations, plot, ratios, results_path,
                                      rows_by_case, write_results)

README_START, README_END = "<!-- perf:start -->", "<!-- perf:end -->"
NO_RESULTS = ("No GPU numbers are published yet: no benchmark has run on a GPU.  `benchmarks/gpu_check.sh` "
              "measures them on one and `python benchmarks/publish.py readme` writes them here; until then, "
              "`python -m fused_pref memory` predicts the memory on any machine.")


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


# Results files from before ``bench`` recorded how it called the fused path (``fused_calls``).
LEGACY_FUSED_CALLS = "unvalidated (validate=False: its products spanned every token, prompt or not)"
# What runs merged into one file share, each with its value in a file that lacks it.
SHARED = {**dict.fromkeys(("gpu", "driver", "cuda", "torch", "triton", "fused_pref")),
          "fused_calls": LEGACY_FUSED_CALLS}


def merge_results(runs: list[dict]) -> dict:
    """One results file from several runs on the same GPU and software (a benchmark split over calls
    that each fit a time limit): rows from the oldest run to the newest by ``created`` (whatever the
    order given), a newer run's row replacing an older one's of the same case, implementation and
    mode; the newest ``created``; ratios recomputed."""
    if not runs:
        raise ValueError("no results to merge")
    for run in runs[1:]:
        differing = [k for k, default in SHARED.items() if run.get(k, default) != runs[0].get(k, default)]
        if differing:
            raise ValueError(f"results from different environments cannot be merged: {differing} differ")
    rows = {}
    for run in sorted(runs, key=lambda run: run["created"]):
        for row in run["rows"]:
            rows.pop((*case_key(row), row["impl"]), None)
            rows[(*case_key(row), row["impl"])] = row
    newest = max(runs, key=lambda run: run["created"])
    notes = list(dict.fromkeys(note for run in runs for note in run.get("notes", [])))
    merged = {**newest, "rows": list(rows.values()), "notes": notes}
    merged["ratios"] = ratios(merged["rows"])
    return merged


def readme_section(results: dict | None, source: str = "") -> str:
    """README.md's performance text: the forward+backward table of ``results``, or, with none, the
    statement that no GPU numbers are published yet."""
    if results is None:
        return NO_RESULTS
    rows = results["rows"]
    impls = ordered_implementations(rows)
    fused_names = [n for n in impls if n.startswith("fused-")]
    lines = [f"Measured on **{results['gpu']}** (driver {results['driver']}, CUDA {results['cuda']}, torch "
             f"{results['torch']}, triton {results['triton']}) on {results['date']}: {results['dtype']}, "
             f"forward+backward, sequences of {results.get('sequence_length', 1024)} tokens whose first `prompt` "
             "fraction is prompt (label -100).  Each cell: median time (`triton.testing.do_bench`) and peak memory "
             "(growth of `torch.cuda.max_memory_allocated`, gradients included); for a peer, its time and "
             f"memory over `{fused_names[0] if fused_names else 'fused'}`'s in brackets.  "
             "TFLOP/s divides the FLOP floor (8·N·D·V over the N valid tokens, those after the prompt, 10·N·D·V "
             f"for DPO) by the fused path's time.  The fused path was called "
             f"{results.get('fused_calls', LEGACY_FUSED_CALLS)}.  Generated from `{source}` by "
             "`python benchmarks/publish.py readme`.",
             "",
             "| loss | model | tokens | prompt | " + " | ".join(impls) + " | fused TFLOP/s |",
             "| --- | --- | ---: | ---: | " + " | ".join("---" for _ in impls) + " | ---: |"]
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cases = sorted(rows_by_case(rows, "fwd+bwd").items(),
                   key=lambda item: (losses.index(item[0][0]), models.index(item[0][1]), *item[0][2:]))
    for (loss, model, tokens, fraction), by_impl in cases:
        # Only the named baseline: a row where it failed or did not run shows no ratio rather than
        # ratios over another fused implementation under the baseline's name.
        fused = by_impl.get(fused_names[0]) if fused_names else None
        fused = fused if fused is not None and "ms" in fused else None
        cells = []
        for name in impls:
            r = by_impl.get(name)
            cell = format_cell(r)
            if fused is not None and r is not None and "ms" in r and not name.startswith("fused-"):
                cell += f" ({r['ms'] / fused['ms']:.1f}x, {r['peak_gb'] / max(fused['peak_gb'], 1e-9):.1f}x)"
            cells.append(cell)
        tflops = f"{fused['tflops']:.0f}" if fused else "-"
        lines.append(f"| {loss} | {model} | {tokens} | {fraction:g} | " + " | ".join(cells) + f" | {tflops} |")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/publish.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    readme = commands.add_parser("readme", help="rewrite README.md's performance section from the newest results")
    readme.add_argument("--results", type=Path, default=Path("benchmarks/results"),
                        help="where the results files are (default benchmarks/results)")
    readme.add_argument("--readme-path", type=Path, default=Path("README.md"))
    merge = commands.add_parser("merge", help="one results file from runs on one GPU split over several calls")
    merge.add_argument("runs", nargs="+", type=Path, metavar="RESULTS_JSON")
    merge.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                       help="directory of the merged file and its plot (default benchmarks/results)")
    merge.add_argument("--no-plot", action="store_true", help="write no PNG")
    args = parser.parse_args(argv)

    if args.command == "readme":
        newest = newest_results(args.results)
        results = None if newest is None else json.loads(newest.read_text())
        update_readme(args.readme_path, readme_section(results, newest.as_posix() if newest else ""))
        print(f"rewrote the performance section of {args.readme_path} from {newest or 'no results file'}")
        return 0
    merged = merge_results([json.loads(path.read_text()) for path in args.runs])
    path = results_path(args.out, merged["gpu"], merged["date"])
    write_results(path, merged)
    print(f"merged {len(args.runs)} runs, {len(merged['rows'])} rows, into {path}")
    if not args.no_plot:
        print(plot(merged, path.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
