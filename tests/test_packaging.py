"""Packaging: ``kernels/`` ships only as ``fused_pref.kernels`` (setuptools ``package-dir``), never as a
top-level ``kernels`` package, which belongs to another PyPI project that transformers probes for.
"""

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fused_pref
import fused_pref.kernels

REPO = Path(__file__).resolve().parents[1]

KERNEL_MODULES = ("__init__", "cross_entropy_block", "linear_lse", "linear_grad", "pref_head", "tiles")


def test_fused_pref_kernels_resolves_to_repo_kernels_dir():
    assert Path(fused_pref.kernels.__file__).resolve().parent == REPO / "kernels"
    assert Path(fused_pref.__file__).resolve().parent == REPO / "fused_pref"
    # The local fused_pref/ has no kernels/ of its own: it must come from the package-dir mapping.
    assert not (REPO / "fused_pref" / "kernels").exists()
    for name in KERNEL_MODULES[1:]:
        module = importlib.import_module(f"fused_pref.kernels.{name}")
        assert Path(module.__file__).resolve() == REPO / "kernels" / f"{name}.py"


def test_no_top_level_kernels_module_imported():
    # An absolute ``import kernels`` inside the package would work from the repo root (the root is on
    # sys.path under ``python -m pytest``) and break once installed: importing everything must leave
    # no top-level ``kernels`` of ours in sys.modules.
    for name in ("fused_pref.functional", "fused_pref.reference", "fused_pref.autograd",
                 *(f"fused_pref.kernels.{m}" for m in KERNEL_MODULES[1:])):
        importlib.import_module(name)
    module = sys.modules.get("kernels")
    if module is not None:
        origin = getattr(module, "__file__", None)
        assert origin is None or REPO not in Path(origin).resolve().parents, origin


def _isolated_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_no_top_level_kernels_package_installed(tmp_path):
    # What a user's process sees: run outside the repo, so that neither the current directory nor
    # pytest's rootdir puts the repo root on sys.path (``python -m pytest`` from the root does, and
    # then find_spec("kernels") finds the directory itself, not the installation).
    probe = (
        "import importlib.util, json, fused_pref.kernels as k; s = importlib.util.find_spec('kernels'); "
        "print(json.dumps([k.__file__, None if s is None else (s.origin or list(s.submodule_search_locations))]))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_isolated_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ours, top_level = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(ours).resolve().parent == REPO / "kernels"
    if top_level is not None:
        locations = [top_level] if isinstance(top_level, str) else top_level
        for location in locations:
            path = Path(location).resolve()
            assert path != REPO / "kernels" and REPO not in path.parents, f"top-level kernels is ours: {path}"


def _setuptools_major() -> int:
    """The major version of the setuptools a build without isolation uses: the one the test's
    isolated environment imports (not PYTHONPATH's), 0 if none."""
    probe = "import setuptools; print(setuptools.__version__)"
    found = subprocess.run([sys.executable, "-c", probe], env=_isolated_env(), capture_output=True, text=True,
                           timeout=60)
    return int(found.stdout.split(".")[0]) if found.returncode == 0 else 0


# Building a wheel runs pip and setuptools in a subprocess (a few seconds): deselect with -m "not slow".
@pytest.mark.slow
def test_wheel_contents(tmp_path):
    if _setuptools_major() < 77:
        pytest.skip("the build without isolation needs setuptools >= 77 installed (pyproject.toml's build-system): "
                    "pip install -U setuptools")
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks", ".venv"))
    out = tmp_path / "wheel"
    # --no-build-isolation: use the installed setuptools, no index needed.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out)],
        cwd=tmp_path, env=_isolated_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("fused_pref-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())

    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        top_level_txt = next((n for n in names if n.endswith(".dist-info/top_level.txt")), None)
        top_level = wheel.read(top_level_txt).decode().split() if top_level_txt else None
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()

    # Every module of the source tree ships: a subpackage missing from pyproject's explicit
    # package list would otherwise vanish from the wheel without an error.
    expected = sorted({f"fused_pref/{p.relative_to(REPO / 'fused_pref').as_posix()}"
                       for p in (REPO / "fused_pref").rglob("*.py")}
                      | {f"fused_pref/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")})
    missing = [name for name in expected if name not in names]
    assert not missing, f"missing from the wheel: {missing}\n{names}"
    stray = [name for name in names if name.split("/")[0] in ("kernels", "tests")]
    assert not stray, f"top-level kernels/ or tests/ in the wheel: {stray}"
    assert all(n.startswith(("fused_pref/", "fused_pref-")) for n in names), names
    if top_level is not None:
        assert top_level == ["fused_pref"], top_level
    # The SPDX form (setuptools >= 77): the license table it replaces is refused from 2027-02-18.
    assert "\nLicense-Expression: Apache-2.0\n" in metadata, metadata[:2000]

    # A plain (non-editable) install of that wheel imports, kernels included, from anywhere.
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
         str(wheels[0])], cwd=tmp_path, env=_isolated_env(), capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = ("import fused_pref, fused_pref.kernels, pathlib; "
             "print(pathlib.Path(fused_pref.kernels.__file__).parent)")
    env = {**_isolated_env(), "PYTHONPATH": str(site)}
    imported = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == str(site / "fused_pref" / "kernels")


@pytest.mark.parametrize("triton_version, numpy_version, runs", [
    ("3.6.0", "2.4.6", False),   # the interpreter's int() on a one-element array: an error since NumPy 2.4
    ("3.2.0", "2.5.2", False),
    ("3.6.0", "2.3.5", True),
    ("3.7.1", "2.4.6", True),    # fixed in Triton 3.7
    ("3.9.0", "2.5.2", True),
])
def test_interpreter_problem_names_the_versions_and_the_way_out(triton_version, numpy_version, runs):
    problem = fused_pref.kernels.interpreter_problem(triton_version, numpy_version)
    if runs:
        assert problem is None
    else:
        assert f"Triton {triton_version}" in problem and f"NumPy {numpy_version}" in problem
        assert "install triton>=3.7 or numpy<2.4" in problem


# The tools side of the package: it imports the library like any user, and the library never imports it.
TOOLS_SIDE = ("tools", "testing.py", "__main__.py")


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` (a module of fused_pref) imports, relative imports resolved."""
    package = ["fused_pref", *path.relative_to(REPO / "fused_pref").parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_its_tools():
    library = [p for p in (REPO / "fused_pref").rglob("*.py")
               if p.relative_to(REPO / "fused_pref").parts[0] not in TOOLS_SIDE]
    assert len(library) > 10, library
    for path in library:
        wrong = sorted(name for name in _imported_modules(path)
                       if name.startswith(("fused_pref.tools", "fused_pref.testing", "fused_pref.__main__")))
        assert not wrong, f"{path.relative_to(REPO)} imports the tools: {wrong}"
    # The resolver itself: the tools' own imports of the library and of each other are seen.
    assert {"fused_pref.kernels.interpreter_problem", "fused_pref.tools.workload"} <= _imported_modules(
        REPO / "fused_pref" / "tools" / "cli.py")
