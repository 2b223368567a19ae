"""The solver driver's rows: host reads per iteration and wall time against a plain loop and torchdeq.

Shared by ``benchmarks.solvers`` (CPU) and ``benchmarks.gpu`` (CUDA). For each problem, solver
and mode, one row:

* ``syncs_per_iter``: host synchronisations per evaluation, counted with
  :class:`implicitdiff.diagnostics.SyncCounter` (on CUDA these are real waits; on the CPU the same
  count stands in for them);
* ``wall_ms``: median time of the solve over interleaved repetitions: wall-clock on CUDA (synchronised
  before and after); on the CPU the process's CPU time (``time.process_time``), which other jobs on a
  shared machine do not inflate (run with one torch thread so that no thread spins while it waits);
* ``plain_ms``: a plain loop ``z = g(z)`` of the same number of evaluations, the limit no solver can beat;
  ``vs_plain`` is ``wall_ms / plain_ms``;
* ``torchdeq_ms``: torchdeq's solver of the same kind run for the same number of iterations (where
  torchdeq is installed), and ``vs_torchdeq``;
* ``overhead``: ``wall / (nfe x one evaluation of g)``;
* ``launches_per_iter``: kernel launches per evaluation beside ``g``'s own, counted with
  :class:`implicitdiff.diagnostics.LaunchCounter` (the same count on every device);
* on CUDA, ``graph_ms``: the same solve replayed from a CUDA graph by a ``DEQLayer`` whose solver is
  :class:`implicitdiff.solvers.Captured` (fixed budgets), and ``plain_graph_ms``: the plain loop
  replayed from a CUDA graph, the limit of launch-free iteration; ``graph_vs_plain`` is
  ``graph_ms / plain_ms``.

Modes: ``fixed`` is ``tol=None`` (a fixed budget, no host reads); ``tol`` is a tolerance that is never
reached, so the solve runs the same number of evaluations but pays for its checks (one host read every
``check_every`` evaluations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks import harness
from implicitdiff import DEQLayer
from implicitdiff.diagnostics import LaunchCounter, SyncCounter
from implicitdiff.solvers import Anderson, Broyden, Captured, Picard

UNREACHABLE_TOL = 1e-30


@dataclass
class Problem:
    """A map ``g(z) = f(z, x)``, its start ``z0`` and the number of evaluations each solve runs."""

    name: str
    f: Callable[[Tensor, Tensor], Tensor]
    x: Tensor
    z0: Tensor
    iters: int

    def g(self, z: Tensor) -> Tensor:
        return self.f(z, self.x)


def conv_problem(batch: int, channels: int, size: int, iters: int, device: str, seed: int = 0) -> Problem:
    """``g(z) = tanh(conv3x3(z) + x)`` with the convolution scaled to spectral norm 0.9 (a contraction)."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        v = torch.randn(1, channels, size, size, generator=gen)
        for _ in range(30):  # ||conv||_2 by power iteration
            v = torch.nn.functional.conv_transpose2d(conv(v), conv.weight, padding=1)
            v = v / v.norm()
        conv.weight.mul_(0.9 / conv(v).norm())
    conv = conv.to(device).requires_grad_(False)
    x = (0.1 * torch.randn(batch, channels, size, size, generator=gen)).to(device)

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(conv(z) + x)

    name = f"conv {batch}x{channels}x{size}x{size}"
    return Problem(name, f, x, torch.zeros_like(x), iters)


def sequence_problem(batch: int, length: int, width: int, iters: int, device: str, seed: int = 0) -> Problem:
    """``g(z) = tanh(z W^T + x)`` on ``(batch, length, width)`` tokens, ``||W||_2 = 0.9``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(width, width, generator=gen)
    w = (0.9 * w / torch.linalg.matrix_norm(w, ord=2)).to(device)
    x = (0.1 * torch.randn(batch, length, width, generator=gen)).to(device)

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + x)

    return Problem(f"sequence {batch}x{length}x{width}", f, x, torch.zeros_like(x), iters)


OURS = {
    "Picard": lambda: Picard(),
    "Anderson(m=6)": lambda: Anderson(m=6),
    "Broyden(20)": lambda: Broyden(20),
}
TORCHDEQ = {"Picard": ("fixed_point_iter", {}), "Anderson(m=6)": ("anderson", {"m": 6}),
            "Broyden(20)": ("broyden", {"LBFGS_thres": 20})}  # fmt: skip


def _torchdeq_run(
    name: str, g: Callable[[Tensor], Tensor], z0: Tensor, iters: int
) -> Callable[[], object] | None:
    """torchdeq's solver of the same kind as ours, run for ``iters`` iterations; ``None`` without torchdeq."""
    try:
        from torchdeq.solver import get_solver
    except ImportError:
        return None
    key, kwargs = TORCHDEQ[name]
    solve = get_solver(key)
    shape = z0.shape

    def g_flat(z: Tensor) -> Tensor:  # torchdeq's Broyden wants (B, n) states
        return g(z.reshape(shape)).reshape(shape[0], -1)

    flat = z0.reshape(shape[0], -1)

    def run() -> object:
        return solve(g_flat, flat, max_iter=iters, tol=UNREACHABLE_TOL, stop_mode="abs", **kwargs)

    return run


