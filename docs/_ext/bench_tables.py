"""Render the measured results into Markdown snippets that the pages ``{include}``.

At the start of every build this reads

* ``benchmarks/results/solvers.json``   (written by ``benchmarks/solvers.py``),
* ``benchmarks/results/gradients.json`` (written by ``benchmarks/gradients.py``),
* ``examples/fpdm/results/sweep.md``, ``sweep.png`` and ``grids.png`` (written by the FPDM sweep),

and writes ``docs/_generated/*.md`` (and copies the plot there). A file that does not exist gives
a clearly marked "no results file" box instead of a table, never made-up numbers, so the docs build
before and after the benchmarks are run. Re-running a benchmark and rebuilding the docs updates every
table; each table names the JSON it came from, the date of that file and the machine it records.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

Column = tuple[str, str, Callable[[Any], str]]
MISSING = "\u2013"  # an en dash in a cell whose value the file does not have


def _num(fmt: str) -> Callable[[Any], str]:
    def render(value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return MISSING if value is None else str(value)
        return format(value, fmt)

    return render


def _yes_no(value: Any) -> str:
    if value is None:
        return MISSING
    return "yes" if value else "**no**"


def _text(value: Any) -> str:
    return MISSING if value is None else str(value).replace("|", "\\|")


def table(rows: Iterable[dict[str, Any]], columns: list[Column]) -> str:
    """A Markdown pipe table; a key missing from a row renders as an en dash."""
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join(render(row.get(key)) for key, _, render in columns) + " |"
        )
    return "\n".join(lines)


def pivot(
    rows: list[dict[str, Any]],
    row_key: str,
    col_key: str,
    cell: Callable[[dict[str, Any]], str],
) -> str:
    """A table with one row per ``row_key`` and one column per ``col_key``, in first-seen order."""
    row_names = list(dict.fromkeys(str(row.get(row_key)) for row in rows))
    col_names = list(dict.fromkeys(str(row.get(col_key)) for row in rows))
    cells = {(str(row.get(row_key)), str(row.get(col_key))): cell(row) for row in rows}
    lines = [
        "| " + " | ".join([_text(row_key), *map(_text, col_names)]) + " |",
        "|" + "|".join("---" for _ in range(len(col_names) + 1)) + "|",
    ]
    for name in row_names:
        values = [cells.get((name, col), MISSING) for col in col_names]
        lines.append("| " + " | ".join([_text(name), *values]) + " |")
    return "\n".join(lines)


def file_date(path: Path, root: Path) -> str:
    """The date of the last commit that touched ``path``, else its modification date."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(path.relative_to(root))],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out:
        return f"committed {out}"
    return f"modified {dt.date.fromtimestamp(path.stat().st_mtime).isoformat()}, not committed"


def not_measured(what: str, command: str) -> str:
    return (
        ":::{admonition} No results file\n:class: warning\n\n"
        f"{what} is not in this checkout, so there is no table here. Run `{command}` and "
        "rebuild the docs; the table is generated from the file at build time.\n:::\n"
    )


def provenance(path: Path, root: Path, machine: str) -> str:
    rel = path.relative_to(root).as_posix()
    return f"*Measured figures from `{rel}` ({file_date(path, root)}); machine: {machine}.*\n"


def solvers_machine(data: dict[str, Any]) -> str:
    m = data.get("machine") or {}
    if not m:
        return "not recorded in the file"
    processor = (
        m.get("processor") or f"processor not recorded; {m.get('platform', '?')}"
    )
    parts = [
        f"{m.get('cpus', '?')} CPUs ({processor})",
        f"{m.get('torch_threads', '?')} torch threads",
        f"torch {m.get('torch', '?')}",
        f"Python {m.get('python', '?')}",
    ]
    load = m.get("load_average")
    if isinstance(load, list) and load:
        parts.append(f"load average {load[0]:.2f} when the run ended")
    return ", ".join(parts)


