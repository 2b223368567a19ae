"""The benchmarks package: every results file says where it was measured, every script runs its smoke path,
no script leans on the tests or patches the library, and the shared pieces do what they promise."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
import torch

from benchmarks import chain_grid, harness, tables

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = sorted((BENCHMARKS / "results").glob("*.json"))
MODULES = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "__init__.py")


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, by its full dotted name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def is_script(path: Path) -> bool:
    """A script measures and writes a results file (through ``harness.finish`` or ``write_results``); the
    shared modules write none."""
    text = path.read_text()
    return ("harness.finish(" in text or "write_results(" in text) and path.stem != "harness"


SCRIPTS = [p for p in MODULES if is_script(p)]


# --- results files -------------------------------------------------------------------------------------


def test_there_are_results_and_scripts():
    assert len(RESULTS) >= 12 and len(SCRIPTS) >= 10, (RESULTS, SCRIPTS)


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_records_machine_torch_and_date(path):
    meta = json.loads(path.read_text()).get("meta")
    assert isinstance(meta, dict), f"{path.name} has no 'meta' record"
    for key in ("machine", "torch", "date"):
        assert isinstance(meta.get(key), str) and meta[key], f"{path.name}: meta[{key!r}] = {meta.get(key)!r}"
    dt.date.fromisoformat(meta["date"][:10])  # a real date, not a placeholder
    assert meta["date"][:10] <= dt.datetime.now(dt.timezone.utc).date().isoformat()
    if "stamped" in meta:  # recorded after the run: it must say where the record comes from
        assert len(meta["stamped"]) > 40, f"{path.name}: a stamped record names its sources"
    else:
        assert {"processor", "cores", "torch_threads", "os", "python", "numpy", "device"} <= set(meta)


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_is_rendered_by_the_generator(path):
    assert path.name in tables.RENDERERS, f"no renderer for {path.name}: its figures reach no page"


# --- the scripts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_benchmark_imports_a_test_module_or_edits_sys_path(path):
    tests = {name for name in imports(path) if name.split(".")[0] in {"tests", "conftest"} or "test_" in name}
    assert not tests, f"{path.name} imports test modules {sorted(tests)}"
    assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path: run it with python -m"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_benchmark_assigns_to_a_module_attribute(path):
    """Monkeypatching a library internal measures a library that does not exist."""
    tree = ast.parse(path.read_text())
    modules = {
        alias.asname or alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
    }
    patched = [
        ast.unparse(target)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AugAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute)
        and isinstance(target.value, ast.Name)
        and target.value.id in modules
    ]
    assert not patched, f"{path.name} assigns to module attributes: {patched}"
    private = {name for name in imports(path) if name.startswith("implicitdiff") and "._" in name}
    assert not private, f"{path.name} imports library internals {sorted(private)}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_a_script_imports_no_other_script(path):
    scripts = {f"benchmarks.{p.stem}" for p in SCRIPTS} - {f"benchmarks.{path.stem}"}
    assert not imports(path) & scripts, f"{path.name} imports {sorted(imports(path) & scripts)}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_script_has_a_quick_path_and_a_main(path):
    source = path.read_text()
    assert "harness.parser(" in source and 'if __name__ == "__main__":' in source, path.name


#: The library's scripts cheap enough to run in quick mode here (seconds each); the FPDM example's are run
#: by tests/fpdm/test_fpdm_benchmarks.py, ``gpu`` by tests/fpdm/test_gpu_benchmark.py.
QUICK = ["launches", "pytree", "chain", "solvers", "gradients"]


@pytest.mark.parametrize("name", QUICK)
def test_a_quick_run_prints_its_table_and_writes_only_where_told(name, quick_run):
    quick_run(name)


def test_every_script_is_run_quick_by_some_test():
    """A script no test runs breaks unnoticed when the code it measures changes."""
    fpdm = (ROOT / "tests" / "fpdm" / "test_fpdm_benchmarks.py").read_text()
    slow = {  # each with the reason no test runs it
        "gpu": "tests/fpdm/test_gpu_benchmark.py runs it in a subprocess",
        "fpdm_data": "torchrun processes and a VAE: a minute even in quick mode",
        "suite_time": "runs the test suite itself",
        "fpdm_parallel": "trains two digits models first",
        "fpdm_chain_analysis": "trains two digits models first",
        "parallel_guess": "trains two digits models first, then spawns two gloo processes (1.5 min quick)",
        "parallel_error_stop": "trains two digits models first",
    }
    untested = [p.stem for p in SCRIPTS if p.stem not in QUICK and f'"{p.stem}"' not in fpdm]
    assert sorted(set(untested) - set(slow)) == [], untested


# --- the harness ---------------------------------------------------------------------------------------


def test_write_results_records_the_metadata_and_replaces_the_file_whole(tmp_path):
    path = tmp_path / "r.json"
    harness.write_results(path, {"rows": [1, 2]})
    first = json.loads(path.read_text())
    assert first["rows"] == [1, 2]
    meta = first["meta"]
    assert meta["torch"] == torch.__version__ and meta["cores"] >= 1 and meta["date"].endswith("Z")
    with pytest.raises(TypeError):  # not JSON: the old file stays whole and no temporary is left
        harness.write_results(path, {"rows": object()})
    assert json.loads(path.read_text()) == first
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(ValueError, match="meta"):
        harness.write_results(path, {"meta": {}})


def test_a_quick_run_writes_nowhere_unless_told():
    parser = harness.parser("x", "x.json")
    assert harness.out_path(parser.parse_args(["--quick"])) is None
    assert harness.out_path(parser.parse_args([])) == harness.RESULTS / "x.json"
    assert harness.out_path(parser.parse_args(["--quick", "--out", "o.json"])) == Path("o.json")


def test_interleaved_alternates_the_order_and_times_every_run():
    calls: list[str] = []
    timings = harness.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds in turn
    assert all(len(t.walls) == len(t.cpus) == 3 and t.wall >= 0 for t in timings.values())


# --- the chain grid ------------------------------------------------------------------------------------


def test_the_chain_grid_has_its_252_chains():
    assert len(chain_grid.GRID) == 252
    assert {case["steps"] for case in chain_grid.GRID} == {12, 30, 60}
    assert not [case for case in chain_grid.GRID if case["act"] == "affine" and case["gain"] > 1]
    assert len({tuple(sorted(case.items(), key=str)) for case in chain_grid.GRID}) == 252


def test_grid_sweeps_checks_the_chain_against_its_rollout():
    case = {"steps": 12, "gain": 0.8, "act": "tanh", "form": "cumulative", "window": None, "seed": 0}
    out = chain_grid.grid_sweeps(case, None)
    chain = chain_grid.ToyChain(12, 6, [0.8] * 12, 0, "tanh")
    torch.testing.assert_close(out.zs, chain.rollout(), atol=1e-8 * 12, rtol=0)
    assert 1 <= out.sweeps <= 12
    wrong = dataclasses.replace(out, zs=out.zs + 1e-3 * (torch.arange(13) > 5)[:, None])
    with pytest.raises(AssertionError, match="residuals reported are not those"):
        chain_grid.check_against_rollout(chain, wrong, chain_grid.TOL)
