"""Parallel DDIM (``examples/fpdm/fpdm/parallel.py``) against 100 sequential DDIM steps, on the digits models.

::

    python benchmarks/fpdm_parallel.py              # trains two small models if needed (~1.5 min, 1 core)
    python benchmarks/fpdm_parallel.py --tau-sweep  # the sweep that chose parallel.DEFAULT_TAU
    python benchmarks/fpdm_parallel.py --quick      # a smoke run in seconds; its numbers mean nothing

For FPDM-Digits/2 and DiT-Digits/2, trained here with the example's ``train.py`` for a few hundred steps (the
checkpoints are kept under ``runs/bench-parallel`` and reused), sample the same labels from the same noise by
sequential DDIM (``sampling.sample``, 100 timesteps, FPDM with 2 Picard iterations per timestep) and by
:func:`parallel.sample_parallel` with its default noise-scaled tolerances, one row per entry of ``CONFIGS``
(rule, form, window). Per row: sequential rounds (sweeps), block evaluations per sample, the largest
difference from the sequential samples (pixel scale ``[-1, 1]``), and FD/KID against the held-out digits
(``evaluate.evaluate_images``: features of the example's digits classifier). Written to
``benchmarks/results/fpdm_parallel.json``; ``--tau-sweep`` writes ``fpdm_parallel_tau.json``.

:func:`parallel_gpu_rows` is the wall-clock comparison for a GPU (sequential against parallel at batch 1, 4
and 16, FPDM-XL/2 and DiT-XL/2 with random weights; ``benchmarks/gpu.py``'s ``chain`` section).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
# The example's package (examples/fpdm/fpdm/) is not installed: this is the one path entry.
sys.path.insert(0, str(ROOT / "examples" / "fpdm"))

from fpdm.diffusion import GaussianDiffusion  # noqa: E402
from fpdm.models import create_model  # noqa: E402
from fpdm.parallel import DEFAULT_TAU, sample_parallel  # noqa: E402
from fpdm.sampling import block_cost, sample  # noqa: E402

from implicitdiff import Anderson, Picard  # noqa: E402
from implicitdiff.chain import ChainRuleWarning  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fpdm_parallel.json"
TAU_RESULTS = ROOT / "benchmarks" / "results" / "fpdm_parallel_tau.json"
RUNS = ROOT / "runs" / "bench-parallel"
STEPS = 100
ITERATIONS = 2  # FPDM's implicit-block evaluations per timestep, as in the demo (timestep smoothing)
TRAIN = {"steps": 400, "lr": 2e-3, "batch_size": 128, "ema_warmup": True, "data": "digits-train"}
#: The scales of the noise-scaled tolerances that ``--tau-sweep`` measures.
TAUS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7)
#: What ``--tau-sweep`` asks of a scale on every model: samples this close to the sequential ones (pixel
#: scale [-1, 1]) and FD within ``FD_CHANGE`` of the sequential sampler's (FD is reported to 2 decimals).
MAX_DIFF, FD_CHANGE = 1e-3, 0.01


def trained_model(name: str, quick: bool) -> nn.Module:
    """The preset ``name`` trained with ``train.py`` (``TRAIN``), loaded with its EMA weights; cached."""
    from fpdm import generation as sample_cli
    from fpdm.training import CHECKPOINT_NAME, TrainConfig, train

    steps = 3 if quick else TRAIN["steps"]
    out = RUNS / f"{name.split('-')[0].lower()}-{steps}"
    if not (out / CHECKPOINT_NAME).exists():
        options = {**TRAIN, "steps": steps, "ckpt_every": steps, "log_every": max(steps // 4, 1)}
        train(TrainConfig(out=str(out), model=name, device="cpu", progress=False, **options))
    return sample_cli.load_model(out / CHECKPOINT_NAME)


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


def _sampler_default() -> None:
    """``sample_parallel``'s default rule: ``ChainSecant(blocks=B)``, one secant model per sample."""
    return None


@dataclasses.dataclass(frozen=True)
class Config:
    """One parallel row: the rule's label, a factory of the rule, the map iterated and the window
    (``None``: every timestep in flight). A new rule is one more entry of ``CONFIGS``."""

    method: str
    rule: Callable[[], Any]
    form: str = "cumulative"
    window: int | None = None


