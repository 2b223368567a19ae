"""The tables of measured figures, rendered from the results files: one generator for docs and scripts.

Each renderer of :data:`RENDERERS` turns one results file (``benchmarks/results/*.json``, or the FPDM
example's ``examples/fpdm/results/``) into Markdown snippets, and :func:`generate` puts above each one the
file it comes from and the machine, torch version and date that file records. The documentation's build
writes them to ``docs/_generated/<snippet>.md`` (``docs/_ext/bench_tables.py``), where the pages
``{include}`` them; the scripts print the same tables when they finish. This module reads JSON only: it
imports neither torch nor the example, and runs no benchmark. A missing file gives a marked box, never
numbers::

    python -m benchmarks.tables                   # print every table
    python -m benchmarks.tables --write DIR       # write DIR/<snippet>.md (what the docs build does)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MISSING = "\u2013"  # an en dash in a cell whose value the file does not have
Format = str | Callable[[Any], str]
Column = tuple[str, str, Format]


# ----------------------------------------------------------------------------------------- Markdown


def cell(value: Any, fmt: Format = "") -> str:
    """One cell: ``fmt`` is a format spec for numbers or a function; ``None`` is an en dash."""
    if value is None:
        return MISSING
    if callable(fmt):
        return fmt(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value).replace("|", "\\|")
    return format(value, fmt)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], align: str = "") -> str:
    """A Markdown pipe table; ``align`` holds one ``l`` or ``r`` per column (default: left)."""
    rules = ["---:" if a == "r" else "---" for a in align.ljust(len(columns), "l")]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "| " + " | ".join(rules) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def pivot(rows: list[dict[str, Any]], row_key: str, col_key: str, value: Callable[[dict], str]) -> str:
    """One row per ``row_key`` and one column per ``col_key``, in first-seen order."""
    names = list(dict.fromkeys(str(row[row_key]) for row in rows))
    cols = list(dict.fromkeys(str(row[col_key]) for row in rows))
    cells = {(str(row[row_key]), str(row[col_key])): value(row) for row in rows}
    body = [{"name": name, **{col: cells.get((name, col)) for col in cols}} for name in names]
    return table(body, [("name", row_key, ""), *[(col, col, str) for col in cols]], "l" + "r" * len(cols))


def yes_no(value: Any) -> str:
    return "yes" if value else "**no**"


def sci(value: float) -> str:
    """``2.9e-04``; an exact zero as ``0``."""
    return "0" if value == 0 else f"{value:.1e}"


def short(value: float, fmt: str = ".0e") -> str:
    """``1e-6`` rather than ``1e-06``."""
    return format(value, fmt).replace("e-0", "e-").replace("e+0", "e+")


# ------------------------------------------------------------------------------------- provenance


def describe(meta: dict[str, Any]) -> str:
    """The machine a file records, in one line: device or processor, threads, torch, date."""
    if not meta:
        return "machine, torch and date not recorded"
    device = meta.get("device", "cpu")
    if device and device != "cpu":
        where = f"{device}" + (f", CUDA {meta['cuda']}" if meta.get("cuda") else "")
    else:
        threads, cores = meta.get("torch_threads"), meta.get("cores")
        counts = [f"{cores} cores"] * bool(cores) + [f"{threads} torch thread{'s' * (threads != 1)}"] * bool(
            threads
        )
        where = f"{meta.get('processor') or meta.get('machine', 'CPU')}" + (
            f" ({', '.join(counts)})" if counts else ""
        )
    text = f"{where}, torch {meta.get('torch', '?')}, {str(meta.get('date', '?'))[:10]}"
    load = meta.get("load_average")
    if isinstance(load, list) and load:
        text += f", load average {load[0]:.1f}"
    if meta.get("stamped"):
        text += " (recorded after the run from the file and its commit)"
    return text


def provenance(path: Path, meta: dict[str, Any]) -> str:
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    return f"*From `{rel}`: {describe(meta)}.*\n"


def committed(path: Path) -> str:
    """The date of the last commit that touched ``path`` (empty outside git)."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(path)],
            cwd=ROOT, capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out


def not_measured(what: str, command: str) -> str:
    return (
        ":::{admonition} No results file\n:class: warning\n\n"
        f"{what} is not in this checkout, so there is no table here. Run `{command}` and "
        "rebuild the docs; the table is generated from the file at build time.\n:::\n"
    )


# -------------------------------------------------------------------------------- library benchmarks


