"""Stopping the parallel sampler on its estimated error (``error_tol``) instead of the residuals alone.

::

    python -m benchmarks.parallel_error_stop            # ~10 min on 2 cores (models cached)
    python -m benchmarks.parallel_error_stop --quick    # a smoke run; its numbers mean nothing

``solve_chain(..., error_tol=e)`` also stops once its latest proposal is estimated within ``e`` of the
chain's solution (largest entry), from the rate at which the sweeps move the trajectory, and returns that
proposal. Two measurements:

* **the digits models** (:func:`benchmarks.fpdm_chains.trained_model`, 16 samples, 100 trailing DDIM
  timesteps, FPDM with 2 iterations per timestep, float32 as the sampler runs): sweeps, evaluations
  against the sequential sampler's and the largest pixel difference to the sequential samples
  (``fpdm.sampling.sample``, ``reuse=False``, same noise), for the sampler's rules with and without
  ``error_tol``;
* **a held-out chain** (:func:`benchmarks.fpdm_chains.mixture_chain`, 48 samples, float64, the
  noise-scaled tolerance ``1e-6 sigma_t``, cumulative form): sweeps and distance to the sequential
  samples for Picard and the ``ChainSecant`` variants, with and without ``error_tol=1e-3``;
* **the 252 chains of** :mod:`benchmarks.chain_grid` (float64), each solved with ``error_tol=1e-6``
  besides its residual tolerance: how often the returned trajectory is further than ``error_tol`` from
  the sequential rollout (the estimate is not a bound), how far at worst, and the sweeps saved.

Written to ``benchmarks/results/parallel_error_stop.json``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.parallel import sample_parallel
from fpdm.sampling import block_cost, sample

from benchmarks import harness
from benchmarks.chain_grid import GRID, TOL, chain_of
from benchmarks.fpdm_chains import ITERATIONS, STEPS, TRAIN, mixture_chain, trained_model
from implicitdiff import ChainRuleWarning, ChainSecant, Picard, solve_chain

SAMPLES = 16
DIFFUSION = GaussianDiffusion()
MODELS = ("DiT-Digits/2", "FPDM-Digits/2")
#: The sampler's rules (``sample.py --chain-rule``): label and a factory of ``sample_parallel`` options.
RULES: dict[str, Callable[[], dict[str, Any]]] = {
    "secant": dict,
    "secant-fitted": lambda: {"secant_base": "fitted"},
    "picard": lambda: {"solver": Picard()},
}
ERROR_TOLS = (None, 1e-3, 1e-4)
GRID_ERROR_TOL = 1e-6


def digits_rows(quick: bool) -> list[dict[str, Any]]:
    """Each model, rule and ``error_tol``: sweeps, evaluations and distance to the sequential samples."""
    samples, steps = (4, 12) if quick else (SAMPLES, STEPS)
    labels = torch.arange(samples) % 10
    rows = []
    for name in MODELS:
        model = trained_model(name, quick)
        explicit, implicit = block_cost(model)
        kwargs = {"iterations": ITERATIONS} if implicit else {}
        reference = sample(
            model, DIFFUSION, labels, budget=steps * (explicit + (ITERATIONS if implicit else 0)),
            steps=steps, reuse=False, generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
        for rule, options_of in RULES.items():
            for error_tol in ERROR_TOLS:
                out = sample_parallel(
                    model, DIFFUSION, labels, steps=steps, generator=torch.Generator().manual_seed(0),
                    error_tol=error_tol, **kwargs, **options_of(),
                )  # fmt: skip
                row = {"model": name, "rule": rule, "error_tol": error_tol, "sweeps": out.sweeps}
                row.update(evaluations=out.block_evals / out.sequential_block_evals)
                row.update(max_diff=float((out.images - reference).abs().max()))
                row.update(error_estimate=out.chain.error_estimate, converged=out.converged)
                rows.append(row)
                print(
                    f"{name:14} {rule:14} error_tol {error_tol!s:6} sweeps {row['sweeps']:3} evals "
                    f"{row['evaluations']:5.2f}x diff {row['max_diff']:.1e} estimate {row['error_estimate']}",
                    flush=True,
                )
    return rows


def held_out_rows(quick: bool) -> list[dict[str, Any]]:
    """Each rule on the held-out mixture chain, with and without ``error_tol=1e-3``."""
    step, x0, sigma = mixture_chain()
    steps = 12 if quick else STEPS
    x = x0
    for k in range(steps):
        x = step(torch.tensor([k]), x[None])[0]
    rules: dict[str, Callable[[], Any]] = {
        "picard": Picard,
        "secant": ChainSecant,
        "secant-fitted": lambda: ChainSecant(base="fitted"),
        "secant, one model per sample": lambda: ChainSecant(blocks=x0.shape[0]),
    }
    tol = 1e-6 * sigma[:steps] * x0.numel() ** 0.5
    rows = []
    for rule, make in rules.items():
        for error_tol in (None, 1e-3):
            out = solve_chain(step, x0, steps, solver=make(), tol=tol, form="cumulative", error_tol=error_tol)
            row = {"rule": rule, "error_tol": error_tol, "sweeps": out.sweeps}
            row.update(
                evaluations=out.total_evaluations / steps, max_diff=float((out.zs[-1] - x).abs().max())
            )
            rows.append(row)
            print(row, flush=True)
    return rows


def grid_summary(quick: bool) -> list[dict[str, Any]]:
    """Per rule, over the grid's chains: sweeps with and without ``error_tol`` and how often (and how far)
    the returned trajectory misses ``error_tol`` (largest entry, against the rollout)."""
    cases = GRID[::42] if quick else GRID
    rules: dict[str, Callable[[], Any]] = {
        "picard": lambda: None,
        "secant": ChainSecant,
        "secant-fitted": lambda: ChainSecant(base="fitted"),
    }
    out = []
    for rule, make in rules.items():
        counts = {"rule": rule, "chains": len(cases), "sweeps": 0, "sweeps_error_tol": 0, "stopped_early": 0}
        counts.update(missed=0, worst_ratio=0.0)
        for case in cases:
            chain = chain_of(case)
            solve = {"solver": make(), "tol": TOL, "form": case["form"], "window": case["window"]}
            plain = solve_chain(chain.step, chain.z0, case["steps"], **solve)
            solve["solver"] = make()
            early = solve_chain(chain.step, chain.z0, case["steps"], error_tol=GRID_ERROR_TOL, **solve)
            error = float((early.zs - chain.rollout()).abs().max())
            counts["sweeps"] += plain.sweeps
            counts["sweeps_error_tol"] += early.sweeps
            counts["stopped_early"] += bool(torch.isinf(early.residual).any())
            counts["missed"] += error > GRID_ERROR_TOL
            counts["worst_ratio"] = max(counts["worst_ratio"], error / GRID_ERROR_TOL)
        out.append(counts)
        print(counts, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__, "parallel_error_stop.json").parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ChainRuleWarning)
    started = harness.start()
    record: dict[str, Any] = {"steps": 12 if args.quick else STEPS, "samples": 4 if args.quick else SAMPLES}
    record.update(iterations=ITERATIONS, train=TRAIN, grid_error_tol=GRID_ERROR_TOL, grid_tol=TOL)
    record.update(rows=digits_rows(args.quick), held_out=held_out_rows(args.quick))
    record.update(grid=grid_summary(args.quick))
    return harness.finish(args, "parallel_error_stop.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