def render_solvers(data: dict[str, Any]) -> dict[str, str]:
    s = data.get("settings", {})
    head = (
        f"Every solver solves `tanh(W z + x)` to an absolute tolerance of {s.get('tol', '?')} with "
        f"`max_iter={s.get('max_iter', '?')}`, batch {s.get('batch', '?')}, dimension {s.get('dim', '?')}; "
        f"wall time is the median of {s.get('reps', '?')} runs.\n\n"
    )
    solves_rows = data.get("solves", [])

    def nfe(row: dict[str, Any]) -> str:
        count = _num("d")(row.get("nfe"))
        return count if row.get("reached_tol", True) else f"{count} (not reached)"

    solves = (
        head
        + "**Evaluations of f** until every sample reached the tolerance (fewer is better):\n\n"
        + pivot(solves_rows, "solver", "problem", nfe)
        + "\n\n**Wall-clock ms** of the whole solve:\n\n"
        + pivot(
            solves_rows,
            "solver",
            "problem",
            lambda row: _num(".1f")(row.get("wall_ms")),
        )
        + "\n\n**Peak memory, MiB**, added by the solve:\n\n"
        + pivot(
            solves_rows,
            "solver",
            "problem",
            lambda row: _num(".2f")(row.get("peak_mib")),
        )
    )
    memory = (
        "Peak memory of one solve on the hard problem with a tolerance that is never reached, so every "
        "solver runs to `max_iter`.\n\n"
        + table(
            data.get("memory_vs_max_iter", []),
            [
                ("solver", "solver", _text),
                ("max_iter", "max_iter", _num("d")),
                ("peak_mib", "peak MiB", _num(".2f")),
            ],
        )
    )
    overhead = (
        "The driver's cost, measured side by side in one run: each solve makes a fixed number of "
        "evaluations of f (a 3x3 convolution with tanh), in a fixed budget (`tol=None`, no host reads) "
        "and in tolerance mode with a tolerance never reached (one host read every `check_every` "
        "evaluations). `/ plain` is the wall time over a plain loop `z = f(z)` of the same evaluations, "
        "the limit no solver can beat; `/ torchdeq` over torchdeq's solver of the same kind run for the "
        "same iterations. Host syncs are counted per evaluation.\n\n"
        + driver_table(data.get("driver", []))
    )
    return {
        "solvers_solves": solves,
        "solvers_memory": memory,
        "solvers_overhead": overhead,
    }


def driver_table(rows: list[dict[str, Any]]) -> str:
    """The driver rows of ``benchmarks/driver_rows.py``."""
    return table(
        rows,
        [
            ("problem", "problem", _text),
            ("solver", "solver", _text),
            ("mode", "mode", _text),
            ("nfe", "evaluations", _num("d")),
            ("syncs_per_iter", "host syncs / evaluation", _num(".2f")),
            ("vs_plain", "wall / plain loop", _num(".2f")),
            ("torchdeq_syncs_per_iter", "torchdeq syncs / evaluation", _num(".2f")),
            ("vs_torchdeq", "wall / torchdeq", _num(".2f")),
        ],
    )


def gpu_machine(section: dict[str, Any]) -> str:
    m = section.get("machine") or {}
    return f"{m.get('gpu', m.get('device', '?'))}, torch {m.get('torch', '?')}, CUDA {m.get('cuda', '?')}"


def render_gpu(root: Path) -> dict[str, str]:
    """Tables of ``benchmarks/results/gpu.json`` (written by ``benchmarks/gpu.py`` on a GPU machine)."""
    path = root / "benchmarks" / "results" / "gpu.json"
    names = ("gpu_solvers", "gpu_fpdm", "gpu_chain")
    if not path.exists():
        return dict.fromkeys(
            names,
            not_measured("`benchmarks/results/gpu.json`", "python benchmarks/gpu.py"),
        )
    data = json.loads(path.read_text())
    out = {}
    solvers = data.get("solvers")
    if solvers:
        compiled = table(
            solvers.get("compile", []),
            [
                ("solver", "solver", _text),
                ("tol", "tol", _text),
                ("first_call_s", "first call s", _num(".1f")),
                ("graphs", "graphs", _num("d")),
                ("new_graphs_after_second_call", "new graphs after call 2", _num("d")),
                ("compiled_vs_eager", "compiled / eager", _num(".2f")),
            ],
        )
        out["gpu_solvers"] = (
            provenance(path, root, gpu_machine(solvers))
            + "\n"
            + driver_table(solvers.get("rows", []))
            + "\n\n`torch.compile` of a `DEQLayer` (f a 4x4 tanh layer, 30 evaluations):\n\n"
            + compiled
            + "\n"
        )
    fpdm = data.get("fpdm")
    if fpdm:
        training = table(
            fpdm.get("training", []),
            [
                ("config", "configuration", _text),
                ("batch", "batch", _num("d")),
                ("step_ms", "step ms", _num(".1f")),
                ("peak_GB", "peak GB", _num(".1f")),
                ("first_step_s", "first step s", _num(".1f")),
                ("graphs_after_warmup", "graphs after warm-up", _num("d")),
                ("mfu", "model FLOP utilisation", _num(".2f")),
            ],
        )
        sampler = table(
            fpdm.get("sampler", []),
            [
                ("batch", "batch", _num("d")),
                ("dtype", "dtype", _text),
                ("sampler_vs_hand", "sampler / hand loop", _num(".3f")),
                ("syncs_per_timestep", "host syncs per timestep", _num(".1f")),
            ],
        )
        out["gpu_fpdm"] = (
            provenance(path, root, gpu_machine(fpdm))
            + "\nTraining step, bf16 autocast, fused AdamW:\n\n"
            + training
            + "\n\nSampling, 10 DDIM timesteps with 2 Picard iterations each:\n\n"
            + sampler
            + "\n"
        )
    chain = data.get("chain")
    if chain:
        rows = chain.get("rows", [])
        columns = [
            (key, key.replace("_", " "), _num(".3g"))
            for key in (rows[0] if rows else {})
        ]
        out["gpu_chain"] = (
            provenance(path, root, gpu_machine(chain))
            + "\n"
            + table(rows, columns)
            + "\n"
        )
    for name in names:
        out.setdefault(
            name,
            not_measured(
                "this section of `benchmarks/results/gpu.json`",
                "python benchmarks/gpu.py",
            ),
        )
    return out