#: The parallel rows, all with the default noise-scaled tolerances; the step form takes every timestep's
#: sweep anyway, so its rows run a window of 16 to spend fewer evaluations on the same answer.
CONFIGS = [
    Config("Picard", Picard),
    Config("ChainSecant", _sampler_default),
    Config("Anderson(m=6)", functools.partial(Anderson, m=6)),
    Config("Picard", Picard, window=16),
    Config("ChainSecant", _sampler_default, window=16),
    Config("Anderson(m=6)", functools.partial(Anderson, m=6), window=16),
    Config("Picard", Picard, "step", 16),
    Config("Anderson(m=6)", functools.partial(Anderson, m=6), "step", 16),
]


#: The rules of the sweep of ``TAUS``.
SWEPT = [CONFIGS[0], CONFIGS[1]]


def _parallel(model: nn.Module, labels: Tensor, config: Config, reuse: bool, **options: Any) -> Any:
    kwargs = {"iterations": ITERATIONS, "reuse": reuse} if block_cost(model)[1] else {}
    return sample_parallel(
        model,
        GaussianDiffusion(),
        labels,
        steps=options.pop("steps", STEPS),
        solver=config.rule(),
        form=config.form,
        window=config.window,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
        **options,
    )


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
            out = _parallel(model, labels, config, reuse, steps=steps)
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
            out = _parallel(model, labels, config, False, tau=tau, steps=steps)
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


def _markdown(header: str, aligns: str, cells: list[str]) -> str:
    """A Markdown table: ``header`` and ``aligns`` are its first two rows without the outer bars, ``cells``
    the rows' inner text."""
    return "\n".join(f"| {line} |" for line in [header, aligns, *cells])


def _quality(r: dict[str, Any]) -> str:
    """The FD and KID cells of a row (empty in ``--quick``)."""
    fd = "" if r["fd"] is None else f"{r['fd']:.2f}"
    kid = "" if r["kid"] is None else f"{r['kid']:.4f}"
    return f"{fd} | {kid}"


def _tau_text(tau: float | None) -> str:
    return "sequential" if tau is None else f"{tau:.0e}"


def tau_table(rows: list[dict[str, Any]]) -> str:
    """The sweep as a Markdown table."""
    cells = [
        f"{r['model']} | {r['rule']} | {_tau_text(r['tau'])} | {r['sweeps']} | {r['block_evals']} "
        f"| {r['max_diff']:.1e} | {r['rms_diff']:.1e} | {_quality(r)}"
        for r in rows
    ]
    header = "model | rule | tau | sweeps | block evals / sample | max diff | RMS diff | FD | KID"
    return _markdown(header, "--- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---:", cells)


