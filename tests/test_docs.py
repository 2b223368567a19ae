"""Every Python code block in the docs and the README runs.

The ```python blocks of a page run in order in one namespace (a fresh module per page), so a page
reads like a session. A block may be marked compile-only, and then is only compiled, when it cannot
run on a CPU-only machine in one process; the marker is an HTML comment on the line right before
the fence, and must say why:

    <!-- docs-test: compile-only (needs torchrun) -->

Python written in any other fence (```py, ```{code-block} python, ...) fails the test, so that no
example escapes it.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIPPED_DIRS = {"_build", "_generated", "generated"}

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
COMPILE_ONLY = re.compile(r"^\s*<!--\s*docs-test:\s*compile-only\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
# The only reasons a block may be compile-only: it needs hardware or a launcher a test cannot provide.
ALLOWED_REASON = re.compile(r"\b(GPU|CUDA|torchrun)\b")
MAX_COMPILE_ONLY = 4
# Longer lines scroll sideways in the rendered page (furo's content column shows about 90 characters).
MAX_CODE_LINE = 88
# The modules whose public names (``__all__``) must each be documented in docs/api/.
API_MODULES = (
    "implicitdiff",
    "implicitdiff.solvers",
    "implicitdiff.gradients",
    "implicitdiff.regularizers",
    "implicitdiff.functional",
    "implicitdiff.chain",
    "implicitdiff.chain_secant",
    "implicitdiff.diagnostics",
    "implicitdiff.nn",
    "implicitdiff.layer",
)
PYTHON_LIKE = re.compile(r"^\s*(\{(code-block|code|sourcecode)\}\s*)?(py|python3?|pycon|ipython3?)\b", re.I)


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first line of code
    code: str
    compile_only: str | None  # the reason, when marked


def pages() -> list[Path]:
    found = [
        path
        for path in sorted(DOCS.rglob("*.md"))
        if not SKIPPED_DIRS.intersection(path.relative_to(DOCS).parts)
    ]
    return [ROOT / "README.md", *found]


def extract(page: Path) -> tuple[list[Block], list[str]]:
    """The ```python blocks of a page, and the problems found (Python hidden in another fence)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        body_start = i + 1
        j = body_start
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence):
                if not closing["info"].strip():
                    break
            j += 1
        body = lines[body_start:j]
        language = info.split()[0] if info.split() else ""
        where = f"{page.relative_to(ROOT)}:{i + 1}"
        if language == "python":
            marker = COMPILE_ONLY.match(lines[i - 1]) if i > 0 else None
            indent = len(opening["indent"])
            code = "\n".join(line[indent:] for line in body)
            blocks.append(Block(page, body_start + 1, code, marker["reason"] if marker else None))
        elif PYTHON_LIKE.match(info):
            problems.append(f"{where}: Python in a `{fence}{info}` fence is not tested; use ```python")
        i = j + 1
    return blocks, problems


ALL = {page: extract(page) for page in pages()}
RUNNABLE = [page for page, (blocks, _) in ALL.items() if blocks]


def test_the_docs_have_python_blocks_and_no_hidden_ones():
    assert sum(len(blocks) for blocks, _ in ALL.values()) >= 10, "the extractor found almost nothing"
    assert ROOT / "README.md" in RUNNABLE
    problems = [problem for _, found in ALL.values() for problem in found]
    assert not problems, "\n".join(problems)


def test_compile_only_blocks_are_rare_and_justified():
    marked = [block for blocks, _ in ALL.values() for block in blocks if block.compile_only]
    for block in marked:
        assert ALLOWED_REASON.search(block.compile_only), (
            f"{block.page.relative_to(ROOT)}:{block.line}: compile-only is allowed only for blocks that "
            f"need a GPU or torchrun, got reason {block.compile_only!r}"
        )
    assert len(marked) <= MAX_COMPILE_ONLY, f"{len(marked)} compile-only blocks; keep them rare"


def test_docs_code_lines_fit_the_page():
    long = [
        f"{block.page.relative_to(ROOT)}:{block.line + i}: {len(line)} characters"
        for page, (blocks, _) in ALL.items()
        if page.is_relative_to(DOCS)
        for block in blocks
        for i, line in enumerate(block.code.splitlines())
        if len(line) > MAX_CODE_LINE
    ]
    assert not long, f"code lines longer than {MAX_CODE_LINE} characters:\n" + "\n".join(long)


