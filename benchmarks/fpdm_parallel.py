"""Parallel DDIM (``fpdm.parallel``) against 100 sequential DDIM steps, on the digits models.

::

    python -m benchmarks.fpdm_parallel              # trains two small models if needed (~1.5 min, 1 core)
    python -m benchmarks.fpdm_parallel --tau-sweep  # the sweep that chose parallel.DEFAULT_TAU
    python -m benchmarks.fpdm_parallel --quick      # a smoke run in seconds; its numbers mean nothing

For FPDM-Digits/2 and DiT-Digits/2, trained with the example's ``train.py`` for a few hundred steps
(:func:`benchmarks.fpdm_chains.trained_model`), sample the same labels from the same noise by sequential
DDIM (``sampling.sample``, 100 timesteps, FPDM with 2 Picard iterations per timestep) and by
:func:`parallel.sample_parallel` with its default noise-scaled tolerances, one row per entry of ``CONFIGS``
(rule, form, window). Per row: sequential rounds (sweeps), block evaluations per sample, the largest
difference from the sequential samples (pixel scale ``[-1, 1]``), and FD/KID against the held-out digits
(``evaluation.evaluate_images``: features of the example's digits classifier). Written to
``benchmarks/results/fpdm_parallel.json``; ``--tau-sweep`` writes ``fpdm_parallel_tau.json``.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.parallel import DEFAULT_TAU
from fpdm.sampling import block_cost, sample
from torch import Tensor, nn

from benchmarks import harness
from benchmarks.fpdm_chains import CONFIGS, ITERATIONS, STEPS, TRAIN, run_parallel, trained_model
from implicitdiff import ChainRuleWarning

#: The scales of the noise-scaled tolerances that ``--tau-sweep`` measures.
TAUS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7)
#: What ``--tau-sweep`` asks of a scale on every model: samples this close to the sequential ones (pixel
#: scale [-1, 1]) and FD within ``FD_CHANGE`` of the sequential sampler's (FD is reported to 2 decimals).
MAX_DIFF, FD_CHANGE = 1e-3, 0.01
#: The rules of the sweep of ``TAUS``: Picard and the sampler's default.
SWEPT = [CONFIGS[0], CONFIGS[1]]


def _metrics(images: Tensor, labels: Tensor, quick: bool) -> dict[str, float | None]:
    if quick:
        return {"fd": None, "kid": None}
    from fpdm.evaluation import evaluate_images

    result = evaluate_images(images, labels=labels, kid_subsets=50, kid_subset_size=100)
    return {"fd": result["fd"], "kid": result["kid_mean"]}


def _sequential(
    model: nn.Module, labels: Tensor, reuse: bool, quick: bool, steps: int = STEPS
) -> tuple[Tensor, dict[str, Any]]:
    explicit, implicit = block_cost(model)
    budget = steps * (explicit + (ITERATIONS if implicit else 0))
    start = time.perf_counter()
    result = sample(
        model,
        GaussianDiffusion(),
        labels,
        budget=budget,
        steps=steps,
        reuse=reuse,
        generator=torch.Generator().manual_seed(0),
    )
    method = "sequential" + ("" if reuse or not implicit else ", cold starts")
    row = {"method": method, "form": "", "window": 1, "sweeps": steps, "block_evals": result.spent_total}
    row.update(max_diff=0.0, wall_s=time.perf_counter() - start, **_metrics(result.images, labels, quick))
    return result.images, row


def model_rows(name: str, model: nn.Module, labels: Tensor, quick: bool) -> list[dict[str, Any]]:
    """Sequential rows and one row per parallel configuration, for one model; each parallel row is compared
    with the sequential sampler of the same warm starts. FPDM runs every configuration with cold starts
    (the step map is then one fixed function) and the full-window cumulative ones with reuse across sweeps."""
    implicit = block_cost(model)[1]
    steps = 12 if quick else STEPS
    rows = []
    for reuse in (False, True) if implicit else (True,):
        reference, row = _sequential(model, labels, reuse, quick, steps)
        rows.append({"model": name, **row})
        for config in CONFIGS if not (implicit and reuse) else CONFIGS[:3]:
            out = run_parallel(model, labels, config, reuse, steps=steps)
            label = config.method + ("" if reuse or not implicit else ", cold starts")
            label += ", reuse across sweeps" if implicit and reuse else ""
            row = {"model": name, "method": label, "form": config.form, "window": config.window or steps}
            row.update(sweeps=out.sweeps, block_evals=out.block_evals, converged=out.converged)
            row.update(tau=out.options["tau"], wall_s=out.wall_s)
            row["max_diff"] = float((out.images - reference).abs().max())
            rows.append({**row, **_metrics(out.images, labels, quick)})
    return rows


def tau_sweep_rows(name: str, model: nn.Module, labels: Tensor, quick: bool) -> list[dict[str, Any]]:
    """For each scale of ``TAUS`` and each rule of ``SWEPT`` (Picard, ChainSecant): the cumulative map, every
    timestep in flight, cold starts for FPDM, against the sequential sampler with the same starts (the first
    row, ``tau = None``)."""
    implicit = block_cost(model)[1]
    steps = 12 if quick else STEPS
    reference, row = _sequential(model, labels, reuse=not implicit, quick=quick, steps=steps)
    rows = [{"model": name, "rule": "", "tau": None, **{k: row[k] for k in ("sweeps", "block_evals")}}]
    rows[0].update(max_diff=0.0, rms_diff=0.0, fd=row["fd"], kid=row["kid"], converged=True)
    for config in SWEPT:
        for tau in TAUS[::4] if quick else TAUS:
            out = run_parallel(model, labels, config, False, tau=tau, steps=steps)
            row = {"model": name, "rule": config.method, "tau": tau, "sweeps": out.sweeps}
            row.update(block_evals=out.block_evals, converged=out.converged)
            row.update(max_diff=float((out.images - reference).abs().max()))
            row.update(rms_diff=float((out.images - reference).pow(2).mean().sqrt()))
            rows.append({**row, **_metrics(out.images, labels, quick)})
    return rows


def choose_tau(rows: list[dict[str, Any]], rule: str = "Picard") -> float | None:
    """The largest scale whose samples are within ``MAX_DIFF`` of the sequential ones and whose FD is within
    ``FD_CHANGE`` of the sequential FD, on every model, for ``rule`` (``None`` if none is)."""
    fits: dict[float, bool] = {}
    for row in rows:
        if row["tau"] is None or row["rule"] != rule:
            continue
        sequential = next(r for r in rows if r["model"] == row["model"] and r["tau"] is None)
        same_fd = row["fd"] is None or abs(row["fd"] - sequential["fd"]) <= FD_CHANGE
        fits[row["tau"]] = fits.get(row["tau"], True) and row["max_diff"] <= MAX_DIFF and same_fd
    good = [tau for tau, ok in fits.items() if ok]
    return max(good) if good else None


def main(argv: list[str] | None = None) -> int:
    """Run the digits comparison (or the sweep of tau), print the table, write the JSON."""
    parser = harness.parser(__doc__, "fpdm_parallel.json")
    parser.add_argument("--num", type=int, default=100, help="images per configuration")
    parser.add_argument(
        "--tau-sweep", action="store_true", help="measure the scales TAUS (picks DEFAULT_TAU)"
    )
    args = parser.parse_args(argv)
    if args.tau_sweep:
        parser.set_defaults(results=harness.RESULTS / "fpdm_parallel_tau.json")
        args = parser.parse_args(argv)
    started = harness.start()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and far faster on a shared machine
    warnings.simplefilter("ignore", ChainRuleWarning)  # Anderson's rows are measured on purpose
    num = 8 if args.quick else args.num
    labels = torch.arange(num) % 10
    record: dict[str, Any] = {
        "steps": 12 if args.quick else STEPS,
        "iterations": ITERATIONS,
        "num_images": num,
    }
    record["training"] = {**TRAIN, "steps": 3 if args.quick else TRAIN["steps"]}
    models = {name: trained_model(name, args.quick) for name in ("FPDM-Digits/2", "DiT-Digits/2")}
    if args.tau_sweep:
        rows = [
            row for name, model in models.items() for row in tau_sweep_rows(name, model, labels, args.quick)
        ]
        chosen = {config.method: choose_tau(rows, config.method) for config in SWEPT}
        record.update(max_diff=MAX_DIFF, fd_change=FD_CHANGE, rows=rows, chosen_tau=chosen)
        print(f"largest tau within {MAX_DIFF:g} of sequential, FD unchanged: {chosen}", file=sys.stderr)
    else:
        rows = [row for name, model in models.items() for row in model_rows(name, model, labels, args.quick)]
        record.update(tau=DEFAULT_TAU, rows=rows)
    file = "fpdm_parallel_tau.json" if args.tau_sweep else "fpdm_parallel.json"
    return harness.finish(args, file, record, started)


if __name__ == "__main__":
    sys.exit(main())
