"""The package's metadata agrees with itself: one version everywhere, the declared torch floor is the
one CI tests, the license and the typing marker ship. `make package-check` checks the built archives."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import implicitdiff

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def torch_floor(pyproject: dict) -> str:
    (spec,) = [dep for dep in pyproject["project"]["dependencies"] if re.match(r"torch\b", dep)]
    match = re.search(r">=\s*([0-9.]+)", spec)
    assert match, f"the torch requirement {spec!r} has no lower bound"
    return match.group(1)


def test_version_is_read_from_the_package(pyproject):
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "implicitdiff.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", implicitdiff.__version__)


def test_installed_metadata_has_the_same_version():
    try:
        installed = importlib.metadata.version("implicitdiff")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("implicitdiff is not installed (pip install -e . records its metadata)")
    assert installed == implicitdiff.__version__, (
        f"installed metadata says {installed}, implicitdiff.__version__ says {implicitdiff.__version__}: "
        "reinstall (pip install -e .) after changing the version"
    )


def test_changelog_and_citation_name_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(implicitdiff.__version__)}\]", changelog, re.M)
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert re.search(rf"^version: {re.escape(implicitdiff.__version__)}$", citation, re.M)
    assert re.search(r"^cff-version: 1\.2\.0$", citation, re.M)
    assert "Fixed Point Diffusion Models" in citation


def test_license_is_mit_everywhere(pyproject):
    assert pyproject["project"]["license"] == "MIT"
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "implicitdiff developers" in text
    assert re.search(r"^license: MIT$", (ROOT / "CITATION.cff").read_text(encoding="utf-8"), re.M)


def test_py_typed_ships(pyproject):
    assert (Path(implicitdiff.__file__).parent / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["implicitdiff"]
    assert "Typing :: Typed" in pyproject["project"]["classifiers"]


def test_declared_torch_floor_is_the_one_ci_tests(pyproject):
    floor = torch_floor(pyproject)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^FLOOR_TORCH \?= torch==([0-9.]+)$", makefile, re.M)
    assert match, "the Makefile sets no FLOOR_TORCH"
    tested = match.group(1)
    assert tested.split(".")[:2] == floor.split(".")[:2], (
        f"pyproject declares torch>={floor} but make test-floor tests torch {tested}"
    )
    for page in ("README.md", "docs/getting-started.md", "docs/index.md"):
        text = (ROOT / page).read_text(encoding="utf-8")
        assert f"PyTorch {floor} or later" in text, f"{page} does not state PyTorch {floor} or later"


def test_python_classifiers_match_requires_python(pyproject):
    low = re.fullmatch(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"])
    assert low, pyproject["project"]["requires-python"]
    minors = sorted(
        int(c.rsplit(".", 1)[1])
        for c in pyproject["project"]["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert minors and minors[0] == int(low.group(1)), (minors, low.group(0))
