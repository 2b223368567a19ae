"""The library's test suite at two revisions, timed side by side.

    python -m benchmarks.suite_time --before 79042ff           # against HEAD, 2 rounds
    python -m benchmarks.suite_time --before 79042ff --jobs 2  # and HEAD's suite on 2 pytest-xdist workers
    python -m benchmarks.suite_time --quick --out /tmp/s.json  # one small test file, one round

Each revision is checked out with ``git worktree`` into a temporary folder, and its library suite
(``pytest -q -p no:cacheprovider --ignore=tests/fpdm``, with ``HYPOTHESIS_PROFILE=ci`` as CI runs it) is
run in a fresh process from there, with this interpreter; the revisions alternate, the order reversed in
every other round, so that the load of a shared machine hits both alike. ``--jobs N`` adds a third entry,
the later revision's suite on ``N`` pytest-xdist workers (``-n N --dist loadfile``, as ``make test`` runs
it), alternated with the other two. Recorded per run: wall-clock seconds, the CPU seconds of the pytest
process and its children (the workers included), and pytest's last line (the counts).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness

SUITE = ["-q", "-p", "no:cacheprovider", "--ignore=tests/fpdm"]
QUICK_SUITE = ["-q", "-p", "no:cacheprovider", "tests/test_validate.py"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_suite(tree: Path, args: list[str]) -> dict[str, Any]:
    """One run of pytest in ``tree``: wall and CPU seconds and pytest's summary line."""
    env = os.environ | {"HYPOTHESIS_PROFILE": "ci", "PYTHONDONTWRITEBYTECODE": "1"}
    wall, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    return {
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(children_cpu() - cpu, 1),
        "exit": done.returncode,
        "summary": lines[-1] if lines else done.stderr[-500:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "suite_time.json")
    parser.add_argument("--before", default="79042ff", help="the earlier revision (default: %(default)s)")
    parser.add_argument("--after", default="HEAD", help="the later revision (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each revision")
    parser.add_argument("--jobs", type=int, default=0, help="also time the later revision on N xdist workers")
    args = parser.parse_args(argv)
    suite, rounds = (QUICK_SUITE, 1) if args.quick else (SUITE, args.rounds)
    started = harness.start()
    revisions = {
        name: harness.git("rev-parse", "--short=12", rev)
        for name, rev in (("before", args.before), ("after", args.after))
    }
    entries = {name: (name, suite) for name in revisions}
    if args.jobs:
        entries[f"after, -n {args.jobs}"] = ("after", [*suite, "-n", str(args.jobs), "--dist", "loadfile"])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in entries}
    with tempfile.TemporaryDirectory(prefix="suite-time-") as tmp:
        trees = {name: Path(tmp) / name for name in revisions}
        for name, commit in revisions.items():
            harness.git("worktree", "add", "--detach", str(trees[name]), commit)
        try:
            for round_ in range(rounds):
                for name in list(entries) if round_ % 2 == 0 else list(entries)[::-1]:
                    revision, pytest_args = entries[name]
                    runs[name].append(run_suite(trees[revision], pytest_args))
                    print(f"  {name} ({revisions[revision]}): {runs[name][-1]}", file=sys.stderr)
        finally:
            for tree in trees.values():
                harness.git("worktree", "remove", "--force", str(tree))
    rows = [
        {
            "name": name,
            "commit": revisions[revision],
            "args": " ".join(pytest_args[len(suite) :]),
            "wall_s": statistics.median(r["wall_s"] for r in runs[name]),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs[name]),
            "runs": runs[name],
        }
        for name, (revision, pytest_args) in entries.items()
    ]
    report = {"suite": " ".join(suite), "rounds": rounds, "results": rows}
    return harness.finish(args, "suite_time.json", report, started)


if __name__ == "__main__":
    sys.exit(main())
