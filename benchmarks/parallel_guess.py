"""Parallel DDIM with a first guess, ParaDiGMS's criterion, two processes: rounds, evaluations, distance.

::

    python -m benchmarks.parallel_guess            # ~35 min on 2 busy cores; trains two models if needed
    python -m benchmarks.parallel_guess --quick    # a smoke run in a minute; its numbers mean nothing

For FPDM-Digits/2 and DiT-Digits/2 trained here (``benchmarks.fpdm_chains.trained_model``, 400 steps, kept
under ``runs/bench-parallel``), 100 images sampled from the same noise by sequential DDIM (100 timesteps, FPDM
with 2 Picard iterations per timestep from cold starts) and by ``fpdm.parallel.sample_parallel``, one row
per entry of ``CONFIGS``: sequential rounds (the guess's model calls included), block evaluations per
sample and their ratio to the sequential sampler's, the largest and the RMS difference from the
sequential samples (pixel scale [-1, 1]) and FD against the held-out digits. ``ParaDiGMS`` rows use its
criterion at its default tolerance 0.1 (``paradigms_tolerances``), with its default window of 10
timesteps and with every timestep in flight.

Also: a held-out chain (DDIM on a Gaussian mixture with its exact noise prediction, parameters of its
own), rounds until the samples are within 1e-3 of the sequential ones for Picard and ChainSecant (the best
over a ladder of noise-scaled tolerances and both forms); what our noise-scaled tolerance is in
ParaDiGMS's units; and the wall-clock of the default parallel sampler in 1 and in 2 processes (gloo, one
thread each), side by side, with the largest difference between their samples. Written to
``benchmarks/results/parallel_guess.json``.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fpdm.diffusion import GaussianDiffusion
from fpdm.parallel import DEFAULT_TAU, paradigms_equivalent, paradigms_tolerances, sample_parallel
from fpdm.sampling import block_cost, sample
from torch import Tensor, nn

from benchmarks import harness
from benchmarks.fpdm_chains import ITERATIONS, STEPS, TRAIN, mixture_chain, trained_model
from implicitdiff import ChainRuleWarning, ChainSecant, Picard, solve_chain

MAX_DIFF = 1e-3
DIFFUSION = GaussianDiffusion()
MODELS = ("FPDM-Digits/2", "DiT-Digits/2")

#: (label, sample_parallel options): ``None`` for the rule is sample_parallel's default (ChainSecant with
#: one secant model per sample); "paradigms" for ``tol`` is ParaDiGMS's criterion at tolerance 0.1.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("Picard (ParaDiGMS's iteration)", {"solver": "picard"}),
    ("ChainSecant", {}),
    ("ChainSecant, ParaSolver's guess (warmup 1)", {"warmup": 1}),
    ("ChainSecant, guess warmup 2", {"warmup": 2}),
    ("ChainSecant, coarse guess (4 timesteps)", {"coarse": 4}),
    ("ChainSecant, tol 3e-6 on every timestep", {"tol": 3e-6}),
    ("ChainSecant, tol 3e-6, warmup 1", {"tol": 3e-6, "warmup": 1}),
    ("ChainSecant, window 16, warmup 1", {"window": 16, "warmup": 1}),
    ("ParaDiGMS (its criterion 0.1, window 10)", {"solver": "picard", "tol": "paradigms", "window": 10}),
    ("ParaDiGMS (its criterion 0.1, every timestep)", {"solver": "picard", "tol": "paradigms"}),
    ("ChainSecant, ParaDiGMS's criterion 0.1", {"tol": "paradigms"}),
]


def _options(model: nn.Module, config: dict[str, Any], steps: int) -> dict[str, Any]:
    options = dict(config)
    if options.get("solver") == "picard":
        options["solver"] = Picard()
    if options.get("tol") == "paradigms":
        options["tol"] = paradigms_tolerances(DIFFUSION, DIFFUSION.respace(steps), 0.1).tolist()
    if block_cost(model)[1]:
        options["iterations"] = ITERATIONS
    return options


def _fd(images: Tensor, labels: Tensor, quick: bool) -> float | None:
    if quick:
        return None
    from fpdm.evaluation import evaluate_images

    return float(evaluate_images(images, labels=labels, kid_subsets=10, kid_subset_size=50)["fd"])


def sampler_rows(
    name: str, model: nn.Module, labels: Tensor, steps: int, quick: bool
) -> list[dict[str, Any]]:
    """The sequential row and one row per entry of ``CONFIGS`` for one model."""
    explicit, implicit = block_cost(model)
    start = time.perf_counter()
    reference = sample(
        model,
        DIFFUSION,
        labels,
        budget=steps * (explicit + (ITERATIONS if implicit else 0)),
        steps=steps,
        reuse=False,
        generator=torch.Generator().manual_seed(0),
    )
    row = {"model": name, "method": "sequential", "sweeps": steps, "block_evals": reference.spent_total}
    row.update(ratio=1.0, max_diff=0.0, rms_diff=0.0, converged=True, wall_s=time.perf_counter() - start)
    rows = [{**row, "fd": _fd(reference.images, labels, quick)}]
    for label, config in CONFIGS:
        out = sample_parallel(
            model,
            DIFFUSION,
            labels,
            steps=steps,
            generator=torch.Generator().manual_seed(0),
            **_options(model, config, steps),
        )
        diff = out.images - reference.images
        row = {"model": name, "method": label, "sweeps": out.sweeps, "block_evals": out.block_evals}
        row.update(ratio=out.block_evals / reference.spent_total, converged=out.converged, wall_s=out.wall_s)
        row.update(max_diff=float(diff.abs().max()), rms_diff=float(diff.pow(2).mean().sqrt()))
        row.update(fd=_fd(out.images, labels, quick), options={k: v for k, v in config.items() if k != "tol"})
        rows.append(row)
        print(row["model"], row["method"], row["sweeps"], row["block_evals"], flush=True)
    return rows


def held_out_rows(quick: bool) -> list[dict[str, Any]]:
    """Rounds until within ``MAX_DIFF`` of the sequential samples, best over tolerances and forms."""
    step, x0, sigma = mixture_chain()
    x = x0
    for k in range(STEPS):
        x = step(torch.tensor([k]), x[None])[0]
    ladder = (1e-3, 1e-4, 1e-5) if quick else (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
    rules = {"Picard": Picard, "ChainSecant()": ChainSecant}
    rules["ChainSecant(blocks=48)"] = lambda: ChainSecant(blocks=x0.shape[0])
    rows = []
    for name, rule in rules.items():
        best: dict[str, Any] | None = None
        for form in ("cumulative", "step"):
            for tau in ladder:
                tol = tau * sigma * math.sqrt(x0.numel())
                out = solve_chain(step, x0, STEPS, solver=rule(), tol=tol, form=form)
                diff = float((out.zs[-1] - x).abs().max())
                if diff <= MAX_DIFF and (best is None or out.sweeps < best["sweeps"]):
                    best = {"rule": name, "form": form, "tau": tau, "sweeps": out.sweeps}
                    best.update(evaluations=out.total_evaluations, max_diff=diff)
        rows.append(best or {"rule": name, "sweeps": None})
    return rows


def tolerance_conversion(steps: int) -> dict[str, Any]:
    """Our noise-scaled ``DEFAULT_TAU * sigma_k`` in ParaDiGMS's units (the last two timesteps have none),
    and ParaDiGMS's default 0.1 as our ``tau``."""
    timesteps = DIFFUSION.respace(steps)
    theirs = paradigms_equivalent(DIFFUSION, timesteps, DEFAULT_TAU)
    theirs = theirs[torch.isfinite(theirs)]
    as_tau = (DEFAULT_TAU * 0.1 / theirs).tolist()  # tolerance / tau is linear in tau
    return {
        "tau": DEFAULT_TAU,
        "paradigms_equivalent_min": float(theirs.min()),
        "paradigms_equivalent_median": float(theirs.median()),
        "paradigms_equivalent_max": float(theirs.max()),
        "paradigms_default_0.1_as_tau_min": min(as_tau),
        "paradigms_default_0.1_as_tau_max": max(as_tau),
    }


