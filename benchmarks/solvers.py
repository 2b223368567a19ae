"""Our solvers and torchdeq's, side by side in one process on the same problems.

Run::

    python -m benchmarks.solvers            # full run, writes benchmarks/results/solvers.json
    python -m benchmarks.solvers --quick    # 1 repetition, two problems, no memory tables

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
and the driver's rows (:mod:`benchmarks.driver_rows`): host synchronisations per iteration and wall time
against a plain loop of the same evaluations and against torchdeq, in a fixed budget and in tolerance
mode, on a 3x3 convolution with 16 channels on a state of 32 x 16 x 32 x 32 (30 evaluations).
``--device cuda`` runs only the driver's rows, on the GPU problems of :mod:`benchmarks.gpu`, and writes
``benchmarks/results/solvers_cuda.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks import harness, tables
from benchmarks.driver_rows import conv_problem, driver_rows, sequence_problem
from implicitdiff.solvers import Anderson, Broyden, Picard

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


def time_problem(name: str, reps: int) -> list[dict[str, object]]:
    """nfe, median wall time and final residual of every solver on one problem."""
    g, z0 = make_problem(name)
    runs = solvers()
    rows: dict[str, dict[str, object]] = {}
    with torch.no_grad():
        for key, run in runs.items():  # nfe and residual
            counted = harness.Counted(g)
            z = run(counted, z0, MAX_ITER, TOL)
            residual = float(torch.linalg.vector_norm(g(z) - z, dim=1).max())
            rows[key] = {"nfe": counted.calls, "residual": residual, "reached_tol": residual <= TOL}
        timings = harness.interleaved(
            {key: lambda run=run: run(g, z0, MAX_ITER, TOL) for key, run in runs.items()}, reps
        )
    return [{"problem": name, "solver": key, **rows[key], "wall_ms": 1e3 * timings[key].wall} for key in runs]


# ---------------------------------------------------------------------------------------------- memory


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
            out[key] = harness.peak_rss_growth(lambda run=run: run(g, z0, job["max_iter"], job["tol"]))
    print(json.dumps(out))


def measure_memory(problem: str, keys: list[str], max_iter: int, tol: float) -> dict[str, int]:
    """Peak memory of each solver on ``problem``, in a fresh process."""
    spec = json.dumps({"problem": problem, "solvers": keys, "max_iter": max_iter, "tol": tol})
    return harness.run_module("benchmarks.solvers", ["--memory-child", spec], threads=1)


# ------------------------------------------------------------------------------------------- the driver


def driver(reps: int, device: str, quick: bool = False) -> list[dict[str, object]]:
    """Host reads and wall time against a plain loop and torchdeq (``benchmarks/driver_rows.py``).

    CPU: the conv problem of 32 x 16 x 32 x 32 with 30 evaluations per solve. CUDA: the conv problem of
    64 x 64 x 32 x 32 with 100 evaluations and a sequence problem of 32 x 256 x 1152 with 12.
    """
    if device == "cpu":
        problems = [conv_problem(4, 4, 8, 6, device) if quick else conv_problem(32, 16, 32, 30, device)]
    else:
        problems = [conv_problem(64, 64, 32, 100, device), sequence_problem(32, 256, 1152, 12, device)]
    rows: list[dict[str, object]] = []
    for problem in problems:
        rows += driver_rows(problem, reps)
    return rows


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "solvers.json")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per solver")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda; cuda runs the driver rows only")
    # One thread: on a shared machine a second thread spins waiting on the first and times the others' load.
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    started = harness.start()
    reps = 1 if args.quick else args.reps
    torch.set_num_threads(args.threads)
    out = harness.out_path(args)
    if args.device != "cpu":
        record = {"driver": driver(reps, args.device)}
        print(tables.driver_table(record["driver"]))
        if out is not None:
            harness.write_results(out.with_name(f"solvers_{args.device}.json"), record, device=args.device)
        return 0
    problems = list(PROBLEMS)[:2] if args.quick else list(PROBLEMS)
    rows: list[dict[str, object]] = []
    for problem in problems:
        timed = time_problem(problem, reps)
        if not args.quick:
            peaks = measure_memory(problem, [str(row["solver"]) for row in timed], MAX_ITER, TOL)
            for row in timed:
                row["peak_mib"] = peaks[str(row["solver"])] / 2**20
        rows.extend(timed)
        print(f"done: {problem}", file=sys.stderr)
    memory_rows = []
    broydens = ["ours Broyden(memory=20)", "ours Anderson(m=6)", "torchdeq broyden"]
    for max_iter in () if args.quick else (50, 300, 1000):
        peaks = measure_memory("tanh hard f64", broydens, max_iter, 1e-300)
        memory_rows += [{"solver": k, "max_iter": max_iter, "peak_mib": v / 2**20} for k, v in peaks.items()]
    memory_rows.sort(key=lambda row: (row["solver"], row["max_iter"]))
    record = {
        "settings": {"batch": BATCH, "dim": DIM, "tol": TOL, "max_iter": MAX_ITER, "reps": reps},
        "solves": rows,
        "memory_vs_max_iter": memory_rows,
        "driver": driver(reps, "cpu", args.quick),
    }
    print(tables.render("solvers.json", record))
    if out is not None:
        harness.write_results(out, record, started=started, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
