"""Parallel in time: sweeps and evaluations of solve_chain against the sequential recurrence.

Run::

    python benchmarks/chain.py     # prints a table, writes benchmarks/results/chain.json

Three chains:

* ``tanh``: 50 steps ``x_{k+1} = tanh(A_k x_k + b_k)``, ``||A_k||_2 = 0.9``, 64 dimensions (an RNN),
  float32, tolerance 1e-5 (absolute, per step);
* ``euler``: 50 steps of explicit Euler on ``dx/dt = tanh(W x + sin t) - x`` over ``t in [0, 2]``, 64
  dimensions (steps close to the identity, as in a diffusion sampler), float32, tolerance 1e-5;
* ``ddim``: 100 deterministic DDIM steps (eta = 0, the linear schedule of DDPM, trailing spacing) of
  64 samples of a 16-dimensional Gaussian mixture whose noise prediction is exact (so the chain is
  a real diffusion sampler's, with no network), float64, ParaDiGMS's noise-scaled tolerance
  ``tol_k = 1e-4 * sigma_k * sqrt(numel)`` on each step (RMS per entry ``1e-4 sigma_k``).

And the test grid: the 252 toy chains of ``tests/test_chain.py``'s ``ToyChain`` (12, 30 and 60 steps,
gains 0.5 to 1.1, tanh and affine, both forms, full window and 8, three seeds; float64, tol 1e-8), on
which the script counts, per rule, the chains where it took more sweeps than Picard on the same form.

Per method: ``sweeps`` (sequential rounds: batched calls of the step), ``evaluations`` (steps
evaluated, summed over the calls), the largest distance of any state to the sequential rollout, and
the median wall-clock of 5 runs on one thread (a shared CPU: noisy, for scale only), for both maps
(``form="step"`` and ``form="cumulative"``). "reinit" re-creates the rule's state at every slide
instead of carrying each step's history along.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import implicitdiff.chain as chain_module
from implicitdiff import Anderson, Broyden, ChainSecant, Picard, solve_chain
from implicitdiff.chain import ChainRuleWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_chain import GRID, grid_sweeps

RESULTS = Path(__file__).parent / "results" / "chain.json"
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


def reinit(state: Any, index: Tensor, rows: int) -> None:
    return None  # solve_chain re-initialises a missing state at its next evaluation


# name -> (rule factory, window, form, re-initialise the rule at every slide)
METHODS: dict[str, tuple[Callable[[], Any], int | None, str, bool]] = {
    "Picard": (Picard, None, "step", False),
    "Picard, window 10": (Picard, 10, "step", False),
    "Anderson(m=5)": (lambda: Anderson(m=5), None, "step", False),
    "Anderson(m=5), reinit": (lambda: Anderson(m=5), None, "step", True),
    "Broyden(memory=10)": (lambda: Broyden(memory=10), None, "step", False),
    "Picard (ParaDiGMS)": (Picard, None, "cumulative", False),
    "Picard, window 10 (ParaDiGMS)": (Picard, 10, "cumulative", False),
    "Anderson(m=5) ": (lambda: Anderson(m=5), None, "cumulative", False),
    "Anderson(m=5), window 10": (lambda: Anderson(m=5), 10, "cumulative", False),
    "Anderson(m=5), reinit ": (lambda: Anderson(m=5), None, "cumulative", True),
    "Broyden(memory=10) ": (lambda: Broyden(memory=10), None, "cumulative", False),
    "ChainSecant(m=3)": (ChainSecant, None, "step", False),
    "ChainSecant(m=3), window 10": (ChainSecant, 10, "step", False),
    "ChainSecant(m=3) ": (ChainSecant, None, "cumulative", False),
    "ChainSecant(m=3), window 10 ": (ChainSecant, 10, "cumulative", False),
}

#: The rules counted on the test grid (each against Picard on the same form and window).
GRID_RULES: dict[str, Callable[[], Any]] = {
    "Anderson(m=3)": lambda: Anderson(m=3),
    "Broyden(memory=4)": lambda: Broyden(memory=4),
    "ChainSecant(m=3)": ChainSecant,
}


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    run()
    times, out = [], None
    for _ in range(REPS):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return out, 1e3 * statistics.median(times)


def chain_rows(
    name: str, step: Callable[[Tensor, Tensor], Tensor], x0: Tensor, steps: int, tol: Any, extra: Any = None
) -> list:
    """The sequential row and one row per method of ``METHODS`` (and of ``extra``) on one chain."""
    reference, wall = timed(lambda: sequential(step, x0, steps))
    rows = [
        {"chain": name, "method": "sequential", "form": "-", "window": 1, "sweeps": steps}
        | {"evaluations": steps, "max_error": 0.0, "converged": True, "wall_ms": wall}
    ]
    for method, (solver, window, form, fresh) in {**METHODS, **(extra or {})}.items():
        original = chain_module._take_rows
        if fresh:
            chain_module._take_rows = reinit
        try:

            def run(solver=solver, window=window, form=form) -> Any:
                return solve_chain(step, x0, steps, solver=solver(), tol=tol, window=window, form=form)

            out, wall = timed(run)
        finally:
            chain_module._take_rows = original
        error = float((out.xs - reference).flatten(1).norm(dim=1).max())
        rows.append(
            {"chain": name, "method": method.strip(), "form": form, "window": window or steps}
            | {"sweeps": out.sweeps, "evaluations": out.evaluations, "max_error": error}
            | {"converged": out.all_converged, "wall_ms": wall}
        )
    return rows


def grid_counts() -> dict[str, dict[str, Any]]:
    """Per rule of ``GRID_RULES``: sweeps over ``tests/test_chain.py``'s ``GRID``, and the chains where it
    took more than Picard."""
    totals: dict[str, dict[str, Any]] = {"Picard": {"sweeps": 0, "worse": 0, "worst_excess": 0}}
    totals |= {name: {"sweeps": 0, "worse": 0, "worst_excess": 0} for name in GRID_RULES}
    for case in GRID:
        sweeps = {}
        for name, rule in {"Picard": Picard, **GRID_RULES}.items():
            sweeps[name] = grid_sweeps(case, rule()).sweeps  # checked against the rollout, too
            excess = sweeps[name] - sweeps["Picard"]
            totals[name]["sweeps"] += sweeps[name]
            totals[name]["worse"] += int(excess > 0)
            totals[name]["worst_excess"] = max(totals[name]["worst_excess"], excess)
    return totals


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ChainRuleWarning)  # the per-sample rules are measured on purpose
    rows = []
    for name, make in {"tanh": tanh_chain, "euler": euler_chain}.items():
        rows += chain_rows(name, *make(), STEPS, TOL)
    step, x0, tol = ddim_chain()
    # The 64 samples are independent: one secant model each.
    per_sample = {"ChainSecant(m=3, blocks=64)": (lambda: ChainSecant(blocks=64), None, "cumulative", False)}
    rows += chain_rows("ddim", step, x0, DDIM_STEPS, tol, per_sample)
    header = f"{'chain':6} {'form':10} {'method':30} {'window':>6} {'sweeps':>6} {'evals':>6}"
    header += f" {'max error':>10} {'ms':>7}"
    print(header)
    for row in rows:
        print(
            f"{row['chain']:6} {row['form']:10} {row['method']:30} {row['window']:6d} {row['sweeps']:6d} "
            f"{row['evaluations']:6d} {row['max_error']:10.2e} {row['wall_ms']:7.1f}"
        )
    grid = grid_counts()
    print(f"\ntest grid ({len(GRID)} chains): sweeps in all, chains worse than Picard, worst excess")
    for name, counts in grid.items():
        print(f"  {name:20} {counts['sweeps']:6d} {counts['worse']:4d} {counts['worst_excess']:4d}")
    RESULTS.parent.mkdir(exist_ok=True)
    meta = {
        "steps": STEPS,
        "dim": DIM,
        "tol": TOL,
        "dtype": "float32 (ddim and the grid: float64)",
        "ddim": {"steps": DDIM_STEPS, "tau": DDIM_TAU, "samples": 64, "dim": 16},
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows, "grid": grid}, indent=1) + "\n")


if __name__ == "__main__":
    main()