def render_gradients(data: dict[str, Any]) -> dict[str, str]:
    p = data.get("problem", {})
    rho = p.get("spectral_radius_of_J_sample0")
    head = (
        f"Problem: `f(z, x) = {p.get('f', 'tanh(W z + x)')}`, d = {p.get('d', '?')}, "
        f"batch {p.get('batch', '?')}, "
        f"{p.get('dtype', '?')}, spectral norm of W {p.get('W_spectral_norm', '?')}"
        + (
            f", spectral radius of the Jacobian at z* {rho:.3f}"
            if isinstance(rho, (int, float))
            else ""
        )
        + ". One training step (forward + backward of `sum(z**2)`) with the forward solve run to a fixed "
        "number of iterations (`fwd cap`). *saved MiB* is what autograd keeps for the backward; *peak MiB* "
        "the peak of live memory over the step, solver history included; *x* columns are relative to the "
        "same estimator at the smaller cap.\n\n"
    )
    estimators = head + table(
        data.get("estimators", []),
        [
            ("estimator", "estimator", _text),
            ("forward_cap", "fwd cap", _num("d")),
            ("saved_mib", "saved MiB", _num(".3f")),
            ("saved_ratio", "saved x", _num(".2f")),
            ("peak_mib", "peak MiB", _num(".2f")),
            ("peak_ratio", "peak x", _num(".2f")),
            ("fwd_bwd_ms", "fwd+bwd ms", _num(".1f")),
            ("backward_nfe", "backward nfe", _num("d")),
        ],
    )
    ift = (
        f"Exact (IFT) backward to an absolute tolerance of {p.get('b_tol', '?')} (cap "
        f"{p.get('b_max_iter', '?')}), ours against torchdeq's, both from the same z*"
        + (
            f" (residual {ref:.0e})"
            if isinstance(ref := p.get("z_ref_residual"), (int, float))
            else ""
        )
        + "; *rel err* is the relative error of dL/dW against a dense float64 solve of the adjoint "
        "equation at that z*. Times are the median of the backward call alone.\n\n"
        + table(
            data.get("ift_vs_torchdeq", []),
            [
                ("library", "library", _text),
                ("backward_solver", "backward solver", _text),
                ("backward_ms", "backward ms", _num(".1f")),
                ("backward_nfe", "backward nfe", _num("d")),
                ("backward_residual", "residual", _num(".1e")),
                ("converged", "converged", _yes_no),
                ("grad_rel_err", "dL/dW rel err", _num(".1e")),
            ],
        )
    )
    return {"gradients_estimators": estimators, "gradients_ift": ift}


def gradients_machine(data: dict[str, Any]) -> str:
    m = data.get("machine")
    if isinstance(m, dict) and m:
        return solvers_machine(data)
    threads = data.get("threads")
    return (
        f"{threads} torch threads (CPU)"
        if threads is not None
        else "not recorded in the file"
    )


