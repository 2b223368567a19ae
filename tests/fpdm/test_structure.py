"""The example stays carried-on code: a package beside thin scripts, short functions, one of each thing."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "examples" / "fpdm"
PACKAGE_DIR = EXAMPLE_DIR / "fpdm"
#: The command-line scripts: every .py file beside the package.
SCRIPTS = sorted(EXAMPLE_DIR.glob("*.py"))
#: The package's modules.
MODULES = sorted(PACKAGE_DIR.glob("*.py"))
EXAMPLE = sorted(EXAMPLE_DIR.rglob("*.py"))
SOURCES = [*EXAMPLE, *sorted((REPO / "benchmarks").glob("fpdm_*.py"))]
MAX_BODY_LINES = 80
#: The package modules behind the command lines, which library-like modules must not import.
COMMAND_MODULES = {"training", "generation", "evaluation", "sweeping", "demo", "latents"}


def body_lines(node: ast.FunctionDef, lines: list[str]) -> int:
    """Lines of code of a function's body: no docstring, blank lines or comment lines."""
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not body:
        return 0
    code = lines[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in code if line.strip() and not line.strip().startswith("#"))


def test_the_example_is_a_package_beside_scripts():
    assert (PACKAGE_DIR / "__init__.py").is_file()
    assert {p.stem for p in SCRIPTS} >= {"train", "sample", "evaluate", "sweep", "demo", "extract_latents"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_function_body_is_at_most_80_lines(path):
    source = path.read_text()
    lines = source.splitlines()
    long = [
        f"{node.name} ({body_lines(node, lines)} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and body_lines(node, lines) > MAX_BODY_LINES
    ]
    assert not long, f"{path.name}: {long}"


def test_the_body_counter_counts_a_long_function():
    source = 'def f():\n    "doc"\n' + "    x = 1\n" * 81 + "    # comment\n\n"
    (node,) = ast.parse(source).body
    assert body_lines(node, source.splitlines()) == 81


def imported_modules(path: Path) -> set[str]:
    """Every module name ``path`` imports, absolute and dotted (``from fpdm import x`` gives ``fpdm.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path.name}: relative import"
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, by their short names."""
    names = {p.stem for p in MODULES}
    return {m.split(".")[1] for m in imported_modules(path) if m.startswith("fpdm.")} & names


@pytest.mark.parametrize("path", EXAMPLE, ids=lambda p: str(p.relative_to(EXAMPLE_DIR)))
def test_no_file_of_the_example_edits_sys_path(path):
    assert not re.search(r"\bsys\s*\.\s*path\b", path.read_text()), path.name


@pytest.mark.parametrize("path", EXAMPLE, ids=lambda p: str(p.relative_to(EXAMPLE_DIR)))
def test_no_file_imports_a_script(path):
    scripts = {p.stem for p in SCRIPTS}
    assert not {m.split(".")[0] for m in imported_modules(path)} & scripts, path.name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_script_is_thin_and_runs_from_any_directory(script, tmp_path):
    tree = ast.parse(script.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    assert not functions, f"{script.name} defines code; it belongs in the package"
    assert {m for m in imported_modules(script) if m.startswith("fpdm")}, script.name
    # Python puts the script's folder on sys.path: the package is found without PYTHONPATH.
    proc = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_the_package_modules_import_each_other_without_a_circle():
    graph = {p.stem: package_imports(p) - {p.stem} for p in MODULES}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())
    # The library-like modules do not reach the command lines' modules.
    library = ("data", "diffusion", "files", "metrics", "cli", "models", "run_folder")
    library += ("sampling", "parallel", "reverse", "schedule")
    for low_level in library:
        assert not graph[low_level] & COMMAND_MODULES, low_level


def example_code() -> dict[str, str]:
    """The example's sources without docstrings or comments (formulas in prose do not count)."""
    out = {}
    for path in EXAMPLE:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                    body[0] = ast.Pass()
        out[str(path.relative_to(EXAMPLE_DIR))] = ast.unparse(tree)
    return out


def places(pattern: str) -> list[str]:
    return [name for name, code in example_code().items() for _ in re.finditer(pattern, code)]


def test_the_ddim_update_and_the_guidance_are_written_once():
    # DDIM: x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps; written with ** 0.5 or .sqrt().
    root = r"\s*(\*\*\s*0\.5|\.sqrt\(\))\s*"
    ddim = places(rf"abar_prev{root}\*\s*x0\s*\+")
    assert len(ddim) == 1, ddim
    # x0 from eps: (x - sqrt(1 - abar) eps) / sqrt(abar).
    x0 = places(rf"\(1 - abar\){root}\*\s*eps\)\s*/")
    assert len(x0) == 1, x0
    # Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond).
    guidance = places(r"\+ guidance \* \(")
    assert guidance == ["fpdm/reverse.py"], guidance
    # Eval mode for a sampling run and the model's mode restored afterwards.
    restore = places(r"\.train\(was_training\)")
    assert restore == ["fpdm/reverse.py"], restore


def one_element_list_cells(source: str) -> list[str]:
    """Names bound to a one-element list and then written through ``name[0] = ...`` (a mutable cell)."""
    tree = ast.parse(source)
    singles = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and isinstance(node.value, ast.List)
        and len(node.value.elts) == 1
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    written = {
        target.value.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AugAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
    }
    return sorted(singles & written)


def test_one_lock_owns_the_folders_of_train_sample_and_extract_latents():
    # train.lock, sample.lock and extract.lock are one RunLock: the kernel lock is taken in one place.
    assert places(r"\bflock\(") == ["fpdm/run_folder.py"]
    assert sorted(places(r"\bRunLock\(")) == ["fpdm/generation.py", "fpdm/latents.py", "fpdm/run_folder.py"]


def test_the_cell_detector_finds_a_cell():
    assert one_element_list_cells("first = [True]\ndef f():\n    first[0] = False\n") == ["first"]
    assert one_element_list_cells("xs = [1, 2]\nxs[0] = 3\n") == []


@pytest.mark.parametrize("path", EXAMPLE, ids=lambda p: str(p.relative_to(EXAMPLE_DIR)))
def test_no_one_element_list_is_used_as_a_cell(path):
    assert not one_element_list_cells(path.read_text()), path.name


TESTS = [p for p in sorted((REPO / "tests" / "fpdm").glob("*.py")) if p.name != "test_structure.py"]
MACHINE_NOTES = re.compile("|".join(["/wo" + "rk/", "/ho" + "me/", "-core mach" + "ine", "busy " + r"\d"]))


@pytest.mark.parametrize("path", [*SOURCES, *TESTS], ids=lambda p: str(p.relative_to(REPO)))
def test_no_code_comment_names_a_machine_or_a_path_outside_the_repository(path):
    assert not MACHINE_NOTES.search(path.read_text()), path.name


def test_every_command_line_offers_the_same_solvers_and_estimators():
    from fpdm import generation as sample
    from fpdm import training as train
    from fpdm.training import ESTIMATORS, SOLVERS

    def choices(parser, dest):
        (action,) = [a for a in parser._actions if a.dest == dest]
        return set(action.choices)

    assert choices(train.build_parser(), "solver") == set(SOLVERS)
    assert choices(train.build_parser(), "grad") == set(ESTIMATORS)
    assert choices(sample.build_parser(), "solver") == set(SOLVERS)
    # The solver and estimator names are written once, in training.py's table.
    for path in EXAMPLE:
        if path.name != "training.py":
            text = path.read_text()
            assert not re.search(r"""["']broyden["']""", text), path.name
            assert not re.search(r"""["']phantom["']\s*[:,]""", text), path.name


def test_the_train_command_line_is_generated_from_the_config_fields():
    import dataclasses

    from fpdm import training as train

    flags = {a.dest for a in train.build_parser()._actions} - {"help"}
    assert flags == {f.name for f in dataclasses.fields(train.TrainConfig)}
    for field in dataclasses.fields(train.TrainConfig):
        assert field.metadata["help"], field.name
