"""Results files and their publication: a results file's name, the plot, ``benchmarks/publish.py``
merging runs split over calls and rewriting the README's performance section from the newest file."""

import importlib.util
import json
from pathlib import Path

import pytest

from fused_pref.tools import benchmark, results

REPO = Path(__file__).resolve().parents[1]


def _load_publish():
    # A script of the repository, not a module of the package: loaded from its path.
    spec = importlib.util.spec_from_file_location("publish", REPO / "benchmarks" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


publish = _load_publish()


def test_results_file_is_named_after_the_gpu_and_the_date():
    assert results.results_path("out", "NVIDIA H100 80GB HBM3", "2026-11-27") == Path(
        "out/NVIDIA-H100-80GB-HBM3-2026-11-27.json")
    name = results.results_path("r", "NVIDIA H200 (MIG 1g.18gb)", "2026-01-02").name
    assert name == "NVIDIA-H200-MIG-1g.18gb-2026-01-02.json"


def _row(model, tokens, loss, impl, ms, gb, mode="fwd+bwd", prompt_fraction=None):
    """A results row; without ``prompt_fraction``, as the files written before it was a field."""
    fraction = {} if prompt_fraction is None else {"prompt_fraction": prompt_fraction}
    valid = int(tokens * (0.75 if prompt_fraction is None else 1 - prompt_fraction))
    return {"model": model, "tokens": tokens, **fraction, "valid_tokens": valid, "loss": loss, "D": 4096,
            "V": 128256, "softcap": None, "impl": impl, "mode": mode, "ms": ms, "peak_gb": gb, "tflops": 500.0}


def _results(gpu, created, rows, notes=()):
    return {"gpu": gpu, "driver": "570.1", "cuda": "12.8", "torch": "2.11.0", "triton": "3.6.0",
            "fused_pref": "0.1.0", "date": created[:10], "created": created, "dtype": "bfloat16",
            "sequence_length": 1024, "notes": list(notes), "rows": rows, "ratios": results.ratios(rows)}


def test_plot_draws_or_says_why_not(tmp_path):
    rows = [_row("llama3-8b", t, "simpo", impl, t / 100 * (1 - f), t / 1e4, prompt_fraction=f)
            for t in (4096, 16384) for impl in ("fused-vchunk", "reference") for f in (0.25, 0.5)]
    message = results.plot(_results("NVIDIA H100", "2026-11-27T10:00:00", rows), tmp_path / "p.png")
    if importlib.util.find_spec("matplotlib"):
        assert message == f"wrote {tmp_path / 'p.png'}" and (tmp_path / "p.png").stat().st_size > 0
    else:
        assert message.startswith("no plot: matplotlib is not installed")


def test_runs_split_over_calls_merge_into_one_results_file():
    first = _results("NVIDIA H200", "2026-11-26T08:00:00", [
        _row("llama3-8b", 16384, "simpo", "fused-vchunk", 180.0, 2.0),
        _row("llama3-8b", 16384, "simpo", "reference", 990.0, 27.6)])
    second = _results("NVIDIA H200", "2026-11-26T09:00:00", [
        # A rerun replaces the first figure (a row without prompt_fraction ran a quarter of prompt);
        # the same case at another prompt fraction is another row.
        _row("llama3-8b", 16384, "simpo", "fused-vchunk", 170.0, 2.0, prompt_fraction=0.25),
        _row("llama3-8b", 16384, "simpo", "fused-vchunk", 120.0, 2.0, prompt_fraction=0.5),
        _row("mistral-7b", 16384, "simpo", "fused-vchunk", 60.0, 1.0)], notes=["liger skipped"])
    merged = publish.merge_results([first, second])
    assert [(r["model"], r["impl"], r.get("prompt_fraction"), r["ms"]) for r in merged["rows"]] == [
        ("llama3-8b", "reference", None, 990.0), ("llama3-8b", "fused-vchunk", 0.25, 170.0),
        ("llama3-8b", "fused-vchunk", 0.5, 120.0), ("mistral-7b", "fused-vchunk", None, 60.0)]
    assert merged["created"] == "2026-11-26T09:00:00" and merged["notes"] == ["liger skipped"]
    # The newer measurement wins whatever the order given (a glob's, say).
    assert publish.merge_results([second, first])["rows"] == merged["rows"]
    assert [(r["peer"], r["prompt_fraction"], r["speed"]) for r in merged["ratios"]] == [
        ("reference", 0.25, 990.0 / 170.0)]
    with pytest.raises(ValueError, match=r"different environments.*\['gpu'\]"):
        publish.merge_results([first, _results("NVIDIA H100", "2026-11-26T10:00:00", [])])
    # A run that called the fused path validated does not merge with one from before it was recorded.
    validated = {**_results("NVIDIA H200", "2026-11-26T10:00:00", []), "fused_calls": benchmark.FUSED_CALLS}
    with pytest.raises(ValueError, match=r"different environments.*\['fused_calls'\]"):
        publish.merge_results([first, validated])
    assert publish.merge_results([validated, validated])["fused_calls"] == benchmark.FUSED_CALLS


def test_readme_section_comes_from_the_newest_results_file(tmp_path):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    old = _results("NVIDIA A100-SXM4-80GB", "2026-10-01T09:00:00",
                   [_row("llama3-8b", 16384, "simpo", "fused-vchunk", 99, 9)])
    # Rows in the order a merge can leave them: the columns and the baseline of the ratios are still
    # bench's order, the default backward strategy first.  Rows from before prompt_fraction was a field
    # read as a quarter of prompt, beside rows that name it.
    new = _results("NVIDIA H100 80GB HBM3", "2026-11-27T10:00:00", [
        {"model": "llama3-8b", "tokens": 16384, "loss": "simpo", "impl": "liger", "mode": "fwd+bwd",
         "error": "out of memory"},
        _row("llama3-8b", 16384, "simpo", "fused-wide", 300.0, 3.0),
        _row("llama3-8b", 16384, "simpo", "reference", 200.0, 30.0),
        _row("llama3-8b", 16384, "simpo", "fused-vchunk", 80.0, 1.5),
        _row("llama3-8b", 16384, "simpo", "fused-vchunk", 20.0, 1.2, mode="fwd"),
        _row("llama3-8b", 16384, "simpo", "reference", 150.0, 30.0, prompt_fraction=0.5),
        _row("llama3-8b", 16384, "simpo", "fused-vchunk", 60.0, 1.5, prompt_fraction=0.5),
        # The baseline out of memory where another fused implementation ran: no ratio over that one.
        {"model": "llama3-8b", "tokens": 4096, "loss": "simpo", "impl": "fused-vchunk", "mode": "fwd+bwd",
         "error": "out of memory"},
        _row("llama3-8b", 4096, "simpo", "fused-wide", 30.0, 1.0),
        _row("llama3-8b", 4096, "simpo", "reference", 100.0, 10.0),
    ], notes=["cce skipped for simpo: Cut Cross-Entropy has no preference losses"])
    results.write_results(results_dir / "b.json", old)
    results.write_results(results_dir / "a.json", new)
    (results_dir / "notes.json").write_text("[1, 2]")  # not a results file: ignored
    readme = tmp_path / "README.md"
    before, after = "# title\n\n## Performance\n\n", "\n\n## Next\nkept as is\n"
    readme.write_text(before + publish.README_START + "\nold text\n" + publish.README_END + after)

    assert publish.main(["readme", "--results", str(results_dir), "--readme-path", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(before + publish.README_START) and text.endswith(publish.README_END + after)
    assert "old text" not in text and "A100" not in text
    assert "Measured on **NVIDIA H100 80GB HBM3** (driver 570.1, CUDA 12.8, torch 2.11.0, triton 3.6.0)" in text
    assert ("| loss | model | tokens | prompt | fused-vchunk | fused-wide | reference | liger | fused TFLOP/s |"
            in text)
    assert ("| simpo | llama3-8b | 4096 | 0.25 | OOM | 30.0 ms, 1.00 GB | 100.0 ms, 10.00 GB | - | - |\n"
            "| simpo | llama3-8b | 16384 | 0.25 | 80.0 ms, 1.50 GB | 300.0 ms, 3.00 GB | 200.0 ms, 30.00 GB (2.5x, "
            "20.0x) | OOM | 500 |\n"
            "| simpo | llama3-8b | 16384 | 0.5 | 60.0 ms, 1.50 GB | - | 150.0 ms, 30.00 GB (2.5x, 20.0x) | - | 500 |"
            ) in text
    assert "Cut Cross-Entropy has no preference losses" in text
    # How the fused path was called: a file from before bench recorded it ran it unvalidated.
    assert f"The fused path was called {publish.LEGACY_FUSED_CALLS}." in text
    new["fused_calls"] = benchmark.FUSED_CALLS
    results.write_results(results_dir / "a.json", new)
    publish.main(["readme", "--results", str(results_dir), "--readme-path", str(readme)])
    assert f"The fused path was called {new['fused_calls']}." in readme.read_text()

    for path in results_dir.glob("*.json"):
        path.unlink()
    publish.main(["readme", "--results", str(results_dir), "--readme-path", str(readme)])
    assert publish.NO_RESULTS in readme.read_text()


def test_repository_readme_has_the_generated_section():
    text = (REPO / "README.md").read_text()
    start, end = text.index(publish.README_START), text.index(publish.README_END)
    newest = publish.newest_results(REPO / "benchmarks" / "results")
    if newest is None:
        assert publish.NO_RESULTS in text[start:end]
    else:
        assert json.loads(newest.read_text())["gpu"] in text[start:end]
