"""What every benchmark shares: the record of where it ran, the atomic results writer, timing and memory.

* :func:`metadata` says where a measurement was made; :func:`write_results` writes a results file
  atomically with that record under its ``"meta"`` key, always.
* :func:`parser` gives every script the same ``--quick`` and ``--out``; a quick run never overwrites the
  committed results file (it writes only where ``--out`` says).
* :func:`interleaved` times several runs in alternating rounds, so that a shared machine's load hits
  them alike; :func:`peak_rss_growth` and :func:`run_module` measure peak resident memory in a fresh
  process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: glibc serves every allocation of 64 KiB or more by ``mmap`` and trims at once, so that freed tensors
#: leave the resident set and its high-water mark follows the live tensors (see :func:`peak_rss_growth`).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def processor_name() -> str:
    """The CPU's model name (``platform.processor()`` is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def git_commit() -> str | None:
    """The checkout's commit, with ``+changes`` when tracked files outside ``benchmarks/results`` differ."""
    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return None
    changed = [
        line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
        if "benchmarks/results/" not in line
    ]  # fmt: skip
    return commit + ("+changes" if changed else "")


def metadata(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where and when a measurement was made.

    Returns the machine (``platform.machine()``), processor, cores, torch threads, OS, Python, torch and
    numpy versions, the device's name (``"cpu"`` or the GPU's), the git commit, the date and time in UTC
    (ISO 8601) and the 1, 5 and 15-minute load averages (the machine may be shared).
    """
    dev = torch.device(device)
    meta: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": processor_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }
    if dev.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


class Started(NamedTuple):
    """When a run began: the clock and the load then (``write_results`` records both)."""

    clock: float
    load_average: tuple[float, float, float]


def start() -> Started:
    return Started(time.perf_counter(), os.getloadavg())


def _command() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {Path(sys.argv[0]).name}"
    return " ".join([program, *sys.argv[1:]])


def write_results(
    path: str | Path,
    payload: Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    started: Started | None = None,
    quick: bool = False,
) -> Path:
    """Write ``{"meta": metadata(device) + the command line, ...payload}`` to ``path`` atomically.

    The file is written beside ``path`` under a temporary name and moved into place with ``os.replace``,
    so a reader (or a run cut short) never sees half a file. ``started`` adds the run time and the load
    at the start; ``quick`` marks a smoke run, whose numbers mean nothing.
    """
    if "meta" in payload:
        raise ValueError("payload must not have a 'meta' key: write_results records it")
    meta = metadata(device) | {"command": _command()}
    if started is not None:
        meta["seconds"] = round(time.perf_counter() - started.clock, 1)
        meta["load_average_at_start"] = [round(load, 2) for load in started.load_average]
    if quick:
        meta["quick"] = True
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"meta": meta, **payload}, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {path}", file=sys.stderr)
    return path


def parser(doc: str | None, results: str) -> argparse.ArgumentParser:
    """An argument parser with ``--quick`` and ``--out`` (default ``benchmarks/results/<results>``)."""
    first = (doc or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(description=first)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run in seconds; its numbers mean nothing"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results file (default benchmarks/results/{results}; "
        "a --quick run writes only here)",
    )  # fmt: skip
    parser.set_defaults(results=RESULTS / results)
    return parser


def finish(args: argparse.Namespace, file: str, record: Mapping[str, Any], started: Started) -> int:
    """The end of every script's ``main``: print ``file``'s tables rendered from ``record``
    (:func:`benchmarks.tables.render`), write ``record`` where :func:`out_path` says; returns 0."""
    from benchmarks import tables  # reads JSON only: no import cycle, nothing heavy

    print(tables.render(file, dict(record)))
    if (out := out_path(args)) is not None:
        write_results(out, record, started=started, quick=args.quick)
    return 0


def out_path(args: argparse.Namespace) -> Path | None:
    """Where a run writes: ``--out``, else the results file, except for a quick run (nowhere)."""
    if args.out is not None:
        return Path(args.out)
    return None if args.quick else Path(args.results)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of the repetitions of one run: wall-clock and the process's CPU time."""

    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)


def interleaved(
    runs: Mapping[str, Callable[[], object]],
    reps: int,
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
) -> dict[str, Timing]:
    """Time every run ``reps`` times in rounds (one of each per round, the order reversed every other
    round), after ``warmup`` calls of each; on CUDA the device is synchronised around each call."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    timings = {name: Timing() for name in runs}
    names = list(runs)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name]()
            sync(device)
            timings[name].walls.append(time.perf_counter() - wall)
            timings[name].cpus.append(time.process_time() - cpu)
    return timings


def timed(fn: Callable[[], Any], reps: int, *, device: str | torch.device = "cpu") -> tuple[float, Any]:
    """The median wall-clock seconds of ``reps`` calls of ``fn`` (no warm-up) and the last call's result."""
    walls, out = [], None
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), out


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (memory is measured on Linux only)")


def rss_bytes() -> int:
    """The process's resident set now."""
    return _status_bytes("VmRSS")


def peak_rss_growth(fn: Callable[[], object]) -> int:
    """Peak resident bytes that ``fn`` adds on top of what is resident before it runs.

    The kernel's high-water mark is reset to the current resident set (``/proc/self/clear_refs``) just
    before ``fn``; run the process with :data:`MEMORY_ENV` so that the mark follows live tensors.
    """
    before = rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def run_module(module: str, args: Sequence[str], *, threads: int) -> Any:
    """Run ``python -m module *args`` in a fresh process with :data:`MEMORY_ENV` and ``threads`` threads;
    its last line of output, parsed as JSON."""
    env = {
        **os.environ,
        **MEMORY_ENV,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Counted:
    """Wraps a map and counts its evaluations."""

    def __init__(self, g: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.g, self.calls = g, 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.g(z)