def _check_target(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's target per parallel row: sweeps <= 1/3, evaluations <= 3x, max difference <= 1e-3."""
    verdicts = []
    for row in rows:
        if not row["method"].startswith("sequential"):
            cold = "cold starts" in row["method"]
            method = "sequential, cold starts" if cold else "sequential"
            sequential = next(r for r in rows if r["model"] == row["model"] and r["method"] == method)
            checks = {
                "sweeps": row["sweeps"] * 3 <= sequential["sweeps"],
                "evaluations": row["block_evals"] <= 3 * sequential["block_evals"],
                "max_diff": row["max_diff"] <= MAX_DIFF,
            }
            verdicts.append({k: row[k] for k in ("model", "method", "form", "window")} | checks)
    return verdicts


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    cells = [
        f"{r['model']} | {r['method']} | {r['form']} | {r['window']} | {r['sweeps']} | {r['block_evals']} "
        f"| {r['max_diff']:.1e} | {_quality(r)}"
        for r in rows
    ]
    header = "model | method | form | window | sweeps | block evals / sample | max diff | FD | KID"
    return _markdown(header, "--- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---:", cells)


def _timed(fn: Any, device: torch.device, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _random_model(name: str, device: torch.device, quick: bool) -> nn.Module:
    """A preset with random weights N(0, 0.02^2): unlike adaLN-Zero's initialisation (zero noise
    predicted everywhere), its predictions depend on the input, so the chain has work to do."""
    torch.manual_seed(0)
    model = create_model(name, **({"hidden_size": 32, "num_heads": 2} if quick else {}))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model.to(device).eval()


def parallel_gpu_rows(device: str | torch.device = "cuda", quick: bool = False) -> list[dict[str, Any]]:
    """Wall-clock of parallel DDIM against sequential DDIM at batch 1, 4 and 16 (one row per case and rule).

    FPDM-XL/2 and DiT-XL/2 with random weights, 100 DDIM timesteps, no guidance (``quick``: the digits
    presets, small, and 20 timesteps: a CPU smoke run of the same code); FPDM with 2 Picard iterations per
    timestep and cold starts (its step is then one fixed function, the sequential sampler's with
    ``reuse=False``). The parallel sampler runs the full-window entries of ``CONFIGS`` (Picard, ChainSecant
    and Anderson on the cumulative map, every timestep in flight) with its defaults: noise-scaled tolerances
    (``DEFAULT_TAU``) and ``max_batch="auto"``, which on CUDA splits a sweep's model call into chunks that
    fit the free memory (no out-of-memory at any window; the chunk is reported as ``max_batch``). Per row:
    median wall-clock over 3 runs of each sampler (2 at batch 16) after a warm-up (one sweep for the
    parallel sampler), the speed-up, sweeps (sequential rounds), the chain's evaluations (timesteps
    evaluated), block evaluations per sample of both samplers, and the largest difference between the
    two samples. Random weights make a sensitive chain (a defect at a noisy timestep can move the sample
    far), so ``max_diff`` here says how well the tolerances hold the trajectory, not image quality.
    """
    device = torch.device(device)
    names = ("FPDM-Digits/2", "DiT-Digits/2") if quick else ("FPDM-XL/2", "DiT-XL/2")
    steps = 20 if quick else STEPS
    rows = []
    for name in names:
        model = _random_model(name, device, quick)
        explicit, implicit = block_cost(model)
        per_step = explicit + (ITERATIONS if implicit else 0)
        for batch in (1, 4, 16):
            repeats = 1 if quick else (2 if batch >= 16 else 3)
            labels = torch.arange(batch, device=device) % model.num_classes
            sequential = functools.partial(
                sample,
                model,
                GaussianDiffusion(),
                labels,
                budget=steps * per_step,
                steps=steps,
                reuse=False,
                generator=torch.Generator().manual_seed(0),
            )
            sequential()  # warm-up
            seq_s, seq = _timed(sequential, device, repeats)
            for config in (c for c in CONFIGS if c.form == "cumulative" and c.window is None):
                parallel = functools.partial(_parallel, model, labels, config, False, steps=steps)
                parallel(max_sweeps=1)  # warm-up: one sweep, the largest call
                par_s, par = _timed(parallel, device, repeats)
                row = {"model": name, "batch": batch, "solver": config.method, "device": str(device)}
                row.update(steps=steps, tau=par.options["tau"], max_batch=par.options["max_batch"])
                row.update(sequential_s=seq_s, parallel_s=par_s, speedup=seq_s / par_s, sweeps=par.sweeps)
                row.update(block_evals=par.block_evals, sequential_block_evals=seq.spent_total)
                row.update(evaluations=par.chain.evaluations, converged=par.converged)
                row["max_diff"] = float((par.images - seq.images).abs().max())
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the digits comparison (or the sweep of tau), print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and batch: a smoke run")
    parser.add_argument("--num", type=int, default=100, help="images per configuration")
    parser.add_argument(
        "--tau-sweep", action="store_true", help="measure the scales TAUS (picks DEFAULT_TAU)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and far faster on a shared machine
    warnings.simplefilter("ignore", ChainRuleWarning)  # Anderson's rows are measured on purpose
    start = time.perf_counter()
    num = 8 if args.quick else args.num
    labels = torch.arange(num) % 10
    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu",
        "torch": torch.__version__,
        "steps": 12 if args.quick else STEPS,
        "iterations": ITERATIONS,
        "num_images": num,
        "training": {**TRAIN, "steps": 3 if args.quick else TRAIN["steps"]},
    }
    models = {name: trained_model(name, args.quick) for name in ("FPDM-Digits/2", "DiT-Digits/2")}
    if args.tau_sweep:
        rows = [
            row for name, model in models.items() for row in tau_sweep_rows(name, model, labels, args.quick)
        ]
        print(tau_table(rows))
        chosen = {config.method: choose_tau(rows, config.method) for config in SWEPT}
        record.update(max_diff=MAX_DIFF, fd_change=FD_CHANGE, rows=rows, chosen_tau=chosen)
        print(f"largest tau within {MAX_DIFF:g} of sequential, FD unchanged: {chosen}")
        path = TAU_RESULTS
    else:
        rows = [row for name, model in models.items() for row in model_rows(name, model, labels, args.quick)]
        print(table(rows))
        record.update(tau=DEFAULT_TAU, rows=rows, target=_check_target(rows))
        for verdict in record["target"]:
            print(verdict)
        path = RESULTS
    record["total_s"] = time.perf_counter() - start
    if not args.quick:
        path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"total {record['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
