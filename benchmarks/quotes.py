"""Figures the pages quote in prose, each tied to the results file it comes from.

A :class:`Quote` is a page, a results file and a piece of its prose whose ``{fields}`` are facts read off
that file by the file's function in :data:`FACTS`, formatted as the page prints them. ``tests/test_docs.py``
checks that every page still says what its file says: re-run a benchmark, and a page whose prose no longer
matches fails the test until it is updated. Tables are not quoted here: they are generated whole
(:mod:`benchmarks.tables`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from benchmarks.tables import ROOT, parallel_facts

Facts = dict[str, str]


def span(values: Iterable[float], fmt: str, sep: str = "-") -> str:
    """``"low-high"`` of the formatted values, or one value when both format alike."""
    values = list(values)
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low}{sep}{high}"


def short(value: float, fmt: str = ".1e") -> str:
    """``2.9e-4`` rather than ``2.9e-04``, as the pages write it."""
    return format(value, fmt).replace("e-0", "e-").replace("e+0", "e+")


def tex(value: float) -> str:
    """``10^{-5}`` (or ``3 \\times 10^{-4}``) for a power of ten in a page's maths."""
    mantissa, exponent = f"{value:.0e}".split("e")
    power = f"10^{{{int(exponent)}}}"
    return power if mantissa == "1" else f"{mantissa} \\times {power}"


