"""The example's README runs as written: its Python blocks in order, its command lines' flags exist."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "examples" / "fpdm"
README = EXAMPLE_DIR / "README.md"

FENCE = re.compile(r"^(`{3,})(.*)$")


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first line, code)`` of every fenced block of a Markdown text."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != opening[1]:
            j += 1
        blocks.append((opening[2].strip(), i + 2, "\n".join(lines[i + 1 : j])))
        i = j + 1
    return blocks


BLOCKS = fenced_blocks(README.read_text(encoding="utf-8"))
PYTHON = [(line, code) for language, line, code in BLOCKS if language == "python"]
BASH = [code for language, _, code in BLOCKS if language == "bash"]


def test_the_fence_reader_finds_blocks_in_order():
    text = "a\n```python\nx = 1\n```\n\n```bash\nls\n```\n"
    assert fenced_blocks(text) == [("python", 3, "x = 1"), ("bash", 7, "ls")]


def test_the_readme_leads_with_the_commands_and_has_python_in_python_fences_only():
    headings = [line for line in README.read_text().splitlines() if line.startswith("## ")]
    assert headings[0] == "## Train, sample, evaluate, sweep"
    assert len(PYTHON) >= 4
    languages = {language.split()[0] for language, _, _ in BLOCKS if language}
    assert languages <= {"python", "bash", "text"}, languages


def test_the_readmes_python_blocks_run_in_order(tmp_path, monkeypatch):
    """Each block runs as written, in one namespace, in an empty folder (what a reader's session is)."""
    module = types.ModuleType("fpdm_readme")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        for line, code in PYTHON:
            exec(compile("\n" * (line - 1) + code, str(README), "exec"), module.__dict__)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "runs" / "tiny" / "checkpoint.pt").is_file()
    assert module.result.spent_total <= 40 and module.fast.sweeps <= 10


def script_commands() -> list[tuple[str, list[str]]]:
    """``(script, arguments)`` of every ``examples/fpdm/<script>.py`` command in the README's bash blocks."""
    commands = []
    for code in BASH:
        joined = code.replace("\\\n", " ")
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            for k, word in enumerate(words):
                match = re.fullmatch(r"examples/fpdm/(\w+)\.py", word)
                if match:
                    commands.append((match[1], words[k + 1 :]))
    return commands


COMMANDS = script_commands()


def test_the_readme_shows_every_script():
    assert {name for name, _ in COMMANDS} == {p.stem for p in EXAMPLE_DIR.glob("*.py")}


@pytest.mark.parametrize("name, argv", COMMANDS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(COMMANDS)])
def test_every_flag_in_the_readmes_commands_exists(name, argv):
    script = (EXAMPLE_DIR / f"{name}.py").read_text()
    (module_name,) = re.findall(r"^from (fpdm\.\w+) import main$", script, flags=re.M)
    parser = importlib.import_module(module_name).build_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    flags = {word.split("=")[0] for word in argv if word.startswith("--")}
    assert flags <= known, f"{name}.py has no {sorted(flags - known)}"