def _time(runs: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each run, interleaved: wall-clock on CUDA, the process's CPU time on the CPU."""
    timings = harness.interleaved(runs, reps, device=device)
    return {key: t.wall if device.type == "cuda" else t.cpu for key, t in timings.items()}


def driver_rows(
    problem: Problem, reps: int, solvers: tuple[str, ...] = tuple(OURS)
) -> list[dict[str, object]]:
    """Every (solver, mode) row of one problem; see the module docstring."""
    device = problem.z0.device
    rows: list[dict[str, object]] = []
    with torch.no_grad():

        def plain() -> Tensor:
            z = problem.z0
            for _ in range(problem.iters):
                z = problem.g(z)
            return z

        for name in solvers:
            solver = OURS[name]()

            def ours(g: Callable[[Tensor], Tensor], tol: float | None, solver=solver) -> Callable[[], object]:
                return lambda: solver(g, problem.z0, max_iter=problem.iters, tol=tol)

            def theirs(g: Callable[[Tensor], Tensor], name=name) -> Callable[[], object] | None:
                return _torchdeq_run(name, g, problem.z0, problem.iters)

            makers = {"fixed": lambda g: ours(g, None), "tol": lambda g: ours(g, UNREACHABLE_TOL)}
            if theirs(problem.g) is not None:
                makers["torchdeq"] = theirs
            syncs, nfe, launches = {}, {}, {}
            for key, make in makers.items():
                counted = harness.Counted(problem.g)
                run = make(counted)
                with SyncCounter() as counter, LaunchCounter() as launched:
                    run()
                syncs[key], nfe[key], launches[key] = counter.count, counted.calls, launched.count
            runs: dict[str, Callable[[], object]] = {"plain": plain}
            runs.update({key: make(problem.g) for key, make in makers.items()})
            if device.type == "cuda":
                runs.update(_graph_runs(problem, solver, plain))
            walls = _time(runs, reps, device)
            f_s = walls["plain"] / problem.iters
            f_launches = _launches_of_g(problem)
            for mode in ("fixed", "tol"):
                row: dict[str, object] = {
                    "problem": problem.name,
                    "solver": name,
                    "mode": mode,
                    "nfe": nfe[mode],
                    "syncs_per_iter": syncs[mode] / nfe[mode],
                    "wall_ms": 1e3 * walls[mode],
                    "plain_ms": 1e3 * walls["plain"],
                    "vs_plain": walls[mode] / walls["plain"],
                    "overhead": walls[mode] / (nfe[mode] * f_s),
                    "launches_per_iter": (launches[mode] - f_launches * nfe[mode]) / nfe[mode],
                }
                if mode == "fixed" and "graph" in walls:
                    row.update(
                        graph_ms=1e3 * walls["graph"],
                        plain_graph_ms=1e3 * walls["plain_graph"],
                        graph_vs_plain=walls["graph"] / walls["plain"],
                    )
                if "torchdeq" in walls:
                    row.update(
                        torchdeq_nfe=nfe["torchdeq"],
                        torchdeq_syncs_per_iter=syncs["torchdeq"] / max(nfe["torchdeq"], 1),
                        torchdeq_ms=1e3 * walls["torchdeq"],
                        vs_torchdeq=walls[mode] / walls["torchdeq"],
                    )
                rows.append(row)
    return rows


def _launches_of_g(problem: Problem) -> int:
    with LaunchCounter() as launched:
        problem.g(problem.z0)
    return launched.count


def _graph_runs(
    problem: Problem, solver: Callable[..., object], plain: Callable[[], Tensor]
) -> dict[str, Callable[[], object]]:
    """On CUDA: the fixed-budget solve replayed by :class:`Captured`, and the plain loop as a CUDA graph."""
    layer = DEQLayer(problem.f, solver=Captured(solver), max_iter=problem.iters, tol=None).eval()

    def graph() -> object:
        return layer(problem.x, problem.z0)

    graph()  # captures
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        plain()
    torch.cuda.current_stream().wait_stream(stream)
    plain_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(plain_graph):
        plain()
    return {"graph": graph, "plain_graph": plain_graph.replay}