def pick(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The first row whose fields equal ``match``."""
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    raise KeyError(f"no row with {match}")


# ---------------------------------------------------------------------------------- library results


def chain(data: dict[str, Any]) -> Facts:
    """``chain.json``: the parallel guide's reading of the three chains and the grid."""
    rows = data["rows"]
    steps = {"tanh": data["settings"]["steps"], "euler": data["settings"]["steps"], "ddim": 100}
    parallel = {"tanh": ("step", "Picard"), "euler": ("cumulative", "Picard (ParaDiGMS)"),
                "ddim": ("cumulative", "Picard (ParaDiGMS)")}  # fmt: skip

    def row(chain: str, form: str, method: str, window: int | None = None) -> dict[str, Any]:
        return pick(rows, chain=chain, form=form, method=method, window=window or steps[chain])

    full = {c: row(c, *parallel[c]) for c in parallel}
    windowed = {c: row(c, *parallel[c], window=10) for c in parallel}
    anderson = [
        row(c, parallel[c][0], "Anderson(m=5)")["sweeps"] / full[c]["sweeps"] for c in ("tanh", "ddim")
    ]
    secant = [r for r in rows if r["chain"] == "ddim" and r["method"].startswith("ChainSecant")]
    secant = [r for r in secant if r["form"] == "cumulative" and r["window"] == 100]
    grid = data["grid"]["rules"]
    return {
        "tanh_full": f"{full['tanh']['evaluations']} evaluations for {full['tanh']['sweeps']} sweeps",
        "window_evals": span(
            (100 * windowed[c]["evaluations"] / full[c]["evaluations"] for c in full), ".0f", " to "
        )
        + "%",
        "window_sweeps": span((windowed[c]["sweeps"] / full[c]["sweeps"] for c in full), ".1f", " to "),
        "anderson_most": f"{max(anderson):.1f}",
        "grid_worse": f"{grid['Anderson(m=3)']['worse']} and {grid['Broyden(memory=4)']['worse']}",
        "chains": str(data["grid"]["chains"]),
        "euler_window": f"{row('euler', 'cumulative', 'Anderson(m=5)', 10)['sweeps']} against "
        f"{windowed['euler']['sweeps']}",
        "integrator": f"{row('euler', 'cumulative', 'ChainSecant(m=3)')['sweeps']} against "
        f"{full['euler']['sweeps']}",
        "ddim_errors": span((r["max_error"] / full["ddim"]["max_error"] for r in secant), ".1f", " to "),
    }


def gradients(data: dict[str, Any]) -> Facts:
    """``gradients.json``: the IFT backward against torchdeq's."""
    rows = data["ift_vs_torchdeq"]
    theirs = pick(rows, library="torchdeq 0.1.0", backward_solver="anderson")
    ours = pick(rows, library="implicitdiff", backward_solver="anderson")
    return {
        "stall": f"{theirs['backward_residual'] / data['problem']['b_tol']:.0f}",
        "their_error": f"{theirs['grad_rel_err']:.0e}".replace("e-0", r" \cdot 10^{-") + "}",
        "our_products": str(ours["backward_nfe"]),
    }


def gpu(data: dict[str, Any]) -> Facts:
    """``gpu.json``: the driver's cost on the H100, its compile rows and the FPDM training steps."""
    rows = data["solvers"]["rows"]
    facts: Facts = {}
    for problem, key in (("conv 64x64x32x32", "conv"), ("sequence 32x256x1152", "seq")):
        facts[f"{key}_f_ms"] = (
            f"{pick(rows, problem=problem)['plain_ms'] / pick(rows, problem=problem)['nfe']:.2f}"
        )
        for solver in ("Picard", "Anderson(m=6)", "Broyden(20)"):
            name = solver.split("(")[0].lower()
            for mode in ("fixed", "tol"):
                facts[f"{key}_{name}_{mode}"] = (
                    f"{pick(rows, problem=problem, solver=solver, mode=mode)['vs_plain']:.2f}"
                )
            pair = [pick(rows, problem=problem, solver=solver, mode=m)["vs_plain"] for m in ("fixed", "tol")]
            facts[f"{key}_{name}_span"] = f"{pair[0]:.2f} to {pair[1]:.2f}"
    conv = {(s, m): pick(rows, problem="conv 64x64x32x32", solver=s, mode=m)["vs_plain"]
            for s in ("Picard", "Anderson(m=6)", "Broyden(20)") for m in ("fixed", "tol")}  # fmt: skip
    facts["break_even_tol"] = f"{conv['Picard', 'tol'] / conv['Anderson(m=6)', 'tol']:.2f}"
    anderson, broyden = (conv[name, "fixed"] for name in ("Anderson(m=6)", "Broyden(20)"))
    anderson_tol, broyden_tol = (conv[name, "tol"] for name in ("Anderson(m=6)", "Broyden(20)"))
    facts["conv_rounded"] = (
        f"{anderson:.1f} times a plain evaluation with a fixed budget and {anderson_tol:.0f} times in "
        f"tolerance mode (Broyden {broyden:.1f} and {broyden_tol:.0f}); Picard costs "
        f"{conv['Picard', 'fixed']:.2f} and {conv['Picard', 'tol']:.1f}"
    )
    seq = [
        pick(rows, problem="sequence 32x256x1152", solver="Anderson(m=6)", mode=m)["vs_plain"]
        for m in ("fixed", "tol")
    ]
    facts["seq_anderson_rounded"] = span(seq, ".1f", " to ")
    compiled = data["solvers"]["compile"]
    fixed, tol = pick(compiled, solver="Picard", tol="None"), pick(compiled, solver="Picard", tol="0.0001")
    facts["compile_fixed"] = (
        f"{fixed['compiled_vs_eager']:.2f} times its eager time in {fixed['graphs']} graph"
    )
    facts["compile_tol"] = f"{tol['compiled_vs_eager']:.2f} times in {tol['graphs']} graphs"
    training = data["fpdm"]["training"]
    eager, blocks = pick(training, config="FPDM eager"), pick(training, config="FPDM compiled")
    facts["fpdm_steps"] = f"{blocks['step_ms']:.0f} ms against {eager['step_ms']:.0f} ms eager"
    facts["fpdm_speedup"] = f"{eager['step_ms'] / blocks['step_ms']:.1f}"
    dit, ckpt = pick(training, config="DiT eager"), pick(training, config="DiT checkpointing")
    facts["peaks"] = (
        f"{dit['peak_GB']:.1f} GB eager and {ckpt['peak_GB']:.1f} GB with checkpointing, FPDM-XL/2 at "
        f"{eager['peak_GB']:.1f} GB"
    )
    facts["sampler"] = span((r["sampler_vs_hand"] for r in data["fpdm"]["sampler"]), ".2f")
    facts["fpdm_step_pair"] = f"{eager['step_ms']:.0f} ms eager, {blocks['step_ms']:.0f} ms compiled"
    sampler = pick(data["fpdm"]["sampler"], batch=128, dtype="float32")
    facts["sampler_128"] = f"{sampler['sampler_ms']:.0f} ms for {sampler['timesteps']} timesteps"
    return facts


# ------------------------------------------------------------------------------------- FPDM results


def fpdm_memory(data: dict[str, Any]) -> Facts:
    rows = data["results"]
    fpdm = [r for name, r in rows.items() if name.startswith("FPDM")]
    dit = rows["DiT-XL/2"]
    saving = data["activation_saving"]
    return {
        "total_less": span((1 - r["total_vs_dit"] for r in fpdm), ".0%", "-").replace("%-", "-"),
        "activations_less": span((1 - r["activations_vs_dit"] for r in fpdm), ".0%", "-").replace("%-", "-"),
        "checkpointed": f"{saving['checkpointed_activations_GB']:.2f} GB",
        "grads": f"{dit['param_grads_GB']:.2f} GB",
        "per_sample": f"{saving['dit_activations_per_sample_GB']:.2f} GB per sample",
        "from_batch": str(saving["batch_from_which_activations_set_the_peak"]),
    }


def fpdm_sampling(data: dict[str, Any]) -> Facts:
    rows = data["results"]
    return {
        "ratios": span((r["ratio"] for r in rows), ".2f", " to "),
        "cpu_ratios": span((r["cpu_ratio"] for r in rows), ".2f", " to "),
    }


def fpdm_compile(data: dict[str, Any]) -> Facts:
    rows = data["results"]
    blocks = {r["preset"].split("-")[0]: r for r in rows if r["mode"] == "blocks"}
    return {
        "blocks": " and ".join(f"{blocks[m]['cpu_vs_eager']:.2f} ({m})" for m in ("FPDM", "DiT")),
        "warmup": f"{blocks['FPDM']['warmup_s']:.0f}",
    }


def fpdm_parallel_tau(data: dict[str, Any]) -> Facts:
    """``fpdm_parallel_tau.json``: the default scale, the scale that keeps FD, and what they cost."""
    f = parallel_facts(data)
    models, default = f["models"], f["default_tau"]

    def at(rule: str, tau: float) -> list[dict[str, Any]]:
        return [f["row"](model, rule, tau) for model in models]

    picard, secant = at("Picard", default), at("ChainSecant", default)
    fewer_evals = 1 - sum(r["block_evals"] for r in secant) / sum(r["block_evals"] for r in picard)
    sq = f["same_quality_tau"]
    rows = data["rows"]
    coarse = 1e-3
    coarse_secant = at("ChainSecant", coarse)
    sequential = f["sequential"]
    taus = sorted({r["tau"] for r in rows if r["tau"] is not None})
    loosest, tightest = taus[-1], taus[0]

    def sweeps(rule: str, tau: float) -> str:
        return span((r["sweeps"] for r in at(rule, tau)), "d")

    secant_sweeps, picard_sweeps = sweeps("ChainSecant", default), sweeps("Picard", default)
    return {
        "sequential_fd": ", ".join(f"{m.split('-')[0]} {sequential[m]['fd']:.2f}" for m in models),
        "default": short(default, ".0e"),
        "rounds": f"{secant_sweeps} rounds where ParaDiGMS takes {picard_sweeps}",
        "sweeps_default": f"**{secant_sweeps} sweeps** where Picard takes {picard_sweeps}",
        "times_fewer": f"{max(r['sweeps'] for r in picard) / max(r['sweeps'] for r in secant):.2f}",
        "fewer_evals": f"{fewer_evals:.0%}",
        "evals_default": f"{span((r['block_evals'] for r in secant), 'd')} per sample against "
        f"{span((r['block_evals'] for r in picard), 'd')}",
        "times_sequential": span((r["evaluations_per_step"] for r in secant), ".1f"),
        "same_quality": f"{sweeps('ChainSecant', sq['ChainSecant'])} rounds with ChainSecant and "
        f"{sweeps('Picard', sq['Picard'])} with Picard",
        "same_quality_tau": short(sq["ChainSecant"], ".0e"),
        "same_quality_evals": span(
            (r["evaluations_per_step"] for r in at("ChainSecant", sq["ChainSecant"])), ".1f"
        ),
        "coarse": f"{sweeps('ChainSecant', coarse)} rounds keeps FD ("
        + " and ".join(
            f"{r['fd'] - sequential[m]['fd']:+.2f}" for r, m in zip(coarse_secant, models, strict=True)
        )
        + ")",
        "diff_default": " to ".join(short(f(r["max_diff"] for r in [*picard, *secant])) for f in (min, max)),
        "grow_secant": f"{sweeps('ChainSecant', loosest)} to {sweeps('ChainSecant', tightest)}",
        "grow_picard": f"{sweeps('Picard', loosest)} to {sweeps('Picard', tightest)}",
    }


def fpdm_chain_analysis(data: dict[str, Any]) -> Facts:
    gains = data["perturbation"]["gains"]
    uniform = data["uniform_tolerance"]["rows"]
    fewer = [r["scaled_sweeps"] - r["uniform_sweeps"] for r in uniform]
    newton = min(
        (r for r in data["newton"]["rows"] if r["rule"].startswith("Newton")), key=lambda r: r["tau"]
    )
    contraction = data["contraction"]["rows"]
    return {
        "gains": f"{min(gains):.2f} to {max(gains):.2f}",
        "uniform_fewer": span(fewer, "d", " to "),
        "newton": f"{newton['sweeps']} rounds at $\\tau = {tex(newton['tau'])}$",
        "contraction": span((r["median"] for r in contraction), ".1f"),
    }


def parallel_guess(data: dict[str, Any]) -> Facts:
    """``parallel_guess.json``: what the first guesses, ParaDiGMS's criterion and two processes did."""
    rows = data["rows"]

    def over_models(method: str, key: str, fmt: str) -> str:
        return span((r[key] for r in rows if r["method"] == method), fmt)

    guesses = {
        "ChainSecant": "cold",
        "ChainSecant, ParaSolver's guess (warmup 1)": "with ParaSolver's guess (`warmup=1`)",
        "ChainSecant, coarse guess (4 timesteps)": "with a coarse run of 4 timesteps (`coarse=4`)",
    }
    held = {r["rule"]: r for r in data["held_out"]}
    picard, secant = held["Picard"]["sweeps"], min(r["sweeps"] for r in data["held_out"])
    processes = data["processes"]
    return {
        "guess_rounds": ", ".join(f"{over_models(m, 'sweeps', 'd')} {text}" for m, text in guesses.items()),
        "default_ratio": over_models("ChainSecant", "ratio", ".1f"),
        "window_rounds": over_models("ChainSecant, window 16, warmup 1", "sweeps", "d"),
        "window_ratio": over_models("ChainSecant, window 16, warmup 1", "ratio", ".1f"),
        "paradigms_rounds": over_models("ParaDiGMS (its criterion 0.1, window 10)", "sweeps", "d"),
        "paradigms_ratio": over_models("ParaDiGMS (its criterion 0.1, window 10)", "ratio", ".1f"),
        "paradigms_diff": over_models("ParaDiGMS (its criterion 0.1, window 10)", "max_diff", ".1f"),
        "paradigms_fd": span(
            (
                r["fd"] - pick(rows, model=r["model"], method="sequential")["fd"]
                for r in rows
                if r["method"] == "ParaDiGMS (its criterion 0.1, window 10)"
            ),
            ".1f",
        ),
        "held_out": f"{secant} rounds where Picard takes {picard} ({picard / secant:.2f} times fewer)",
        "processes_diff": short(max(r["max_diff_two_vs_one"] for r in processes), ".0e").replace("0e+0", "0"),
        "processes_speedup": span((r["speedup"] for r in processes), ".2f"),
    }


def parallel_step_model(data: dict[str, Any]) -> Facts:
    """``parallel_step_model.json``: the step models, stopping tests and windows on both digits models."""
    rows = data["rows"]

    def over_models(key: str, fmt: str, section: str, rule: str, **options: Any) -> str:
        return span(
            (
                r[key]
                for r in rows
                if r["section"] == section and r["rule"] == rule and r["options"] == options
            ),
            fmt,
        )

    secant, picard = "ChainSecant: I + secants", "Picard: I (ParaDiGMS)"
    default = [r for r in rows if r["section"] == "rules" and r["rule"] == secant]
    return {
        "picard": over_models("sweeps", "d", "rules", picard),
        "x0": over_models("sweeps", "d", "rules", "Picard: r_k I (x0 part nonlinear)"),
        "eps": over_models("sweeps", "d", "rules", "Picard: a_k I (eps part nonlinear)"),
        "secant": over_models("sweeps", "d", "rules", secant),
        "x0_secant": over_models("sweeps", "d", "rules", "r_k I + secants of the x0 part"),
        "eps_secant": over_models("sweeps", "d", "rules", "a_k I + secants of the eps part"),
        "fitted": over_models("sweeps", "d", "rules", "ChainSecant(base='fitted')"),
        "oracle": span((r["oracle_sweeps"] for r in default), "d"),
        "confirm": span((r["sweeps"] - r["oracle_sweeps"] for r in default), "d"),
        "uniform": over_models("sweeps", "d", "stopping", secant, tol=1e-6),
        "uniform_diff": " to ".join(
            short(f(r["max_diff"] for r in rows if r["options"] == {"tol": 1e-6} and r["rule"] == secant))
            for f in (min, max)
        ),
        "uniform_3e6": over_models("sweeps", "d", "stopping", secant, tol=3e-6),
        "uniform_3e6_diff": short(
            max(r["max_diff"] for r in rows if r["options"] == {"tol": 3e-6} and r["rule"] == secant)
        ),
        "window16": over_models("sweeps", "d", "windows", secant, window=16),
        "window16_ratio": over_models("evaluations", ".1f", "windows", secant, window=16),
        "window50": over_models("sweeps", "d", "windows", secant, window=50),
        "window50_ratio": over_models("evaluations", ".1f", "windows", secant, window=50),
        "grid_worse": f"{data['grid']['more_than_picard']} of its {data['grid']['chains']}",
        "grid_sweeps": f"{1 - data['grid']['fitted'] / data['grid']['chain_secant']:.0%}",
        "gains": f"{data['gains']['gain_min']:.2f} to {data['gains']['gain_max']:.2f}",
        "spread": f"{data['gains']['noise_scaled_spread']:.0f}",
    }


def parallel_error_stop(data: dict[str, Any]) -> Facts:
    """``parallel_error_stop.json``: the sampler stopped on its estimated error, and the grid's misses."""
    rows = data["rows"]

    def over_models(key: str, fmt: str, rule: str, error_tol: float | None) -> str:
        return span((r[key] for r in rows if r["rule"] == rule and r["error_tol"] == error_tol), fmt)

    grid, held = data["grid"], data["held_out"]
    picard = pick(held, rule="picard", error_tol=1e-3)
    return {
        "held_secant": span(
            (r["sweeps"] for r in held if r["rule"] != "picard" and r["error_tol"] == 1e-3), "d"
        ),
        "held_picard": str(pick(held, rule="picard", error_tol=None)["sweeps"]),
        "held_picard_error": str(picard["sweeps"]),
        "held_picard_diff": short(picard["max_diff"]),
        "fitted_sweeps": over_models("sweeps", "d", "secant-fitted", 1e-3),
        "fitted_evals": over_models("evaluations", ".1f", "secant-fitted", 1e-3),
        "fitted_diff": short(
            max(r["max_diff"] for r in rows if r["rule"] == "secant-fitted" and r["error_tol"] == 1e-3)
        ),
        "secant_sweeps": over_models("sweeps", "d", "secant", 1e-3),
        "secant_residuals": over_models("sweeps", "d", "secant", None),
        "picard_sweeps": over_models("sweeps", "d", "picard", 1e-3),
        "picard_residuals": over_models("sweeps", "d", "picard", None),
        "grid_missed": str(sum(g["missed"] for g in grid)),
        "grid_solves": str(sum(g["chains"] for g in grid)),
        "grid_worst": f"{max(g['worst_ratio'] for g in grid):.1f}",
    }


FACTS: dict[str, Callable[[dict[str, Any]], Facts]] = {
    "chain.json": chain,
    "gradients.json": gradients,
    "gpu.json": gpu,
    "fpdm_memory.json": fpdm_memory,
    "fpdm_sampling.json": fpdm_sampling,
    "fpdm_compile.json": fpdm_compile,
    "fpdm_parallel_tau.json": fpdm_parallel_tau,
    "fpdm_chain_analysis.json": fpdm_chain_analysis,
    "parallel_guess.json": parallel_guess,
    "parallel_step_model.json": parallel_step_model,
    "parallel_error_stop.json": parallel_error_stop,
}


@dataclass(frozen=True)
class Quote:
    """A piece of a page's prose (whitespace-insensitive) whose ``{fields}`` come from ``file``'s facts."""

    page: str
    file: str
    text: str


PARALLEL, MEASUREMENTS = "docs/guides/parallel.md", "docs/fpdm-measurements.md"
PERFORMANCE, SOLVERS = "docs/guides/performance.md", "docs/guides/solvers.md"
EXAMPLE = "examples/fpdm/README.md"
STEP_MODEL = "parallel_step_model.json"
ERROR_STOP = "parallel_error_stop.json"
QUOTES = [
    Quote(PARALLEL, "parallel_guess.json", "it took {guess_rounds}"),
    Quote(PARALLEL, "parallel_guess.json", "spends {default_ratio} times the sequential evaluations"),
    Quote(PARALLEL, "parallel_guess.json", "{window_rounds} rounds for {window_ratio} times"),
    Quote(PARALLEL, "parallel_guess.json", "{paradigms_rounds} rounds and {paradigms_ratio} times the"),
    Quote(PARALLEL, "parallel_guess.json", "images differ by up to {paradigms_diff}"),
    Quote(PARALLEL, "parallel_guess.json", "and FD moves by {paradigms_fd}"),
    Quote(PARALLEL, "parallel_guess.json", "ChainSecant takes {held_out}"),
    Quote(PARALLEL, "parallel_guess.json", "largest difference {processes_diff}"),
    Quote(PARALLEL, "parallel_guess.json", "wall-clock speed-up of {processes_speedup}"),
    Quote(
        PARALLEL,
        STEP_MODEL,
        "nonlinear part, Picard took {x0} rounds (ParaDiGMS {picard}); with the predicted noise, {eps}",
    ),
    Quote(
        PARALLEL,
        STEP_MODEL,
        "secants on top, {x0_secant} and {eps_secant}, against {secant} for `ChainSecant`",
    ),
    Quote(PARALLEL, STEP_MODEL, "with the secants on top, {fitted}"),
    Quote(PARALLEL, STEP_MODEL, "takes more sweeps than Picard on {grid_worse} test chains"),
    Quote(PARALLEL, STEP_MODEL, "{grid_sweeps} fewer sweeps than `ChainSecant` in all"),
    Quote(PARALLEL, STEP_MODEL, "spends {confirm} sweeps confirming"),
    Quote(PARALLEL, STEP_MODEL, "the sequential samples after {oracle} sweeps"),
    Quote(PARALLEL, STEP_MODEL, "moves the sample by {gains} times its size"),
    Quote(PARALLEL, STEP_MODEL, "is {spread} times tighter at the last timestep"),
    Quote(PARALLEL, STEP_MODEL, "`tol=1e-6` took {uniform} rounds (max diff {uniform_diff})"),
    Quote(PARALLEL, STEP_MODEL, "`tol=3e-6` took {uniform_3e6}, still within {uniform_3e6_diff}"),
    Quote(PARALLEL, STEP_MODEL, "16 timesteps in flight took {window16} rounds for {window16_ratio} times"),
    Quote(PARALLEL, STEP_MODEL, "50 took {window50} for {window50_ratio}"),
    Quote(PARALLEL, ERROR_STOP, "`--chain-rule secant-fitted --error-tol 1e-3` took {fitted_sweeps} sweeps"),
    Quote(PARALLEL, ERROR_STOP, "within {fitted_diff} of the sequential samples, for {fitted_evals} times"),
    Quote(
        PARALLEL, ERROR_STOP, "the default rule took {secant_sweeps} ({secant_residuals} on residuals alone)"
    ),
    Quote(PARALLEL, ERROR_STOP, "Picard {picard_sweeps} ({picard_residuals})"),
    Quote(
        PARALLEL, ERROR_STOP, "with `error_tol=1e-3` took {held_secant} sweeps against Picard's {held_picard}"
    ),
    Quote(
        PARALLEL, ERROR_STOP, "({held_picard_error} with `error_tol`, and then {held_picard_diff} from the"
    ),
    Quote(PARALLEL, ERROR_STOP, "further than `error_tol` in {grid_missed} of {grid_solves} solves"),
    Quote(PARALLEL, ERROR_STOP, "at worst {grid_worst} times `error_tol`"),
    Quote(PARALLEL, "chain.json", "({tanh_full}, against 50 for the recurrence)"),
    Quote(
        PARALLEL,
        "chain.json",
        "a window of 10 spends {window_evals} of the evaluations for {window_sweeps} times",
    ),
    Quote(PARALLEL, "chain.json", "take up to {anderson_most} times Picard's sweeps"),
    Quote(PARALLEL, "chain.json", "more than Picard on {grid_worse} of the {chains} test chains"),
    Quote(PARALLEL, "chain.json", "with a window they are worse still ({euler_window})"),
    Quote(PARALLEL, "chain.json", "(the integrator: {integrator};"),
    Quote(PARALLEL, "chain.json", "(the `ddim` errors, {ddim_errors} times Picard's"),
    Quote(PARALLEL, "fpdm_parallel_tau.json", "(sequential: {sequential_fd})"),
    Quote(
        PARALLEL, "fpdm_parallel_tau.json", "ChainSecant takes {rounds}, with {fewer_evals} fewer evaluations"
    ),
    Quote(PARALLEL, "fpdm_parallel_tau.json", "takes {same_quality}."),
    Quote(PARALLEL, "fpdm_parallel_tau.json", "within 1e-3 it is {times_fewer} times fewer; {coarse}"),
    Quote(PARALLEL, "fpdm_chain_analysis.json", "the same chain finishes in {newton}"),
    Quote(
        MEASUREMENTS,
        "fpdm_parallel_tau.json",
        "There ChainSecant takes {sweeps_default} ({times_fewer} times",
    ),
    Quote(
        MEASUREMENTS,
        "fpdm_parallel_tau.json",
        "{fewer_evals} fewer block evaluations ({evals_default}, "
        "{times_sequential} times the sequential sampler's)",
    ),
    Quote(MEASUREMENTS, "fpdm_parallel_tau.json", "FD unchanged (within 0.01 of sequential): {same_quality}"),
    Quote(MEASUREMENTS, "fpdm_parallel_tau.json", "(`--chain-tau {same_quality_tau}`)"),
    Quote(MEASUREMENTS, "fpdm_parallel_tau.json", "at {same_quality_evals} times the sequential evaluations"),
    Quote(MEASUREMENTS, "fpdm_parallel_tau.json", "({diff_default} at {default})"),
    Quote(
        MEASUREMENTS, "fpdm_parallel_tau.json", "from {grow_secant} (ChainSecant) and {grow_picard} (Picard)"
    ),
    Quote(MEASUREMENTS, "fpdm_chain_analysis.json", "moves its sample by {gains} times the perturbation"),
    Quote(MEASUREMENTS, "fpdm_chain_analysis.json", "took {uniform_fewer} fewer sweeps"),
    Quote(MEASUREMENTS, "fpdm_memory.json", "FPDM-XL/2 needs {total_less} less than DiT-XL/2 in total"),
    Quote(MEASUREMENTS, "fpdm_memory.json", "The saved activations shrink too, {activations_less}"),
    Quote(MEASUREMENTS, "fpdm_memory.json", "cuts DiT's saved activations to {checkpointed}"),
    Quote(
        MEASUREMENTS,
        "fpdm_memory.json",
        "DiT-XL/2's gradients ({grads}) outweigh its activations ({per_sample})",
    ),
    Quote(MEASUREMENTS, "fpdm_memory.json", "Activations set the peak from batch {from_batch} on"),
    Quote(MEASUREMENTS, "gpu.json", "DiT-XL/2 at batch 128 peaks at {peaks}"),
    Quote(MEASUREMENTS, "gpu.json", "makes the FPDM-XL/2 step {fpdm_speedup} times faster"),
    Quote(MEASUREMENTS, "gpu.json", "the H100's {sampler} above"),
    Quote(EXAMPLE, "gpu.json", "S-JFB's draw of 6 + 3 iterations: {fpdm_step_pair}"),
    Quote(EXAMPLE, "gpu.json", "the sampler on FPDM-XL/2, batch 128, float32: {sampler_128}"),
    Quote(
        MEASUREMENTS,
        "fpdm_sampling.json",
        "the sampler took {ratios} times the hand loop's time ({cpu_ratios} in",
    ),
    Quote(MEASUREMENTS, "fpdm_compile.json", "compiled blocks take {blocks} times the eager step's CPU time"),
    Quote(MEASUREMENTS, "fpdm_compile.json", "after a warm-up of {warmup} s"),
    Quote(
        "docs/fpdm.md", "fpdm_chain_analysis.json", "contracts the residual by {contraction}x per iteration"
    ),
    Quote(PERFORMANCE, "gpu.json", "has an $f$ of about {conv_f_ms} ms"),
    Quote(
        PERFORMANCE,
        "gpu.json",
        "Picard {conv_picard_fixed} (fixed budget) and {conv_picard_tol} (tolerance mode), "
        "Anderson(m=6) {conv_anderson_fixed} and {conv_anderson_tol}, Broyden(20) {conv_broyden_fixed} and "
        "{conv_broyden_tol}",
    ),
    Quote(
        PERFORMANCE,
        "gpu.json",
        "whose $f$ takes about {seq_f_ms} ms, the same solvers cost {seq_picard_span}, "
        "{seq_anderson_span} and {seq_broyden_span} times",
    ),
    Quote(PERFORMANCE, "gpu.json", "fewer than {conv_picard_fixed} / {conv_anderson_fixed}"),
    Quote(PERFORMANCE, "gpu.json", "fewer than {conv_picard_tol} / {conv_anderson_tol} = {break_even_tol}"),
    Quote(PERFORMANCE, "gpu.json", "the difference between {conv_picard_fixed} and {conv_picard_tol}"),
    Quote(PERFORMANCE, "gpu.json", "took {compile_fixed}, with `tol=1e-4` {compile_tol}"),
    Quote(PERFORMANCE, "gpu.json", "compiled blocks took {fpdm_steps}"),
    Quote(SOLVERS, "gpu.json", "On the conv problem $f$ takes about {conv_f_ms} ms"),
    Quote(SOLVERS, "gpu.json", "an iteration of Anderson costs {conv_rounded}"),
    Quote(SOLVERS, "gpu.json", "Anderson's iteration costs {seq_anderson_rounded} evaluations"),
    Quote(
        SOLVERS,
        "gpu.json",
        "or {break_even_tol} of them in tolerance mode ({conv_picard_tol} / {conv_anderson_tol})",
    ),
    Quote(SOLVERS, "gpu.json", "whose $f$ takes about {seq_f_ms} ms"),
    Quote(
        "docs/guides/gradients.md", "gradients.json", "stalls at a residual about {stall} times the tolerance"
    ),
    Quote("docs/guides/gradients.md", "gradients.json", "relative error of ${their_error}$"),
    Quote(
        "docs/guides/gradients.md",
        "gradients.json",
        "ours converges in {our_products} vector-Jacobian products",
    ),
]


def load(file: str) -> dict[str, Any]:
    return json.loads((ROOT / "benchmarks" / "results" / file).read_text())


def rendered() -> list[tuple[Quote, str]]:
    """Every quote with its fields filled from its file."""
    facts = {file: compute(load(file)) for file, compute in FACTS.items()}
    return [(quote, quote.text.format(**facts[quote.file])) for quote in QUOTES]
