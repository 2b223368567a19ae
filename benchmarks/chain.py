"""Parallel in time: sweeps and evaluations of solve_chain against the sequential recurrence.

Run::

    python benchmarks/chain.py     # prints a table, writes benchmarks/results/chain.json

Two 50-step toy chains in float32, tolerance 1e-5 (absolute, per step):

* ``tanh``: ``x_{k+1} = tanh(A_k x_k + b_k)``, ``||A_k||_2 = 0.9``, 64 dimensions (an RNN);
* ``euler``: explicit Euler on ``dx/dt = tanh(W x + sin t) - x`` over ``t in [0, 2]``, 64 dimensions
  (steps close to the identity, as in a diffusion sampler).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import implicitdiff.chain as chain_module
from implicitdiff import Anderson, Broyden, Picard, solve_chain

RESULTS = Path(__file__).parent / "results" / "chain.json"
STEPS, DIM, TOL, REPS = 50, 64, 1e-5, 5


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


def sequential(step: Callable[[Tensor, Tensor], Tensor], x0: Tensor) -> Tensor:
    xs = [x0]
    for k in range(STEPS):
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
}


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    run()
    times, out = [], None
    for _ in range(REPS):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return out, 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, make in {"tanh": tanh_chain, "euler": euler_chain}.items():
        step, x0 = make()
        reference, wall = timed(lambda step=step, x0=x0: sequential(step, x0))
        rows.append(
            {"chain": name, "method": "sequential", "form": "-", "window": 1, "sweeps": STEPS}
            | {"evaluations": STEPS}
            | {"max_error": 0.0, "converged": True, "wall_ms": wall}
        )
        for method, (solver, window, form, fresh) in METHODS.items():
            original = chain_module._take_rows
            if fresh:
                chain_module._take_rows = reinit
            try:

                def run(step=step, x0=x0, solver=solver, window=window, form=form) -> Any:
                    rule = solver()
                    return solve_chain(step, x0, STEPS, solver=rule, tol=TOL, window=window, form=form)

                out, wall = timed(run)
            finally:
                chain_module._take_rows = original
            error = float(torch.linalg.vector_norm(out.xs - reference, dim=1).max())
            rows.append(
                {"chain": name, "method": method.strip(), "form": form, "window": window or STEPS}
                | {"sweeps": out.sweeps}
                | {"evaluations": out.evaluations, "max_error": error, "converged": out.all_converged}
                | {"wall_ms": wall}
            )
    header = f"{'chain':6} {'form':10} {'method':30} {'window':>6} {'sweeps':>6} {'evals':>6}"
    header += f" {'max error':>10} {'ms':>7}"
    print(header)
    for row in rows:
        print(
            f"{row['chain']:6} {row['form']:10} {row['method']:30} {row['window']:6d} {row['sweeps']:6d} "
            f"{row['evaluations']:6d} {row['max_error']:10.2e} {row['wall_ms']:7.1f}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    meta = {
        "steps": STEPS,
        "dim": DIM,
        "tol": TOL,
        "dtype": "float32",
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
