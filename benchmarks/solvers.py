"""Our solvers and torchdeq's, side by side in one process on the same problems.

Run::

    python benchmarks/solvers.py            # full run, writes benchmarks/results/solvers.json
    python benchmarks/solvers.py --quick    # fewer repetitions

What is measured, per (problem, solver):

* ``nfe``: evaluations of the map, counted by wrapping it (torchdeq does not report them);
* ``wall_ms``: median wall-clock of the whole solve over ``--reps`` runs, after a warm-up run; the
  solvers of one problem are timed in interleaved rounds so that drift hits them all alike;
* ``residual``: the largest per-sample ``||g(z) - z||`` of the returned ``z``, computed by us for
  every solver alike (one extra evaluation, not timed);
* ``peak_mib``: peak resident memory added by the solve, in a fresh subprocess per problem with
  glibc's mmap threshold pinned to 64 KiB (so freed buffers go back to the OS and the peak of
  resident memory tracks the peak of live tensors); the kernel's high-water mark is reset right before
  each solve through ``/proc/self/clear_refs``.

Two further tables: peak memory of the Broyden solvers against ``max_iter`` (ours must stay flat),
and the overhead of each solver, ``wall / (nfe * one evaluation of f)``, when f is a 3x3
convolution with 16 channels on a state of 64 x 16 x 32 x 32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from implicitdiff.solvers import Anderson, Broyden, Picard

RESULTS = Path(__file__).parent / "results" / "solvers.json"
BATCH, DIM, TOL, MAX_ITER = 64, 256, 1e-6, 300

# name -> (spectral norm of W or "hard", dtype). "hard": W symmetric with eigenvalues evenly spread
# over [-0.99, 0.99]. x ~ 0.1 N(0, 1) keeps tanh near its linear range, so the Jacobian at the
# fixed point is close to W and the contraction factor is what the name says (a large x saturates
# tanh and makes every problem easy).
PROBLEMS: dict[str, tuple[float | str, torch.dtype]] = {
    "tanh |W|=0.5 f32": (0.5, torch.float32),
    "tanh |W|=0.5 f64": (0.5, torch.float64),
    "tanh |W|=0.9 f32": (0.9, torch.float32),
    "tanh |W|=0.9 f64": (0.9, torch.float64),
    "tanh hard f64": ("hard", torch.float64),
}


def make_problem(name: str, seed: int = 0) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The map ``g(z) = tanh(W z + x)`` of a named problem and its starting point ``z0 = 0``."""
    norm, dtype = PROBLEMS[name]
    gen = torch.Generator().manual_seed(seed)
    if norm == "hard":
        q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
        w = (q * torch.linspace(-0.99, 0.99, DIM, dtype=torch.float64)) @ q.T
    else:
        w = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)
        w = w * (float(norm) / torch.linalg.matrix_norm(w, ord=2))
    x = 0.1 * torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)
    w, x = w.to(dtype), x.to(dtype)
    wt = w.T.contiguous()

    def g(z: Tensor) -> Tensor:
        return torch.tanh(z @ wt + x)

    return g, torch.zeros(BATCH, DIM, dtype=dtype)


def _torchdeq(key: str, **kwargs: object) -> Callable[..., Tensor]:
    from torchdeq.solver import get_solver

    solve = get_solver(key)

    def run(g: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float) -> Tensor:
        z, _, _ = solve(g, z0, max_iter=max_iter, tol=tol, stop_mode="abs", **kwargs)
        return z

    return run


def _ours(solver: Callable[..., object]) -> Callable[..., Tensor]:
    def run(g: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float) -> Tensor:
        return solver(g, z0, max_iter=max_iter, tol=tol).z  # type: ignore[attr-defined]

    return run


def solvers() -> dict[str, Callable[..., Tensor]]:
    """Every solver in the comparison, each as ``run(g, z0, max_iter, tol) -> z``."""
    return {
        "ours Picard": _ours(Picard()),
        "ours Anderson(m=6)": _ours(Anderson(m=6)),
        "ours Anderson(m=8)": _ours(Anderson(m=8)),
        "ours Broyden(memory=20)": _ours(Broyden(memory=20)),
        "torchdeq fixed_point_iter": _torchdeq("fixed_point_iter"),
        "torchdeq anderson (m=6)": _torchdeq("anderson"),
        "torchdeq broyden": _torchdeq("broyden"),
    }


class Counted:
    """Wraps a map and counts its evaluations."""

    def __init__(self, g: Callable[[Tensor], Tensor]) -> None:
        self.g, self.calls = g, 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return self.g(z)


def time_problem(name: str, reps: int) -> list[dict[str, object]]:
    """nfe, median wall time and final residual of every solver on one problem."""
    g, z0 = make_problem(name)
    runs = solvers()
    walls: dict[str, list[float]] = {key: [] for key in runs}
    rows: dict[str, dict[str, object]] = {}
    with torch.no_grad():
        for key, run in runs.items():  # warm-up, nfe and residual
            counted = Counted(g)
            z = run(counted, z0, MAX_ITER, TOL)
            residual = float(torch.linalg.vector_norm(g(z) - z, dim=1).max())
            rows[key] = {"nfe": counted.calls, "residual": residual, "reached_tol": residual <= TOL}
        for _ in range(reps):  # interleaved rounds
            for key, run in runs.items():
                start = time.perf_counter()
                run(g, z0, MAX_ITER, TOL)
                walls[key].append(time.perf_counter() - start)
    out = []
    for key in runs:
        out.append(
            {"problem": name, "solver": key, **rows[key], "wall_ms": 1e3 * statistics.median(walls[key])}
        )
    return out


# ---------------------------------------------------------------------------------------------- memory