def test_every_public_name_is_in_the_api_reference():
    """Each name in a public module's ``__all__`` is documented (by any public path) in docs/api/."""
    import importlib

    text = "\n".join(path.read_text(encoding="utf-8") for path in sorted((DOCS / "api").glob("*.md")))
    documented = set(re.findall(r"\b(implicitdiff(?:\.\w+)+)", text))
    missing = []
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                continue  # a submodule: its own names are checked
            paths = {
                f"{other}.{name}"
                for other in API_MODULES
                if getattr(importlib.import_module(other), name, None) is obj
            }
            if not paths & documented:
                missing.append(f"{module_name}.{name}")
    assert not missing, "public names missing from docs/api/*.md: " + ", ".join(missing)


def test_every_name_in_the_api_reference_is_public():
    """Each name a docs/api/ page documents is in the ``__all__`` of a public module (no private path)."""
    import importlib

    text = "\n".join(path.read_text(encoding="utf-8") for path in sorted((DOCS / "api").glob("*.md")))
    directive = r"^\.\. auto(?:class|function|data|exception|module|method|attribute)::\s+([\w.]+)"
    names = set(re.findall(directive, text, flags=re.M))
    names |= set(re.findall(r"^   (implicitdiff(?:\.\w+)+)\s*$", text, flags=re.M))  # autosummary entries
    private = []
    for name in sorted(names):
        parts = name.split(".")
        if any(part.startswith("_") and part != "__call__" for part in parts):
            private.append(name)
            continue
        if _is_module(name):
            continue  # a module
        module_name, attr = ".".join(parts[:-1]), parts[-1]
        if not _is_module(module_name):
            continue  # a member of a class (Class.method)
        if attr not in getattr(importlib.import_module(module_name), "__all__", ()):
            private.append(name)
    assert not private, "names on API pages that are not public: " + ", ".join(private)


#: A dotted name of the library on a page: ``implicitdiff.solvers.Captured``, ``implicitdiff.nn.forget``.
LIBRARY_NAME = re.compile(r"(?<![\w./])implicitdiff(?:\.[A-Za-z_]\w*)+")


def test_every_library_name_on_a_page_exists():
    """A page names no removed or misspelt object: each ``implicitdiff.x.y`` it writes imports."""
    missing = [
        f"{page.relative_to(ROOT)}: {name}"
        for page in user_doc_pages()
        for name in sorted(set(LIBRARY_NAME.findall(page.read_text(encoding="utf-8"))))
        if not _names_something(name)
    ]
    assert not missing, "names that do not exist:\n" + "\n".join(missing)


