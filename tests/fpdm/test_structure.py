"""The example's code stays carried-on code: short functions, no import circle, one registry of names."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "examples" / "fpdm"
MODULES = sorted(EXAMPLE_DIR.glob("*.py"))
SOURCES = [*MODULES, *sorted((REPO / "benchmarks").glob("fpdm_*.py"))]
MAX_BODY_LINES = 80


def body_lines(node: ast.FunctionDef, lines: list[str]) -> int:
    """Lines of code of a function's body: no docstring, blank lines or comment lines."""
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not body:
        return 0
    code = lines[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in code if line.strip() and not line.strip().startswith("#"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
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


def local_imports(path: Path) -> set[str]:
    names = {p.stem for p in MODULES}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & names - {path.stem}


def test_the_example_modules_import_each_other_without_a_circle():
    graph = {p.stem: local_imports(p) for p in MODULES}
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
    # The library-like modules do not reach the command lines.
    for low_level in ("data", "diffusion", "files", "metrics", "registry", "cli", "models", "run_folder"):
        assert not graph[low_level] & {"train", "sample", "sweep", "evaluate", "demo"}, low_level


TESTS = [p for p in sorted((REPO / "tests" / "fpdm").glob("*.py")) if p.name != "test_structure.py"]
MACHINE_NOTES = re.compile("|".join(["/wo" + "rk/", "/ho" + "me/", "-core mach" + "ine", "busy " + r"\d"]))


@pytest.mark.parametrize("path", [*SOURCES, *TESTS], ids=lambda p: p.name)
def test_no_code_comment_names_a_machine_or_a_path_outside_the_repository(path):
    assert not MACHINE_NOTES.search(path.read_text()), path.name


def test_every_command_line_offers_the_registrys_solvers_and_estimators():
    import sample
    import train
    from registry import ESTIMATORS, SOLVERS

    def choices(parser, dest):
        (action,) = [a for a in parser._actions if a.dest == dest]
        return set(action.choices)

    assert choices(train.build_parser(), "solver") == set(SOLVERS)
    assert choices(train.build_parser(), "grad") == set(ESTIMATORS)
    assert choices(sample.build_parser(), "solver") == set(SOLVERS)
    # The solver and estimator names are written once, in registry.py.
    for path in MODULES:
        if path.name != "registry.py":
            text = path.read_text()
            assert not re.search(r"""["']broyden["']""", text), path.name
            assert not re.search(r"""["']phantom["']\s*[:,]""", text), path.name


def test_the_train_command_line_is_generated_from_the_config_fields():
    import dataclasses

    import train

    flags = {a.dest for a in train.build_parser()._actions} - {"help"}
    assert flags == {f.name for f in dataclasses.fields(train.TrainConfig)}
    for field in dataclasses.fields(train.TrainConfig):
        assert field.metadata["help"], field.name