def solvers(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/solvers.json``: solves against torchdeq, memory against max_iter, the driver."""
    s = data.get("settings", {})
    head = (
        f"Every solver solves `tanh(W z + x)` to an absolute tolerance of {s.get('tol')} with "
        f"`max_iter={s.get('max_iter')}`, batch {s.get('batch')}, dimension {s.get('dim')}; "
        f"wall time is the median of {s.get('reps')} runs.\n\n"
    )
    rows = data.get("solves", [])

    def nfe(row: dict[str, Any]) -> str:
        return f"{row['nfe']}" + ("" if row.get("reached_tol", True) else " (not reached)")

    solves = (
        head
        + "**Evaluations of f** until every sample reached the tolerance (fewer is better):\n\n"
        + pivot(rows, "solver", "problem", nfe)
        + "\n\n**Wall-clock ms** of the whole solve:\n\n"
        + pivot(rows, "solver", "problem", lambda row: cell(row.get("wall_ms"), ".1f"))
        + "\n\n**Peak memory, MiB**, added by the solve:\n\n"
        + pivot(rows, "solver", "problem", lambda row: cell(row.get("peak_mib"), ".2f"))
    )
    memory = (
        "Peak memory of one solve on the hard problem with a tolerance that is never reached, so every "
        "solver runs to `max_iter`.\n\n"
        + table(
            data.get("memory_vs_max_iter", []),
            [("solver", "solver", ""), ("max_iter", "max_iter", "d"), ("peak_mib", "peak MiB", ".2f")],
            "lrr",
        )
    )
    overhead = (
        "The driver's cost, measured side by side in one run: each solve makes a fixed number of "
        "evaluations of f (a 3x3 convolution with tanh), in a fixed budget (`tol=None`, no host reads) "
        "and in tolerance mode with a tolerance never reached (one host read every `check_every` "
        "evaluations). `/ plain` is the time over a plain loop `z = f(z)` of the same evaluations, "
        "the limit no solver can beat; `/ torchdeq` over torchdeq's solver of the same kind run for the "
        "same iterations. Host syncs are counted per evaluation.\n\n" + driver_table(data.get("driver", []))
    )
    return {"solvers_solves": solves, "solvers_memory": memory, "solvers_overhead": overhead}


def driver_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`benchmarks.driver_rows.driver_rows`."""
    columns: list[Column] = [
        ("problem", "problem", ""),
        ("solver", "solver", ""),
        ("mode", "mode", ""),
        ("nfe", "evaluations", "d"),
        ("syncs_per_iter", "host syncs / evaluation", ".2f"),
        ("vs_plain", "wall / plain loop", ".2f"),
    ]
    if any("launches_per_iter" in row for row in rows):
        columns.append(("launches_per_iter", "launches / evaluation beside f's", ".1f"))
    if any("graph_vs_plain" in row for row in rows):
        columns.append(("graph_vs_plain", "CUDA graph / plain loop", ".2f"))
    columns += [
        ("torchdeq_syncs_per_iter", "torchdeq syncs / evaluation", ".2f"),
        ("vs_torchdeq", "wall / torchdeq", ".2f"),
    ]
    return table(rows, columns, "lllr" + "r" * (len(columns) - 4))


def launches(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/launches.json``: kernel launches per iteration beside f's."""
    rows = [{"rule": f"`{rule}`", **counts} for rule, counts in data["extra_launches_per_iteration"].items()]
    columns: list[Column] = [
        ("rule", "extra launches per iteration", ""),
        ("fixed", "fixed budget (`tol=None`)", ".1f"),
        ("tolerance", "tolerance mode", ".1f"),
    ]
    return {"launches": table(rows, columns, "lrr")}


def pytree(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/pytree.json``: a dict state against a hand-flattened tensor."""
    s = data.get("settings", {})
    head = (
        f"Batch {s.get('batch')}, {s.get('solver')}, {s.get('evaluations')} evaluations, medians of "
        f"{s.get('repeats')} interleaved runs:\n\n"
    )
    columns: list[Column] = [
        ("mode", "mode", ""),
        ("pytree_ms", "dict state (ms)", ".1f"),
        ("flat_ms", "hand-flattened (ms)", ".1f"),
        ("ratio", "ratio", ".2f"),
    ]
    return {"pytree": head + table(data["rows"], columns, "lrrr")}


def gradients(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/gradients.json``: estimators' memory and time; IFT against torchdeq."""
    p = data.get("problem", {})
    rho = p.get("spectral_radius_of_J_sample0")
    head = (
        f"Problem: `f(z, x) = {p.get('f')}`, d = {p.get('d')}, batch {p.get('batch')}, {p.get('dtype')}, "
        f"spectral norm of W {p.get('W_spectral_norm')}"
        + (f", spectral radius of the Jacobian at z* {rho:.3f}" if isinstance(rho, float) else "")
        + ". One training step (forward + backward of `sum(z**2)`) with the forward solve run to a fixed "
        "number of iterations (`fwd cap`). *saved MiB* is what autograd keeps for the backward; *peak MiB* "
        "the peak of live memory over the step, solver history included; *x* columns are relative to the "
        "same estimator at the smaller cap.\n\n"
    )
    estimators = head + table(
        data.get("estimators", []),
        [
            ("estimator", "estimator", ""),
            ("forward_cap", "fwd cap", "d"),
            ("saved_mib", "saved MiB", ".3f"),
            ("saved_ratio", "saved x", ".2f"),
            ("peak_mib", "peak MiB", ".2f"),
            ("peak_ratio", "peak x", ".2f"),
            ("fwd_bwd_ms", "fwd+bwd ms", ".1f"),
            ("backward_nfe", "backward nfe", "d"),
        ],
        "lrrrrrrr",
    )
    ref = p.get("z_ref_residual")
    ift = (
        f"Exact (IFT) backward to an absolute tolerance of {p.get('b_tol')} (cap {p.get('b_max_iter')}), "
        "ours against torchdeq's, both from the same z*"
        + (f" (residual {ref:.0e})" if isinstance(ref, float) else "")
        + "; *rel err* is the relative error of dL/dW against a dense float64 solve of the adjoint "
        "equation at that z*. Times are the median of the backward call alone.\n\n"
        + table(
            data.get("ift_vs_torchdeq", []),
            [
                ("library", "library", ""),
                ("backward_solver", "backward solver", ""),
                ("backward_ms", "backward ms", ".1f"),
                ("backward_nfe", "backward nfe", "d"),
                ("backward_residual", "residual", ".1e"),
                ("converged", "converged", yes_no),
                ("grad_rel_err", "dL/dW rel err", ".1e"),
            ],
            "llrrrlr",
        )
    )
    return {"gradients_estimators": estimators, "gradients_ift": ift}


def chain(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/chain.json``: sweeps of solve_chain on three chains, and the test grid."""
    rows = table(
        data["rows"],
        [
            ("chain", "chain", ""),
            ("form", "form", ""),
            ("method", "method", ""),
            ("window", "window", "d"),
            ("sweeps", "sweeps", "d"),
            ("evaluations", "evaluations", "d"),
            ("max_error", "error", sci),
        ],
        "lllrrrr",
    )
    grid = data["grid"]
    counts = [
        {"rule": rule, **({} if rule == "Picard" else c), "sweeps": c["sweeps"]}
        for rule, c in grid["rules"].items()
    ]
    grid_table = (
        f"{grid['chains']} chains ({grid['description']}); the sweeps summed, and the chains on which a rule "
        "took more sweeps than Picard on the same form and window:\n\n"
        + table(
            counts,
            [
                ("rule", "rule", ""),
                ("sweeps", "sweeps in all", "d"),
                ("worse", "chains worse than Picard", "d"),
                ("worst_excess", "worst excess", "d"),
            ],
            "lrrr",
        )
    )
    return {"chain_rows": rows, "chain_grid": grid_table}


# -------------------------------------------------------------------------------------- GPU results


def gpu(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/gpu.json`` (``python -m benchmarks.gpu`` on a CUDA machine), by section."""
    out: dict[str, str] = {}
    if section := data.get("solvers"):
        compiled = table(
            section.get("compile", []),
            [
                ("solver", "solver", ""),
                ("tol", "tol", ""),
                ("first_call_s", "first call s", ".1f"),
                ("graphs", "graphs", "d"),
                ("new_graphs_after_second_call", "new graphs after call 2", "d"),
                ("compiled_vs_eager", "compiled / eager", ".2f"),
            ],
            "llrrrr",
        )
        out["gpu_solvers"] = (
            driver_table(section.get("rows", []))
            + "\n\n`torch.compile` of a `DEQLayer` (f a 4x4 tanh layer, 30 evaluations):\n\n"
            + compiled
        )
    if section := data.get("fpdm"):
        training = table(
            section.get("training", []),
            [
                ("config", "configuration", ""),
                ("batch", "batch", "d"),
                ("step_ms", "step ms", ".1f"),
                ("peak_GB", "peak GB", ".1f"),
                ("first_step_s", "first step s", ".1f"),
                ("graphs_after_warmup", "graphs after warm-up", "d"),
                ("mfu", "model FLOP utilisation", ".2f"),
            ],
            "lrrrrrr",
        )
        sampler = table(
            section.get("sampler", []),
            [
                ("batch", "batch", "d"),
                ("dtype", "dtype", ""),
                ("sampler_vs_hand", "sampler / hand loop", ".3f"),
                ("syncs_per_timestep", "host syncs per timestep", ".1f"),
            ],
            "rlrr",
        )
        out["gpu_fpdm"] = (
            "Training step, bf16 autocast, fused AdamW:\n\n"
            + training
            + "\n\nSampling, 10 DDIM timesteps with 2 Picard iterations each:\n\n"
            + sampler
        )
    if section := data.get("chain"):
        out["gpu_chain"] = table(
            section.get("rows", []),
            [
                ("model", "model", ""),
                ("batch", "batch", "d"),
                ("solver", "rule", ""),
                ("sweeps", "sweeps", "d"),
                ("sequential_s", "sequential s", ".2f"),
                ("parallel_s", "parallel s", ".2f"),
                ("speedup", "speed-up", ".2f"),
                ("max_diff", "max diff", sci),
            ],
            "lrlrrrrr",
        )
    for name in ("gpu_solvers", "gpu_fpdm", "gpu_chain"):
        out.setdefault(
            name, not_measured("This section of `benchmarks/results/gpu.json`", "python -m benchmarks.gpu")
        )
    return out


def gpu_meta(data: dict[str, Any], snippet: str) -> dict[str, Any]:
    """A GPU section may come from another run than the file's last one: its own record, if it has one."""
    section = data.get(snippet.removeprefix("gpu_"), {})
    own = section.get("meta")
    return own if isinstance(own, dict) and own.get("date") else data.get("meta", {})


# ----------------------------------------------------------------------------------------- FPDM


def fpdm_memory(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/fpdm_memory.json``: peak training memory of FPDM-XL/2 and DiT-XL/2."""
    rows = [
        {"name": name + (f" ({r['block_evals']} block evals)" if "block_evals" in r else ""), **r}
        for name, r in data["results"].items()
    ]
    gb = ".2f"
    text = f"Batch {data['batch']}, {data['input']}, fp32; GB = 1e9 bytes.\n\n" + table(
        rows,
        [
            ("name", "configuration", ""),
            ("params_M", "params", lambda v: f"{v:.1f} M"),
            ("weights_GB", "weights", gb),
            ("saved_activations_GB", "saved activations", gb),
            ("fwd_bwd_GB", "fwd+bwd peak", gb),
            ("peak_set_by", "peak set by", ""),
            ("adamw_states_GB", "AdamW states", gb),
            ("total_GB", "total", gb),
            ("total_vs_dit", "vs DiT", gb),
        ],
        "lrrrrlrrr",
    )
    if saving := data.get("activation_saving"):
        text += (
            "\n\nGradient checkpointing cuts DiT's saved activations from "
            f"{saving['dit_activations_GB']:.2f} to {saving['checkpointed_activations_GB']:.2f} GB; the "
            "fwd+bwd peak is about max(activations, parameter gradients) plus transients, so the saving "
            "shows in it from batch "
            f"{saving['batch_from_which_activations_set_the_peak']} on."
        )
    return {"fpdm_memory": text}


def fpdm_sampling(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/fpdm_sampling.json``: the budgeted sampler against a hand-written loop."""
    rows = [{**r, "schedule": f"{r['steps']} x {r['iterations_per_step']}"} for r in data["results"]]
    head = f"{data['model']}; median of {data['reps']} interleaved runs.\n\n"
    return {
        "fpdm_sampling": head
        + table(
            rows,
            [
                ("batch", "batch", "d"),
                ("guidance", "guidance", "g"),
                ("budget", "budget", "d"),
                ("schedule", "timesteps x iterations", ""),
                ("ratio", "sampler / hand loop", ".2f"),
                ("cpu_ratio", "CPU-time ratio", ".2f"),
                ("max_abs_diff", "largest difference", sci),
                ("syncs_per_timestep", "host reads per timestep", ".2f"),
            ],
            "rrrrrrrr",
        )
    }


def fpdm_compile(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/fpdm_compile.json``: compiled against eager training steps on the CPU."""
    rows = data["results"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    titles = {"eager": "eager", "blocks": "compiled blocks", "whole": "whole model compiled"}
    body = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        line: dict[str, Any] = {"preset": preset}
        for r in (r for r in rows if r["preset"] == preset):
            ratio = "" if r["mode"] == "eager" else f" ({r['cpu_vs_eager']:.2f}x eager)"
            line[r["mode"]] = f"{r['step_cpu_ms']:.0f} ms{ratio}"
            line["graphs"] = max(line.get("graphs", 0), r["graphs_after_warmup"])
        body.append(line)
    head = (
        f"A training step at batch {rows[0]['batch']} with AdamW and S-JFB; CPU time of the process, median "
        f"of {data['steps']} steps, the modes interleaved:\n\n"
    )
    columns: list[Column] = [("preset", "preset", ""), *[(m, titles.get(m, m), "") for m in modes]]
    columns.append(("graphs", "graphs after warm-up", "d"))
    return {"fpdm_compile": head + table(body, columns, "l" + "r" * (len(columns) - 1))}


def fpdm_data(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/fpdm_data.json``: training on a latents folder, and extracting one."""
    gib = ".2f"

    def largest(peaks: dict[str, float] | str | None) -> float | str | None:
        return max(peaks.values()) if isinstance(peaks, dict) else peaks  # or why it was not measured

    train = [
        {**r, "folder": largest(r["folder_peak_GiB"]), "pt": largest(r.get("pt_peak_GiB"))}
        for r in data.get("train", [])
    ]
    text = (
        "Training, `torchrun --nproc_per_node 2`, 3 steps: peak RSS of the largest process (GiB).\n\n"
        + table(
            train,
            [
                ("rows", "rows", ","),
                ("file_GiB", "latents file (GiB)", gib),
                ("folder", "latents folder, memory-mapped", gib),
                ("pt", "whole `.pt` file loaded", lambda v: v if isinstance(v, str) else f"{v:.2f}"),
            ],
            "rrrr",
        )
    )
    if extract := data.get("extract"):
        text += "\n\nExtraction with `--workers 0`: peak resident set of the process (GiB).\n\n" + table(
            extract, [("images", "images", ","), ("peak_GiB", "peak RSS (GiB)", ".3f")], "rr"
        )
    if throughput := data.get("throughput"):
        speeds: dict[int, list[float]] = {}
        for r in throughput:
            speeds.setdefault(r["workers"], []).append(r["images_per_second"])
        rows = [{"workers": w, "speeds": ", ".join(f"{v:.1f}" for v in s)} for w, s in speeds.items()]
        text += "\n\nImages per second of the encoding loop, runs alternated:\n\n" + table(
            rows, [("workers", "`--workers`", "d"), ("speeds", "images/s, each run", "")], "rr"
        )
    return {"fpdm_data": text}


def suite_time(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/suite_time.json``: the library's test suite at two revisions, side by side."""
    rows = [
        {**r, "tests": r["runs"][-1]["summary"], "args": r.get("args") or "none"} for r in data["results"]
    ]
    before = data["results"][0]
    for r in rows:
        r["ratio"] = r["wall_s"] / before["wall_s"]
    head = f"`pytest {data['suite']}`, median of {data['rounds']} alternated runs per revision:\n\n"
    columns: list[Column] = [
        ("name", "revision", ""),
        ("commit", "commit", ""),
        ("args", "added arguments", ""),
        ("wall_s", "wall-clock (s)", ".1f"),
        ("cpu_s", "CPU (s)", ".1f"),
        ("ratio", "wall vs before", ".2f"),
        ("tests", "pytest's summary", ""),
    ]
    return {"suite_time": head + table(rows, columns, "lllrrrl")}


def _tau(value: float | None) -> str:
    return "sequential" if value is None else short(value)


def _quality(columns: list[Column]) -> list[Column]:
    return [*columns, ("fd", "FD", ".2f"), ("kid", "KID", ".4f")]


def fpdm_parallel_tau(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/fpdm_parallel_tau.json``: the sweep of the tolerance scale, and its summary."""
    rows = data["rows"]
    full = table(
        rows,
        _quality(
            [
                ("model", "model", ""),
                ("rule", "rule", ""),
                ("tau", "tau", _tau),
                ("sweeps", "sweeps", "d"),
                ("block_evals", "block evals / sample", "d"),
                ("max_diff", "max diff", sci),
                ("rms_diff", "RMS diff", sci),
            ]
        ),
        "llrrrrrrr",
    )
    facts = parallel_facts(data)
    summary = []
    for model in facts["models"]:
        for rule in facts["rules"]:
            for tau in dict.fromkeys([facts["default_tau"], facts["same_quality_tau"][rule]]):
                row = facts["row"](model, rule, tau)
                summary.append(
                    {**row, "rule": RULE_NAMES.get(rule, rule), "per_step": row["evaluations_per_step"]}
                )
    summary_table = table(
        summary,
        [
            ("model", "model", ""),
            ("rule", "rule", ""),
            ("tau", "$\\tau$", short),
            ("sweeps", "sweeps", "d"),
            ("per_step", "evaluations per step", ".1f"),
            ("max_diff", "max diff", sci),
            ("rms_diff", "RMS diff", sci),
            ("fd", "FD", ".2f"),
        ],
        "llrrrrrr",
    )
    return {"fpdm_parallel_tau": full, "parallel_tau": summary_table, "parallel_published": published(facts)}


RULE_NAMES = {"Picard": "Picard (ParaDiGMS)"}


def parallel_facts(data: dict[str, Any]) -> dict[str, Any]:
    """What the pages read off the sweep of tau: the default scale, the scale that keeps FD, their rows.

    ``same_quality_tau[rule]`` is the largest scale whose FD is within ``fd_change`` of the sequential
    sampler's on every model (the rule ``--tau-sweep`` applies to choose the default, without the distance).
    """
    rows = data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    rules = list(dict.fromkeys(r["rule"] for r in rows if r["rule"]))
    sequential = {r["model"]: r for r in rows if r["tau"] is None}

    def row(model: str, rule: str, tau: float) -> dict[str, Any]:
        found = next(r for r in rows if r["model"] == model and r["rule"] == rule and r["tau"] == tau)
        # The chain's timestep evaluations over the sequential sampler's (one per timestep).
        return {**found, "evaluations_per_step": found["block_evals"] / sequential[model]["block_evals"]}

    def keeps_fd(rule: str, tau: float) -> bool:
        fds = [(row(model, rule, tau)["fd"], sequential[model]["fd"]) for model in models]
        return all(fd is not None and abs(fd - seq) <= data["fd_change"] for fd, seq in fds)

    chosen = data["chosen_tau"]
    default = chosen.get("ChainSecant", next(iter(chosen.values())))  # the sampler's default rule
    taus = sorted({r["tau"] for r in rows if r["tau"] is not None}, reverse=True)
    same_quality = {rule: next((t for t in taus if keeps_fd(rule, t)), default) for rule in rules}
    return {
        "models": models,
        "rules": rules,
        "sequential": sequential,
        "default_tau": default,
        "same_quality_tau": same_quality,
        "row": row,
    }


#: Published rows, as the papers report them (Stable Diffusion, their own tolerances and quality measures).
PUBLISHED = [
    ("ParaDiGMS (Picard, window, tolerance 0.1)", "SD-v2, DDIM", "200", "16", None),
    ("ParaDiGMS", "SD-v2, DDPM", "1000", "44", None),
    ("ParaTAA (triangular Anderson, m = 2-5)", "SD, DDIM", "100", "7", None),
    ("ParaSolver (Newton-type, DDIM-jump first guess)", "SD-v2, DDIM", "50", "13 (ParaDiGMS: 21)", None),
    ("ParaSolver", "SD-v2, DDIM", "25", "11 (ParaDiGMS: 18)", None),
    ("ParaSolver", "SD-v2, DDPM", "1000", "32", "1.06"),
]


def published(facts: dict[str, Any]) -> str:
    """Our rounds beside the published ones: same quality / within the default scale's distance."""
    body = [
        {
            "method": m,
            "model": s,
            "steps": n,
            "rounds": r,
            "per_step": e or "see the paper",
            "diff": "not reported",
        }
        | {"quality": "see the paper"}
        for m, s, n, r, e in PUBLISHED
    ]

    def span(values: list[float], fmt: str) -> str:
        render = (lambda v: short(v, fmt)) if "e" in fmt else (lambda v: format(v, fmt))
        low, high = render(min(values)), render(max(values))
        return low if low == high else f"{low}{' to ' if 'e' in fmt else '-'}{high}"

    for rule in facts["rules"]:
        cells: dict[str, list[str]] = {"rounds": [], "per_step": [], "diff": []}
        for tau in (facts["same_quality_tau"][rule], facts["default_tau"]):
            rows = [facts["row"](model, rule, tau) for model in facts["models"]]
            cells["rounds"].append(span([r["sweeps"] for r in rows], "d"))
            cells["per_step"].append(span([r["evaluations_per_step"] for r in rows], ".1f"))
            cells["diff"].append(span([r["max_diff"] for r in rows], ".0e"))
        steps = facts["sequential"][facts["models"][0]]["sweeps"]
        body.append(
            {
                "method": f"ours, {RULE_NAMES.get(rule, rule)}",
                "model": "FPDM/DiT-Digits, DDIM",
                "steps": steps,
            }
            | {key: " / ".join(values) for key, values in cells.items()}
            | {"quality": "FD as sequential"}
        )
    columns: list[Column] = [
        ("method", "method", ""),
        ("model", "model, sampler", ""),
        ("steps", "steps", ""),
        ("rounds", "rounds", ""),
        ("per_step", "evaluations per step", ""),
        ("diff", "distance to sequential (max)", ""),
        ("quality", "quality", ""),
    ]
    return table(body, columns, "llrrrll")


def fpdm_parallel(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/fpdm_parallel.json``: rules, windows and forms at the default scale."""
    columns: list[Column] = [
        ("model", "model", ""),
        ("method", "method", ""),
        ("form", "form", ""),
        ("window", "window", "d"),
        ("sweeps", "sweeps", "d"),
        ("block_evals", "block evals / sample", "d"),
        ("max_diff", "max diff", sci),
    ]
    return {"fpdm_parallel": table(data["rows"], _quality(columns), "llllrrrrr")}


def parallel_guess(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/parallel_guess.json``: first guesses and tolerances on the digits models, the
    held-out chain, the tolerance conversion, one process against two."""
    digits = table(
        data["rows"],
        [
            ("model", "model", ""),
            ("method", "method", ""),
            ("sweeps", "sequential rounds", "d"),
            ("block_evals", "block evals / sample", "d"),
            ("ratio", "x sequential", lambda v: f"{v:.2f}x"),
            ("max_diff", "max diff", sci),
            ("rms_diff", "RMS diff", sci),
            ("fd", "FD", ".2f"),
        ],
        "llrrrrrr",
    )
    picard = next((r["sweeps"] for r in data["held_out"] if r["rule"] == "Picard"), None)
    held = [
        {**r, "vs": picard / r["sweeps"] if picard and r.get("sweeps") else None} for r in data["held_out"]
    ]
    held_out = table(
        held,
        [
            ("rule", "rule", ""),
            ("form", "form", ""),
            ("tau", "$\\tau$", short),
            ("sweeps", f"rounds to within {short(data.get('max_diff', 1e-3))}", "d"),
            ("evaluations", "step evaluations", "d"),
            ("max_diff", "max diff", sci),
            ("vs", "Picard's rounds / these", lambda v: f"{v:.2f}x"),
        ],
        "llrrrrr",
    )
    processes = table(
        [{**r, "sweeps": " / ".join(map(str, r["sweeps"]))} for r in data["processes"]],
        [
            ("model", "model", ""),
            ("one_process_s", "1 process (s)", ".1f"),
            ("two_processes_s", "2 processes (s)", ".1f"),
            ("speedup", "speed-up", ".2f"),
            ("sweeps", "sweeps (1 / 2)", ""),
            ("max_diff_two_vs_one", "max diff, 2 vs 1", sci),
        ],
        "lrrrrr",
    )
    conv = data["tolerance_conversion"]
    tolerance = table(
        [
            {
                "what": f"our default $\\tau = {short(conv['tau'])}$, in ParaDiGMS's tolerance",
                "low": short(conv["paradigms_equivalent_min"], ".1e"),
                "median": short(conv["paradigms_equivalent_median"], ".1e"),
                "high": short(conv["paradigms_equivalent_max"], ".1e"),
            },
            {
                "what": "ParaDiGMS's default tolerance 0.1, as our $\\tau$",
                "low": short(conv["paradigms_default_0.1_as_tau_min"], ".1e"),
                "median": None,
                "high": short(conv["paradigms_default_0.1_as_tau_max"], ".1e"),
            },
        ],
        [("what", "", ""), ("low", "smallest", ""), ("median", "median", ""), ("high", "largest", "")],
        "lrrr",
    )
    return {
        "parallel_guess": digits,
        "parallel_held_out": held_out,
        "parallel_processes": processes,
        "parallel_tolerance": tolerance,
    }


def parallel_step_model(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/parallel_step_model.json``: models of the DDIM step, stopping tests, windows."""

    def stop(row: dict[str, Any]) -> str:
        options = row.get("options", {})
        if options.get("tol") is not None:
            return f"uniform {short(options['tol'])}"
        return f"$\\tau\\sigma_t$, $\\tau = {short(options.get('tau') or 1e-6)}$"

    within = short(data.get("max_diff", 1e-3))
    columns: list[Column] = [
        ("model", "model", ""),
        ("rule", "model of each step", ""),
        ("stop", "tolerance", ""),
        ("window", "window", ""),
        ("sweeps", "sweeps", "d"),
        ("evaluations", "x sequential evaluations", lambda v: f"{v:.2f}x"),
        ("max_diff", "max diff", sci),
        ("oracle_sweeps", f"first sweep within {within}", lambda v: "never" if v is None else f"{v}"),
    ]
    out = {}
    for section in ("rules", "stopping", "windows"):
        rows = [
            {**r, "stop": stop(r), "window": (r.get("options") or {}).get("window") or "all"}
            for r in data["rows"]
            if r["section"] == section
        ]
        out[f"parallel_step_{section}"] = table(rows, columns, "llllrrrr")
    return out


def parallel_error_stop(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/parallel_error_stop.json``: the sampler stopped on its estimated error."""

    def with_stop(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {**r, "stop": "residuals only" if r["error_tol"] is None else short(r["error_tol"])} for r in rows
        ]

    common: list[Column] = [
        ("stop", "`error_tol`", ""),
        ("sweeps", "sweeps", "d"),
        ("evaluations", "x sequential evaluations", lambda v: f"{v:.2f}x"),
        ("max_diff", "max diff to sequential", sci),
    ]
    named = [("model", "model", ""), ("rule", "`--chain-rule`", "")]
    digits = table(with_stop(data["rows"]), [*named, *common, ("error_estimate", "estimate", sci)], "lllrrrr")
    held_out = table(with_stop(data["held_out"]), [("rule", "rule", ""), *common], "llrrr")
    tol = short(data["grid_error_tol"])
    grid = table(
        data["grid"],
        [
            ("rule", "rule", ""),
            ("chains", "chains", "d"),
            ("sweeps", "sweeps, residuals only", "d"),
            ("sweeps_error_tol", f"sweeps, `error_tol={tol}`", "d"),
            ("stopped_early", "ended by the estimate", "d"),
            ("missed", f"further than {tol}", "d"),
            ("worst_ratio", "worst error / `error_tol`", ".2f"),
        ],
        "lrrrrrr",
    )
    return {
        "parallel_error_stop": digits,
        "parallel_error_stop_held_out": held_out,
        "parallel_error_stop_grid": grid,
    }


def fpdm_chain_analysis(data: dict[str, Any]) -> dict[str, str]:
    """``benchmarks/results/fpdm_chain_analysis.json``: what the DDIM chain does with a defect."""
    gains = data["perturbation"]
    uniform = data["uniform_tolerance"]["rows"]
    newton = data["newton"]
    out = {
        "fpdm_perturbation": (
            f"{data['model']}, {data['samples']} samples, {data['steps']} DDIM timesteps: a defect of RMS "
            f"{gains['size']:g} per entry added to the sequential trajectory's state entering timestep $k$ "
            "moves the sample by *gain* times the defect (2-norms over the batch):\n\n"
            + table(
                gains["summary"],
                [
                    ("timesteps", "timesteps k", ""),
                    ("min", "smallest gain", ".2f"),
                    ("max", "largest gain", ".2f"),
                ],
                "lrr",
            )
        ),
        "fpdm_uniform_tolerance": table(
            uniform,
            [
                ("rule", "rule", ""),
                ("tau", "$\\tau$", short),
                ("scaled_sweeps", "sweeps, $\\tau\\sigma_{t_k}$", "d"),
                ("uniform_sweeps", "sweeps, uniform $\\tau$", "d"),
                ("scaled_max_diff", "max diff, $\\tau\\sigma_{t_k}$", sci),
                ("uniform_max_diff", "max diff, uniform", sci),
            ],
            "lrrrrr",
        ),
        "fpdm_newton": table(
            newton["rows"],
            [
                ("tau", "$\\tau$", short),
                ("rule", "rule", ""),
                ("sweeps", "rounds", "d"),
                ("max_diff", "max diff", sci),
            ],
            "rlrr",
        ),
    }
    if "contraction" in data:
        c = data["contraction"]
        out["fpdm_contraction"] = table(
            c["rows"],
            [
                ("iteration", "Picard iteration", "d"),
                ("median", "median ratio", ".2f"),
                ("low", "10th percentile", ".2f"),
                ("high", "90th percentile", ".2f"),
            ],
            "rrrr",
        )
    return out


# ------------------------------------------------------------------------------------ the FPDM sweep


def fpdm_sweep(root: Path, out: Path | None) -> dict[str, str]:
    """The example's sweep writes its own Markdown table and plots; they are only placed on the page."""
    results = root / "examples" / "fpdm" / "results"
    sweep_md, sweep_png, grids_png = results / "sweep.md", results / "sweep.png", results / "grids.png"
    meta: dict[str, Any] = {}
    if (sweep_json := results / "sweep.json").exists():
        env = json.loads(sweep_json.read_text()).get("environment", {})
        meta = {
            "processor": env.get("machine"),
            "torch_threads": env.get("threads"),
            "torch": env.get("torch"),
        }
        meta["date"] = f"committed {committed(sweep_json)}"
    snippets = {}
    parts = []
    if sweep_md.exists():
        parts.append(f"*From `examples/fpdm/results/sweep.md` and `sweep.json`: {describe_sweep(meta)}.*\n")
        parts.append(sweep_md.read_text())
    if sweep_png.exists():
        if out is not None:
            shutil.copyfile(sweep_png, out / "sweep.png")
        parts.append(
            "```{image} /_generated/sweep.png\n:alt: quality against compute budget\n:width: 100%\n```\n"
        )
    snippets["fpdm_sweep"] = (
        "\n".join(parts)
        if parts
        else not_measured("`examples/fpdm/results/sweep.md`", "python examples/fpdm/sweep.py")
    )
    if grids_png.exists():
        if out is not None:
            shutil.copyfile(grids_png, out / "grids.png")
        snippets["fpdm_grids"] = (
            f"*From `examples/fpdm/results/grids.png`: {describe_sweep(meta)}.*\n\n"
            "```{image} /_generated/grids.png\n:alt: sample grids per method and budget\n:width: 100%\n```\n"
        )
    else:
        snippets["fpdm_grids"] = not_measured(
            "`examples/fpdm/results/grids.png`", "python examples/fpdm/sweep.py"
        )
    return snippets


def describe_sweep(meta: dict[str, Any]) -> str:
    if not meta:
        return "machine, torch and date not recorded"
    cpu = f"{meta['processor']} CPU ({meta['torch_threads']} torch threads)"
    return f"{cpu}, torch {meta['torch']}, {meta['date']}"


# ------------------------------------------------------------------------------------------ generate


@dataclass(frozen=True)
class Source:
    """A results file, the script that writes it and its renderer."""

    file: str
    command: str
    render: Callable[[dict[str, Any]], dict[str, str]]
    snippets: tuple[str, ...]


SOURCES = [
    Source("solvers.json", "python -m benchmarks.solvers", solvers,
           ("solvers_solves", "solvers_memory", "solvers_overhead")),
    Source("gradients.json", "python -m benchmarks.gradients", gradients,
           ("gradients_estimators", "gradients_ift")),
    Source("launches.json", "python -m benchmarks.launches", launches, ("launches",)),
    Source("pytree.json", "python -m benchmarks.pytree", pytree, ("pytree",)),
    Source("chain.json", "python -m benchmarks.chain", chain, ("chain_rows", "chain_grid")),
    Source("gpu.json", "python -m benchmarks.gpu", gpu, ("gpu_solvers", "gpu_fpdm", "gpu_chain")),
    Source("fpdm_memory.json", "python -m benchmarks.fpdm_memory --batch 2", fpdm_memory, ("fpdm_memory",)),
    Source("fpdm_memory_batch1.json", "python -m benchmarks.fpdm_memory --batch 1 --only DiT-XL/2 --out "
           "benchmarks/results/fpdm_memory_batch1.json",
           lambda data: {"fpdm_memory_batch1": fpdm_memory(data)["fpdm_memory"]}, ("fpdm_memory_batch1",)),
    Source("fpdm_sampling.json", "python -m benchmarks.fpdm_sampling", fpdm_sampling, ("fpdm_sampling",)),
    Source("fpdm_compile.json", "python -m benchmarks.fpdm_compile --whole", fpdm_compile, ("fpdm_compile",)),
    Source("fpdm_parallel_tau.json", "python -m benchmarks.fpdm_parallel --tau-sweep", fpdm_parallel_tau,
           ("fpdm_parallel_tau", "parallel_tau", "parallel_published")),
    Source("fpdm_parallel.json", "python -m benchmarks.fpdm_parallel", fpdm_parallel, ("fpdm_parallel",)),
    Source("suite_time.json", "python -m benchmarks.suite_time", suite_time, ("suite_time",)),
    Source("fpdm_data.json", "python -m benchmarks.fpdm_data --baseline-ref main", fpdm_data, ("fpdm_data",)),
    Source("parallel_guess.json", "python -m benchmarks.parallel_guess", parallel_guess,
           ("parallel_guess", "parallel_held_out", "parallel_processes", "parallel_tolerance")),
    Source("parallel_step_model.json", "python -m benchmarks.parallel_step_model", parallel_step_model,
           ("parallel_step_rules", "parallel_step_stopping", "parallel_step_windows")),
    Source("parallel_error_stop.json", "python -m benchmarks.parallel_error_stop", parallel_error_stop,
           ("parallel_error_stop", "parallel_error_stop_held_out", "parallel_error_stop_grid")),
    Source("fpdm_chain_analysis.json", "python -m benchmarks.fpdm_parallel --analysis", fpdm_chain_analysis,
           ("fpdm_perturbation", "fpdm_uniform_tolerance", "fpdm_newton", "fpdm_contraction")),
]  # fmt: skip
RENDERERS = {source.file: source.render for source in SOURCES}


def render(file: str, data: dict[str, Any]) -> str:
    """Every table of one results file, as a script prints it when it finishes."""
    snippets = RENDERERS[file](data)
    return "\n\n".join(f"## {name}\n\n{text}" for name, text in snippets.items()) + "\n"


def generate(root: Path = ROOT, out: Path | None = None) -> dict[str, str]:
    """Every snippet, ``{name: markdown}``, each headed by its file, machine, torch and date.

    ``out`` receives the plots the FPDM sweep snippets show (the docs' ``_generated`` folder).
    """
    snippets: dict[str, str] = {}
    for source in SOURCES:
        path = root / "benchmarks" / "results" / source.file
        if not path.exists():
            missing = not_measured(f"`benchmarks/results/{source.file}`", source.command)
            snippets.update(dict.fromkeys(source.snippets, missing))
            continue
        data = json.loads(path.read_text())
        for name, text in source.render(data).items():
            meta = gpu_meta(data, name) if source.file == "gpu.json" else data.get("meta", {})
            note = "" if text.startswith(":::{admonition}") else provenance(path, meta) + "\n"
            snippets[name] = note + text.rstrip("\n") + "\n"
    snippets.update(fpdm_sweep(root, out))
    return snippets


def write(out: Path, root: Path = ROOT) -> list[Path]:
    """Write every snippet to ``out/<name>.md`` where it changed; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate(root, out).items():
        path = out / f"{name}.md"
        # Rewrite only on change, so an unchanged table does not force the pages that include it to rebuild.
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, default=None, metavar="DIR", help="write DIR/<snippet>.md")
    args = parser.parse_args(argv)
    if args.write is not None:
        for path in write(args.write):
            print(f"wrote {path}")
        return 0
    for name, text in generate().items():
        print(f"## {name}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