def _names_something(dotted: str) -> bool:
    """Whether ``dotted`` is a module, a member of one, or an attribute its class documents."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        if not _is_module(".".join(parts[:cut])):
            continue
        obj: object = importlib.import_module(".".join(parts[:cut]))
        for i, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                # an instance attribute that the class's docstring lists (``last_backward : ...``)
                last = i == len(parts) - 1
                doc = getattr(obj, "__doc__", None) or ""
                return last and isinstance(obj, type) and re.search(rf"^\s*{attr}\s*:", doc, re.M) is not None
            obj = getattr(obj, attr)
        return True
    return False


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda page: str(page.relative_to(ROOT)))
def test_page_code_runs(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    blocks, _ = ALL[page]
    name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(ROOT)))
    module = types.ModuleType(name)
    module.__file__ = str(page)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses and pickling look the module up
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the examples' tensors are tiny: more threads only add contention
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for block in blocks:
        # Pad with newlines so a traceback names the line of the page the failing code is on.
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        if block.compile_only:
            continue
        exec(code, module.__dict__)


def _library_modules() -> list[str]:
    import pkgutil

    import implicitdiff

    names = [implicitdiff.__name__]
    for info in pkgutil.walk_packages(implicitdiff.__path__, prefix="implicitdiff."):
        names.append(info.name)
    return names


@pytest.mark.parametrize("module_name", _library_modules())
def test_docstring_examples_run(module_name: str) -> None:
    """The ``>>>`` examples in the docstrings, which the API reference shows, run and print what they say."""
    import doctest
    import importlib

    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        torch.manual_seed(0)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"


# --- User docs speak of the software, not of how it was made -----------------------------------------

#: Phrases that belong to the project's history (issue threads, benchmark runs, review rounds), never to
#: a page a user reads. Each is a case-insensitive regular expression, precise enough not to catch
#: ordinary prose ("rounds" of a parallel sampler, a solver that "runs" 50 evaluations).
HISTORY = {
    r"\bissues? #\s*\d+": "an issue number",
    r"\bissue \d+\b": "an issue number",
    r"\bclosing notes?\b": "the issues' closing notes",
    r"\bthe issue's\b": "the issue tracker",
    r"\btarget of (the|this) issue\b": "the issue tracker",
    r"\bnot measured yet\b": "a promise instead of a figure",
    r"\bround [1-9]\b": "a review round",
    r"\b(gpu )?run [1-9]\b(?! (step|evaluation|iteration|time|sweep)s?\b)": "a benchmark run's number",
    r"\brun[ _]?[1-9]'s\b": "a benchmark run's number",
    r"\bsolvers_run[1-9]\b": "a benchmark run's number",
    r"\b(before|after) this change\b": "a change the reader never saw",
    r"\bworktree\b": "how the project is worked on",
    r"(?<![\w/&(])#\d+(?![\w-])": "an issue number",
    r"\bthe target we set\b": "a goal of the project, not a property of the software",
    r"\bthe older target\b": "a goal of the project, not a property of the software",
    # "as asked" as a remark about the work ("(as asked)", "as asked by"), not "labels as asked" (the class
    # a sample was asked for).
    r"(^|[(,;:.]\s*)as asked\b|\bas asked (by|in)\b": "a request the reader never saw",
    r"\bno GPU has run it yet\b": "a promise instead of a figure",
    r"\bnow warns\b": "a change the reader never saw",
}
HISTORY_RE = [(re.compile(pattern, re.IGNORECASE), why) for pattern, why in HISTORY.items()]


#: Pages rewritten on another branch: this branch checks them (strictly: a pass is reported, so the entry
#: is removed once that branch is merged) without failing on text it does not own.
HISTORY_PENDING: dict[str, str] = {}

#: The changelogs speak of the software too: no tracker a user cannot see.
CHANGELOGS = [ROOT / "CHANGELOG.md", ROOT / "examples" / "fpdm" / "CHANGELOG.md"]
ISSUE_NUMBER = re.compile(r"\bissues? #?\s*\d+\b|(?<![\w/&(])#\d+(?![\w-])", re.IGNORECASE)


def user_doc_pages() -> list[Path]:
    """Every page a user reads: the docs' Markdown, the README, and the FPDM example's README."""
    extra = [ROOT / "examples" / "fpdm" / "README.md"]
    return [page for page in [*pages(), *extra] if page.exists()]


def history_found(text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for pattern, why in HISTORY_RE:
            match = pattern.search(line)
            if match:
                found.append(f"{number}: {match.group(0)!r} ({why})")
    return found


def test_history_patterns_catch_history_and_spare_prose():
    history = [
        "See issue #13.",
        "the closing notes of the issues",
        "The issue's target is not met",
        "Not measured yet",
        "ratio, run 1 | ratio, run 2",
        "GPU run 2 (H100)",
        "as in round 2",
        "5,027 ms before this change",
        "as in #12",
        "Where it falls short of the target we set",
        "The older target printed by the script",
        "as asked by the review",
        "Dropout is per call (as asked).",
        "no GPU has run it yet",
        "solve_chain now warns when given it",
    ]
    prose = [
        "11 or 12 rounds cost 5.2 to 5.7 times the evaluations",
        "every sweep finalises one step per round",
        "a solve may run 4 evaluations past the moment",
        "runs 2 Picard iterations per timestep",
        "the first round of the sampler",
        "issues a warning once",
        "the issues with BatchNorm",
        "the class that was asked for",
        "the fraction the classifier labels as asked",
        "see [the backward](troubleshooting.md#8-the-backward-solve-warns)",
        "[item 8](#8-the-backward-solve-warns)",
        "a warning is raised",
    ]
    assert all(history_found(text) for text in history), [t for t in history if not history_found(t)]
    assert not any(history_found(text) for text in prose), [t for t in prose if history_found(t)]


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(
            page,
            marks=pytest.mark.xfail(strict=True, reason=HISTORY_PENDING[page.relative_to(ROOT).as_posix()])
            if page.relative_to(ROOT).as_posix() in HISTORY_PENDING
            else (),
        )
        for page in user_doc_pages()
    ],
    ids=lambda page: str(page.relative_to(ROOT)),
)
def test_user_docs_carry_no_project_history(page: Path) -> None:
    found = history_found(page.read_text(encoding="utf-8"))
    assert not found, f"{page.relative_to(ROOT)} speaks of how the project was made:\n" + "\n".join(found)


@pytest.mark.parametrize("changelog", CHANGELOGS, ids=lambda page: str(page.relative_to(ROOT)))
def test_changelogs_name_no_issue_numbers(changelog: Path) -> None:
    assert ISSUE_NUMBER.search("Fixed (issue 23: nothing lost)") and ISSUE_NUMBER.search("see #7")
    found = [
        f"{number}: {match.group(0)!r}"
        for number, line in enumerate(changelog.read_text(encoding="utf-8").splitlines(), start=1)
        if (match := ISSUE_NUMBER.search(line))
    ]
    assert not found, f"{changelog.relative_to(ROOT)} names issues users cannot see:\n" + "\n".join(found)


def test_generated_tables_carry_no_project_history(tmp_path: Path) -> None:
    """The tables the docs build renders from benchmarks/results/ (and their fallbacks) say no history."""
    from benchmarks import tables

    snippets = tables.generate(ROOT, tmp_path)
    snippets["no results file"] = tables.not_measured("`x.json`", "python -m benchmarks.x")
    found = {name: history_found(text) for name, text in snippets.items()}
    assert not any(found.values()), {name: lines for name, lines in found.items() if lines}


# --- Measured figures come from the results files ----------------------------------------------------

#: A table cell that is a figure: a number with an optional sign, unit and parenthesis ("790 ms (1.37x)").
FIGURE = re.compile(
    r"^[~<>]?\s*[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?\s*(%|x|ms|s|GB|MiB|M)?(\s*\(.*\))?$", re.IGNORECASE
)
#: The comment that lets a table of figures that are not measurements stay on a page, with its reason.
NOT_MEASURED = re.compile(r"^\s*<!--\s*not measured:\s*\S.*-->\s*$")
INCLUDE = re.compile(r"^```\{include\}\s+(?:\.\./)?_generated/(?P<name>[\w-]+)\.md\s*$")


def figure_tables(text: str) -> list[str]:
    """Where ``text`` has a Markdown table with a figure in a body cell and no ``not measured`` comment."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines[:-1]):
        if not (line.startswith("|") and re.match(r"^\|\s*:?-", lines[i + 1])):
            continue
        if i > 0 and (lines[i - 1].startswith("|") or NOT_MEASURED.match(lines[i - 1])):
            continue
        body = []
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            body += [
                re.sub(r"`[^`]*`|\$[^$]*\$|\*\*", "", cell).strip() for cell in row.strip("|").split("|")
            ]
        figures = [cell for cell in body if FIGURE.match(cell)]
        if figures:
            found.append(f"line {i + 1}: a table with figures such as {figures[:3]}")
    return found