def generate(root: Path, out: Path) -> dict[str, str]:
    """Build every snippet; returns ``{name: markdown}`` (the plot, if any, is copied into ``out``)."""
    snippets: dict[str, str] = {}

    solvers = root / "benchmarks" / "results" / "solvers.json"
    if solvers.exists():
        data = json.loads(solvers.read_text())
        note = provenance(solvers, root, solvers_machine(data))
        snippets.update(
            {k: note + "\n" + v + "\n" for k, v in render_solvers(data).items()}
        )
    else:
        missing = not_measured(
            "`benchmarks/results/solvers.json`", "python benchmarks/solvers.py"
        )
        snippets.update(
            dict.fromkeys(
                ("solvers_solves", "solvers_memory", "solvers_overhead"), missing
            )
        )

    gradients = root / "benchmarks" / "results" / "gradients.json"
    if gradients.exists():
        data = json.loads(gradients.read_text())
        note = provenance(gradients, root, gradients_machine(data))
        snippets.update(
            {k: note + "\n" + v + "\n" for k, v in render_gradients(data).items()}
        )
    else:
        missing = not_measured(
            "`benchmarks/results/gradients.json`", "python benchmarks/gradients.py"
        )
        snippets.update(
            dict.fromkeys(("gradients_estimators", "gradients_ift"), missing)
        )

    snippets.update(render_gpu(root))

    # The FPDM sweep writes its own Markdown table and plot; we only place them on the page.
    results = root / "examples" / "fpdm" / "results"
    sweep_md, sweep_png = results / "sweep.md", results / "sweep.png"
    parts = []
    if sweep_md.exists():
        parts.append(
            provenance(sweep_md, root, "see the table") + "\n" + sweep_md.read_text()
        )
    if sweep_png.exists():
        shutil.copyfile(sweep_png, out / "sweep.png")
        parts.append(
            "```{image} /_generated/sweep.png\n:alt: quality against compute budget\n:width: 100%\n```\n"
        )
    if parts:
        snippets["fpdm_sweep"] = "\n".join(parts)
    else:
        snippets["fpdm_sweep"] = (
            ":::{admonition} No sweep results\n:class: warning\n\n"
            "This checkout has no sweep results: `examples/fpdm/results/sweep.md` (the table) and "
            "`examples/fpdm/results/sweep.png` (the plot) do not exist. They are written by the sweep and "
            "placed here at build time. No numbers are shown until they are measured.\n:::\n"
        )
    grids_png = results / "grids.png"
    if grids_png.exists():
        shutil.copyfile(grids_png, out / "grids.png")
        snippets["fpdm_grids"] = (
            provenance(grids_png, root, "see the sweep's table")
            + "\n```{image} /_generated/grids.png\n:alt: sample grids per method and budget\n"
            + ":width: 100%\n```\n"
        )
    else:
        snippets["fpdm_grids"] = (
            ":::{admonition} Sample grids go here\n:class: warning\n\n"
            "This checkout has no sample grid: `examples/fpdm/results/grids.png` is "
            "written by the sweep and placed here at build time. Nothing on this page is an illustration of "
            "results that were not measured.\n:::\n"
        )
    return snippets


def write_snippets(app: Sphinx) -> None:
    root = Path(app.srcdir).parent
    out = Path(app.srcdir) / "_generated"
    out.mkdir(exist_ok=True)
    for name, text in generate(root, out).items():
        path = out / f"{name}.md"
        # Rewrite only on change, so an unchanged table does not force the pages that include it to rebuild.
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            logger.info("bench_tables: wrote %s", path.relative_to(app.srcdir))


def _import(dotted: str) -> Any:
    """The object a dotted name refers to (module prefix imported, the rest by getattr), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def resolve_alias(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a reference to ``implicitdiff.solvers.Anderson`` to the documented ``implicitdiff.Anderson``.

    Every public object is documented once, under the name users import; docstrings and pages may refer
    to it by any other public path, and this resolves such a reference to the documented entry.
    """
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("implicitdiff."):
        return None
    obj = _import(target)
    if obj is None or not callable(obj):
        return None
    domain = env.get_domain("py")
    for name in domain.objects:
        if name != target and name.startswith("implicitdiff.") and _import(name) is obj:
            fromdoc, reftype = node["refdoc"], node["reftype"]
            return domain.resolve_xref(
                env, fromdoc, app.builder, reftype, name, node, contnode
            )
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", write_snippets)
    app.connect("missing-reference", resolve_alias)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