def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak resident bytes that ``fn`` adds on top of what is resident before it runs."""
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the high-water mark to the current RSS
    fn()
    return max(0, _rss("VmHWM") - before)


def memory_child(spec: str) -> None:
    """Subprocess entry: measure peak memory for a JSON spec and print the result as JSON."""
    job = json.loads(spec)
    g, z0 = make_problem(job["problem"])
    runs = solvers()
    out = {}
    with torch.no_grad():
        for key in job["solvers"]:
            run = runs[key]
            run(g, z0, 3, job["tol"])  # load code paths and kernels before measuring
            out[key] = _peak_extra_bytes(lambda run=run: run(g, z0, job["max_iter"], job["tol"]))
    print(json.dumps(out))


def measure_memory(problem: str, keys: list[str], max_iter: int, tol: float) -> dict[str, int]:
    """Peak memory of each solver on ``problem``, in a fresh subprocess."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    spec = json.dumps({"problem": problem, "solvers": keys, "max_iter": max_iter, "tol": tol})
    done = subprocess.run(
        [sys.executable, __file__, "--memory-child", spec],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------- overhead


def conv_problem(seed: int = 0) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``g(z) = tanh(conv3x3(z) + x)`` on 64 x 16 x 32 x 32, with the convolution scaled to a contraction."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        # ||conv||_2 by power iteration, then scale it to 0.9.
        v = torch.randn(1, 16, 32, 32, generator=gen)
        for _ in range(50):
            v = torch.nn.functional.conv_transpose2d(conv(v), conv.weight, padding=1)
            v = v / v.norm()
        norm = conv(v).norm()
        conv.weight.mul_(0.9 / norm)
    conv.requires_grad_(False)
    x = 0.1 * torch.randn(64, 16, 32, 32, generator=gen)

    def g(z: Tensor) -> Tensor:
        return torch.tanh(conv(z) + x)

    return g, torch.zeros_like(x)


def overhead(reps: int, iters: int = 20) -> list[dict[str, object]]:
    """``wall / (nfe * t_f)`` of each solver, run for a fixed number of evaluations (tol not reached)."""
    g, z0 = conv_problem()
    runs = solvers()
    f_times: list[float] = []
    walls: dict[str, list[float]] = {key: [] for key in runs}
    nfes: dict[str, int] = {}
    with torch.no_grad():
        for key, run in runs.items():
            counted = Counted(g)
            run(counted, z0, iters, 1e-30)
            nfes[key] = counted.calls
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(iters):
                g(z0)
            f_times.append((time.perf_counter() - start) / iters)
            for key, run in runs.items():
                start = time.perf_counter()
                run(g, z0, iters, 1e-30)
                walls[key].append(time.perf_counter() - start)
    t_f = statistics.median(f_times)
    return [
        {
            "solver": key,
            "nfe": nfes[key],
            "wall_ms": 1e3 * statistics.median(walls[key]),
            "f_ms": 1e3 * t_f,
            "overhead": statistics.median(walls[key]) / (nfes[key] * t_f),
        }
        for key in runs
    ]


# ------------------------------------------------------------------------------------------------ main


def _table(rows: list[dict[str, object]], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(row[key], fmt) for key, _, fmt in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per solver")
    parser.add_argument("--quick", action="store_true", help="3 repetitions, for a smoke run")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    reps = 3 if args.quick else args.reps
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    rows: list[dict[str, object]] = []
    for problem in PROBLEMS:
        timed = time_problem(problem, reps)
        peaks = measure_memory(problem, [row["solver"] for row in timed], MAX_ITER, TOL)
        for row in timed:
            row["peak_mib"] = peaks[row["solver"]] / 2**20
        rows.extend(timed)
        print(f"done: {problem}", file=sys.stderr)
    print("\n## Solves to abs tol 1e-6, max_iter 300, batch 64, d 256\n")
    print(
        _table(
            rows,
            [
                ("problem", "problem", ""),
                ("solver", "solver", ""),
                ("nfe", "nfe", "d"),
                ("wall_ms", "wall ms (median)", ".2f"),
                ("residual", "final residual", ".2e"),
                ("reached_tol", "reached tol", ""),
                ("peak_mib", "peak MiB", ".2f"),
            ],
        )
    )

    memory_rows = []
    broydens = ["ours Broyden(memory=20)", "ours Anderson(m=6)", "torchdeq broyden"]
    for max_iter in (50, 300, 1000):
        peaks = measure_memory("tanh hard f64", broydens, max_iter, 1e-300)
        memory_rows += [{"solver": k, "max_iter": max_iter, "peak_mib": v / 2**20} for k, v in peaks.items()]
    memory_rows.sort(key=lambda row: (row["solver"], row["max_iter"]))
    print("\n## Peak memory against max_iter (hard problem, tolerance never reached)\n")
    print(
        _table(
            memory_rows,
            [("solver", "solver", ""), ("max_iter", "max_iter", "d"), ("peak_mib", "peak MiB", ".2f")],
        )
    )

    over = overhead(reps)
    print("\n## Overhead: wall / (nfe x one f), f = 3x3 conv, 16 channels, state 64x16x32x32\n")
    print(
        _table(
            over,
            [
                ("solver", "solver", ""),
                ("nfe", "nfe", "d"),
                ("wall_ms", "wall ms", ".1f"),
                ("f_ms", "one f ms", ".2f"),
                ("overhead", "overhead", ".3f"),
            ],
        )
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {"batch": BATCH, "dim": DIM, "tol": TOL, "max_iter": MAX_ITER, "reps": reps},
        "solves": rows,
        "memory_vs_max_iter": memory_rows,
        "overhead": over,
    }
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
