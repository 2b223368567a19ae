"""Everything we measure on a GPU, in one script that runs in a few minutes on one card.

Run::

    python -m benchmarks.gpu                      # on a CUDA machine: writes benchmarks/results/gpu.json
    python -m benchmarks.gpu --sections solvers   # one section; the others in the file are kept
    python -m benchmarks.gpu --quick --device cpu --out /tmp/gpu.json   # small shapes, for the tests

Sections (each writes its own key of the JSON file, with its own ``meta``, so a partial run updates only
what it measured):

* ``solvers``: the driver's rows (:mod:`benchmarks.driver_rows`): host syncs per evaluation, wall time
  against a plain loop of the same evaluations and against torchdeq, fixed budget and tolerance mode, on a
  conv DEQ (64 x 64 x 32 x 32, 100 evaluations) and a sequence DEQ (32 x 256 x 1152, 12 evaluations).
* ``fpdm``: FPDM-XL/2 and DiT-XL/2 training steps (eager and compiled, DiT with checkpointing): step
  time, peak memory, compile time, model FLOP utilisation; the sampler against a hand-written loop of the
  same block evaluations (:mod:`benchmarks.fpdm_gpu`).
* ``chain``: sequential against parallel-in-time DDIM (:func:`benchmarks.fpdm_chains.parallel_gpu_rows`):
  FPDM-XL/2 and DiT-XL/2 with random weights, 100 timesteps, batch 1, 4 and 16, every timestep in flight
  with ``max_batch="auto"``; sweeps, evaluations, seconds of both samplers, speed-up, largest difference
  between the samples.

``--quick`` shrinks every shape so the whole script runs on a CPU in seconds: the test suite runs it that
way so that it cannot rot. Its numbers mean nothing.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import harness, tables
from benchmarks.driver_rows import conv_problem, driver_rows, sequence_problem


def solvers_section(device: str, quick: bool) -> dict[str, Any]:
    """The driver's rows on a conv DEQ and a sequence DEQ, and ``torch.compile`` of a layer."""
    if quick:
        problems = [conv_problem(2, 4, 8, 6, device), sequence_problem(2, 4, 16, 4, device)]
        reps = 1
    else:
        problems = [conv_problem(64, 64, 32, 100, device), sequence_problem(32, 256, 1152, 12, device)]
        reps = 20
    rows: list[dict[str, Any]] = []
    for problem in problems:
        rows += driver_rows(problem, reps)
    return {"rows": rows, "reps": reps, "compile": compile_rows(device, quick)}


def compile_rows(device: str, quick: bool) -> list[dict[str, Any]]:
    """First-call time, graph count and warm time of ``torch.compile(DEQLayer)`` against eager.

    The issue's case: ``f(z, x) = tanh(0.5 lin(z) + x)`` on a 4 x 4 state, 30 evaluations. Quick mode
    compiles with the ``eager`` backend (no code generation) to stay fast on a CPU.
    """
    import torch._dynamo

    from implicitdiff import DEQLayer
    from implicitdiff.solvers import Anderson, Picard

    rows = []
    reps = 3 if quick else 50
    cases = [
        ("Picard", Picard, None),
        ("Picard", Picard, 1e-4),
        ("Anderson(m=6)", lambda: Anderson(m=6), None),
    ]
    for name, make, tol in cases:
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 4).to(device)
        deq = DEQLayer(
            lambda z, x, lin=lin: torch.tanh(0.5 * lin(z) + x), solver=make(), max_iter=30, tol=tol
        )
        x = torch.randn(4, 4, device=device)
        graphs: list[int] = []

        def counting(gm: Any, example_inputs: Any, graphs: list[int] = graphs) -> Any:
            graphs.append(1)
            if quick:
                return gm.forward
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)

        torch._dynamo.reset()
        compiled = torch.compile(deq, backend=counting)
        with torch.no_grad():
            start = time.perf_counter()
            compiled(x)
            harness.sync(device)
            first = time.perf_counter() - start
            compiled(x)
            after_second = len(graphs)
            times = {}
            for key, fn in (("eager", deq), ("compiled", compiled)):
                fn(x)
                harness.sync(device)
                start = time.perf_counter()
                for _ in range(reps):
                    fn(x)
                harness.sync(device)
                times[key] = (time.perf_counter() - start) / reps
        rows.append(
            {
                "solver": name,
                "tol": "None" if tol is None else f"{tol:g}",
                "first_call_s": first,
                "graphs": after_second,
                "new_graphs_after_second_call": len(graphs) - after_second,
                "eager_ms": 1e3 * times["eager"],
                "compiled_ms": 1e3 * times["compiled"],
                "compiled_vs_eager": times["compiled"] / times["eager"],
            }
        )
    return rows


def chain_section(device: str, quick: bool) -> dict[str, Any]:
    """Sequential against parallel DDIM on FPDM-XL/2 and DiT-XL/2 (:mod:`benchmarks.fpdm_chains`)."""
    from benchmarks.fpdm_chains import parallel_gpu_rows

    return {"rows": parallel_gpu_rows(device, quick)}


def fpdm_section(device: str, quick: bool) -> dict[str, Any]:
    """Training steps and the sampler of FPDM-XL/2 and DiT-XL/2 (:mod:`benchmarks.fpdm_gpu`)."""
    from benchmarks.fpdm_gpu import fpdm_section

    return fpdm_section(device, quick)


# In the order they run: the riskiest (longest compiles) last, so a run cut short keeps the rest.
SECTIONS: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "solvers": solvers_section,
    "chain": chain_section,
    "fpdm": fpdm_section,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "gpu.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}"
    )
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    out = harness.out_path(args)
    payload: dict[str, Any] = json.loads(out.read_text()) if out is not None and out.exists() else {}
    payload.pop("meta", None)  # written again with this run's
    for name in (name for name in SECTIONS if name in wanted):
        started = time.perf_counter()
        result = SECTIONS[name](args.device, args.quick)
        result["seconds"] = time.perf_counter() - started
        result["meta"] = harness.metadata(args.device)
        result["quick"] = args.quick
        payload[name] = result
        # Written after every section: a run cut short keeps what it measured.
        if out is not None:
            harness.write_results(out, payload, device=args.device, quick=args.quick)
        print(f"section {name}: {result['seconds']:.1f} s", file=sys.stderr)
    print(tables.render("gpu.json", payload))
    return payload


if __name__ == "__main__":
    main()