def test_the_figure_rule_flags_measured_tables_and_spares_the_others():
    measured = "| preset | eager | compiled |\n|---|---|---|\n| FPDM | 576 ms | 790 ms (1.37x slower) |\n"
    counts = "| rule | sweeps |\n| --- | ---: |\n| Picard | 7233 |\n"
    ratios = "| mode | ratio |\n|---|---|\n| forward | **1.01** |\n"
    words = "| field | shape |\n| --- | --- |\n| `z` | like `x` |\n| `nfe` | int, `(B,)` |\n"
    marked = "<!-- not measured: parameter counts -->\n" + counts
    assert all(figure_tables(table) for table in (measured, counts, ratios))
    assert not figure_tables(words) and not figure_tables(marked)


@pytest.mark.parametrize("page", user_doc_pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_no_table_of_measured_figures_is_written_by_hand(page: Path) -> None:
    """Measured tables are generated from benchmarks/results/ and included from docs/_generated/."""
    found = figure_tables(page.read_text(encoding="utf-8"))
    assert not found, (
        f"{page.relative_to(ROOT)} has tables of figures written by hand; generate them in "
        "benchmarks/tables.py and include them, or mark a table that holds no measurement with "
        "<!-- not measured: why -->:\n" + "\n".join(found)
    )


def test_every_included_table_is_generated(tmp_path: Path) -> None:
    from benchmarks import tables

    generated = set(tables.generate(ROOT, tmp_path))
    included = {
        (page.relative_to(ROOT).as_posix(), match["name"])
        for page in pages()
        for line in page.read_text(encoding="utf-8").splitlines()
        if (match := INCLUDE.match(line))
    }
    assert len(included) >= 20
    assert not {name for _, name in included} - generated, sorted(included)
    snippets = tables.generate(ROOT, tmp_path)
    missing = sorted({name for _, name in included if "No results file" in snippets[name]})
    assert not missing, f"the results files behind {missing} are missing"


def test_every_quoted_figure_says_what_its_results_file_says() -> None:
    from benchmarks import quotes

    stale = []
    for quote, expected in quotes.rendered():
        page = " ".join((ROOT / quote.page).read_text(encoding="utf-8").split())
        if " ".join(expected.split()) not in page:
            stale.append(f"{quote.page}: should read {expected!r} (from benchmarks/results/{quote.file})")
    assert not stale, "prose figures out of step with their results files:\n" + "\n".join(stale)


def test_pages_run_benchmarks_as_modules() -> None:
    """``python -m benchmarks.<name>`` names a script that exists; the path form no longer runs."""
    for page in user_doc_pages():
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"python3? benchmarks/", text), (
            f"{page.relative_to(ROOT)}: use python -m benchmarks.x"
        )
        for name in re.findall(r"python -m benchmarks\.(\w+)", text):
            assert (ROOT / "benchmarks" / f"{name}.py").exists(), (
                f"{page.relative_to(ROOT)}: no benchmarks.{name}"
            )
