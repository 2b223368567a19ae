"""Parallel in time: sweeps and evaluations of solve_chain against the sequential recurrence.

Run::

    python -m benchmarks.chain           # prints the tables, writes benchmarks/results/chain.json
    python -m benchmarks.chain --quick   # every fourth method, one timed run, 6 chains of the grid

Three chains:

* ``tanh``: 50 steps ``x_{k+1} = tanh(A_k x_k + b_k)``, ``||A_k||_2 = 0.9``, 64 dimensions (an RNN),
  float32, tolerance 1e-5 (absolute, per step);
* ``euler``: 50 steps of explicit Euler on ``dx/dt = tanh(W x + sin t) - x`` over ``t in [0, 2]``, 64
  dimensions (steps close to the identity, as in a diffusion sampler), float32, tolerance 1e-5;
* ``ddim``: 100 deterministic DDIM steps (eta = 0, the linear schedule of DDPM, trailing spacing) of
  64 samples of a 16-dimensional Gaussian mixture whose noise prediction is exact (so the chain is
  a real diffusion sampler's, with no network), float64, ParaDiGMS's noise-scaled tolerance
  ``tol_k = 1e-4 * sigma_k * sqrt(numel)`` on each step (RMS per entry ``1e-4 sigma_k``).

And the grid of :mod:`benchmarks.chain_grid`: 252 small chains (12, 30 and 60 steps, gains 0.5 to 1.1,
tanh and affine, both forms, full window and 8, three seeds; float64, tol 1e-8), on which the script
counts, per rule, the chains where it took more sweeps than Picard on the same form and window.

Per method: ``sweeps`` (sequential rounds: batched calls of the step), ``evaluations`` (steps
evaluated, summed over the calls), the largest distance of any state to the sequential rollout, and
the median wall-clock of 5 runs on one thread (a shared CPU: noisy, for scale only), for both maps
(``form="step"`` and ``form="cumulative"``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from benchmarks import harness
from benchmarks.chain_grid import GRID, grid_sweeps
from implicitdiff import Anderson, Broyden, ChainRuleWarning, ChainSecant, Picard, solve_chain

STEPS, DIM, TOL, REPS = 50, 64, 1e-5, 5
DDIM_STEPS, DDIM_TAU = 100, 1e-4


def tanh_chain() -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(STEPS, DIM, DIM, generator=generator)
    A = 0.9 * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    b = torch.randn(STEPS, DIM, generator=generator)

    def step(k: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(torch.einsum("kij,kj->ki", A[k], x) + b[k])

    return step, torch.randn(DIM, generator=generator)


def euler_chain() -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    generator = torch.Generator().manual_seed(1)
    W = 1.5 * torch.randn(DIM, DIM, generator=generator) / DIM**0.5
    h = 2.0 / STEPS

    def step(k: Tensor, x: Tensor) -> Tensor:
        t = k.to(x.dtype)[:, None] * h
        return x + h * (torch.tanh(x @ W.T + torch.sin(t)) - x)

    return step, torch.randn(DIM, generator=generator)


def ddim_chain() -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor, Tensor]:
    """DDIM on a Gaussian mixture with its exact noise prediction; returns ``step``, ``x0`` and ``tol``."""
    generator = torch.Generator().manual_seed(2)
    dim, components, samples, var = 16, 6, 64, 0.05
    means = torch.randn(components, dim, generator=generator, dtype=torch.float64)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t = torch.arange(1000, 0, -1000 // DDIM_STEPS) - 1  # trailing spacing: 999, 989, ..., 9
    a, a_next = abar[t], torch.cat([abar[t[1:]], abar.new_ones(1)])

    def eps(x: Tensor, a: Tensor) -> Tensor:  # x (k, samples, dim), a (k, 1, 1)
        diff = x[:, :, None] - a[..., None].sqrt() * means  # (k, samples, components, dim)
        v = (a * var + 1 - a)[..., None]
        weights = torch.softmax(-(diff**2).sum(-1) / (2 * v[..., 0]), dim=-1)
        score = -(weights[..., None] * diff).sum(2) / v[..., 0]
        return -(1 - a).sqrt() * score

    def step(k: Tensor, x: Tensor) -> Tensor:
        ak, an = a[k][:, None, None], a_next[k][:, None, None]
        e = eps(x, ak)
        return an.sqrt() * (x - (1 - ak).sqrt() * e) / ak.sqrt() + (1 - an).sqrt() * e

    x0 = torch.randn(samples, dim, generator=generator, dtype=torch.float64)
    return step, x0, DDIM_TAU * (1 - a).sqrt() * (samples * dim) ** 0.5


def sequential(step: Callable[[Tensor, Tensor], Tensor], x0: Tensor, steps: int = STEPS) -> Tensor:
    xs = [x0]
    for k in range(steps):
        xs.append(step(torch.tensor([k]), xs[-1][None])[0])
    return torch.stack(xs)


#: (method, rule factory, window, form), in the order of the table.
METHODS: list[tuple[str, Callable[[], Any], int | None, str]] = [
    ("Picard", Picard, None, "step"),
    ("Picard", Picard, 10, "step"),
    ("Anderson(m=5)", lambda: Anderson(m=5), None, "step"),
    ("Broyden(memory=10)", lambda: Broyden(memory=10), None, "step"),
    ("ChainSecant(m=3)", ChainSecant, None, "step"),
    ("ChainSecant(m=3)", ChainSecant, 10, "step"),
    ("Picard (ParaDiGMS)", Picard, None, "cumulative"),
    ("Picard (ParaDiGMS)", Picard, 10, "cumulative"),
    ("Anderson(m=5)", lambda: Anderson(m=5), None, "cumulative"),
    ("Anderson(m=5)", lambda: Anderson(m=5), 10, "cumulative"),
    ("Broyden(memory=10)", lambda: Broyden(memory=10), None, "cumulative"),
    ("ChainSecant(m=3)", ChainSecant, None, "cumulative"),
    ("ChainSecant(m=3)", ChainSecant, 10, "cumulative"),
]

#: The rules counted on the test grid (each against Picard on the same form and window).
GRID_RULES: dict[str, Callable[[], Any]] = {
    "Anderson(m=3)": lambda: Anderson(m=3),
    "Broyden(memory=4)": lambda: Broyden(memory=4),
    "ChainSecant(m=3)": ChainSecant,
}


def timed(run: Callable[[], Any], reps: int) -> tuple[Any, float]:
    """The result of ``run`` and its median wall-clock in ms over ``reps`` runs after a warm-up (none in a
    quick run, ``reps == 1``, whose times are for scale only)."""
    if reps > 1:
        run()
    seconds, out = harness.timed(run, reps)
    return out, 1e3 * seconds


def chain_rows(
    name: str, step: Callable[[Tensor, Tensor], Tensor], x0: Tensor, steps: int, tol: Any, reps: int,
    methods: list = METHODS, extra: tuple = (),
) -> list[dict[str, Any]]:  # fmt: skip
    """The sequential row and one row per entry of ``methods`` (and of ``extra``) on one chain."""
    reference, wall = timed(lambda: sequential(step, x0, steps), reps)
    rows = [
        {"chain": name, "method": "sequential", "form": "", "window": 1, "sweeps": steps}
        | {"evaluations": steps, "max_error": 0.0, "converged": True, "wall_ms": wall}
    ]
    for method, solver, window, form in [*methods, *extra]:

        def run(solver=solver, window=window, form=form) -> Any:
            return solve_chain(step, x0, steps, solver=solver(), tol=tol, window=window, form=form)

        out, wall = timed(run, reps)
        error = float((out.zs - reference).flatten(1).norm(dim=1).max())
        rows.append(
            {"chain": name, "method": method, "form": form, "window": window or steps}
            | {"sweeps": out.sweeps, "evaluations": out.total_evaluations, "max_error": error}
            | {"converged": out.all_converged, "wall_ms": wall}
        )
    return rows


def grid_counts(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rule of ``GRID_RULES`` and Picard: sweeps over ``cases`` of the grid, and the chains where it
    took more than Picard (every solve checked against the sequential rollout)."""
    totals = {name: {"sweeps": 0, "worse": 0, "worst_excess": 0} for name in ["Picard", *GRID_RULES]}
    for case in cases:
        picard = grid_sweeps(case, Picard()).sweeps
        totals["Picard"]["sweeps"] += picard
        for name, rule in GRID_RULES.items():
            excess = grid_sweeps(case, rule()).sweeps - picard
            totals[name]["sweeps"] += picard + excess
            totals[name]["worse"] += int(excess > 0)
            totals[name]["worst_excess"] = max(totals[name]["worst_excess"], excess)
    description = "12, 30 and 60 steps, gains 0.5 to 1.1, tanh and affine, both forms, the full window and 8"
    return {"chains": len(cases), "description": description + "; float64, `tol=1e-8`", "rules": totals}


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__, "chain.json").parse_args(argv)
    started = harness.start()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ChainRuleWarning)  # the per-sample rules are measured on purpose
    reps = 1 if args.quick else REPS
    methods = METHODS[::4] if args.quick else METHODS
    rows = []
    for name, make in {"tanh": tanh_chain, "euler": euler_chain}.items():
        rows += chain_rows(name, *make(), STEPS, TOL, reps, methods)
    step, x0, tol = ddim_chain()
    # The 64 samples are independent: one secant model each.
    per_sample = (("ChainSecant(m=3, blocks=64)", lambda: ChainSecant(blocks=64), None, "cumulative"),)
    rows += chain_rows("ddim", step, x0, DDIM_STEPS, tol, reps, methods, per_sample)
    settings = {"steps": STEPS, "dim": DIM, "tol": TOL, "dtype": "float32 (ddim and the grid: float64)"}
    settings.update(reps=reps, ddim={"steps": DDIM_STEPS, "tau": DDIM_TAU, "samples": 64, "dim": 16})
    record = {"settings": settings, "rows": rows, "grid": grid_counts(GRID[::50] if args.quick else GRID)}
    return harness.finish(args, "chain.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