def _spread_worker(
    rank: int, world: int, store: str, name: str, num: int, steps: int, quick: bool, results: Any
) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ChainRuleWarning)
    try:
        timeout = datetime.timedelta(seconds=600)
        dist.init_process_group(
            "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=timeout
        )
        try:
            results[rank] = _timed_default(trained_model(name, quick), num, steps, dist.group.WORLD)
        finally:
            dist.destroy_process_group()
    except BaseException:
        results[rank] = {"error": traceback.format_exc()}
        raise


def _timed_default(model: nn.Module, num: int, steps: int, group: Any) -> dict[str, Any]:
    labels = torch.arange(num) % 10
    kwargs = {"iterations": ITERATIONS} if block_cost(model)[1] else {}
    start = time.perf_counter()
    out = sample_parallel(
        model,
        DIFFUSION,
        labels,
        steps=steps,
        group=group,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    return {"wall_s": time.perf_counter() - start, "images": out.images, "sweeps": out.sweeps}


def process_rows(name: str, num: int, steps: int, quick: bool) -> dict[str, Any]:
    """The default parallel sampler in one process and in two (gloo), one thread each, side by side."""
    one = _timed_default(trained_model(name, quick), num, steps, None)
    with tempfile.TemporaryDirectory() as folder, mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        args = (2, os.path.join(folder, "store"), name, num, steps, quick, results)
        mp.start_processes(_spread_worker, args=args, nprocs=2, start_method="spawn", join=True)
        two = dict(results)
    if any("error" in report for report in two.values()):
        raise RuntimeError(next(report["error"] for report in two.values() if "error" in report))
    wall_two = max(report["wall_s"] for report in two.values())
    return {
        "model": name,
        "one_process_s": one["wall_s"],
        "two_processes_s": wall_two,
        "speedup": one["wall_s"] / wall_two,
        "sweeps": [one["sweeps"], two[0]["sweeps"]],
        "max_diff_two_vs_one": float((two[0]["images"] - one["images"]).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "parallel_guess.json")
    parser.add_argument("--num", type=int, default=100, help="images per configuration")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ChainRuleWarning)
    started = harness.start()
    num, steps = (8, 12) if args.quick else (args.num, STEPS)
    labels = torch.arange(num) % 10
    rows: list[dict[str, Any]] = []
    for name in MODELS:
        rows += sampler_rows(name, trained_model(name, args.quick), labels, steps, args.quick)
    record = {
        "steps": steps,
        "iterations": ITERATIONS,
        "train": TRAIN,
        "num_images": num,
        "default_tau": DEFAULT_TAU,
        "max_diff": MAX_DIFF,
        "rows": rows,
        "held_out": held_out_rows(args.quick),
        "tolerance_conversion": tolerance_conversion(steps),
        "processes": [process_rows(name, num, steps, args.quick) for name in MODELS],
    }
    return harness.finish(args, "parallel_guess.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
