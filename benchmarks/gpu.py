"""Everything we measure on a GPU, in one script that runs in a few minutes on one card.

Run::

    python benchmarks/gpu.py                      # on a CUDA machine: writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --sections solvers   # one section; the others in the file are kept
    python benchmarks/gpu.py --quick --device cpu --out /tmp/gpu.json   # small shapes, for the tests

Sections (each writes its own key of the JSON file, so a partial run updates only what it measured):

* ``solvers``: the driver's rows (``benchmarks/driver_rows.py``): host syncs per evaluation, wall time
  against a plain loop of the same evaluations and against torchdeq, fixed budget and tolerance mode, on a
  conv DEQ (64 x 64 x 32 x 32, 100 evaluations) and a sequence DEQ (32 x 256 x 1152, 12 evaluations).
* ``fpdm``: FPDM-XL/2 and DiT-XL/2 training steps (eager and compiled, DiT with checkpointing): step
  time, peak memory, compile time, model FLOP utilisation; the sampler against a hand-written loop of the
  same block evaluations (``benchmarks/fpdm_gpu.py``; absent until that file exists).
* ``chain``: sequential against parallel-in-time DDIM (``benchmarks/chain_gpu.py``, rows of
  ``benchmarks/fpdm_parallel.py``'s ``parallel_gpu_rows``): FPDM-XL/2 and DiT-XL/2 with random weights,
  100 timesteps, batch 1, 4 and 16, every timestep in flight with ``max_batch="auto"``; sweeps,
  evaluations, seconds of both samplers, speed-up, largest difference between the samples.

``--quick`` shrinks every shape so the whole script runs on a CPU in seconds: the test suite runs it that
way so that it cannot rot. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from driver_rows import conv_problem, driver_rows, sequence_problem, table  # noqa: E402

RESULTS = HERE / "results" / "gpu.json"


def machine(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return info


def solvers_section(device: str, quick: bool) -> dict[str, Any]:
    """The driver's rows on the GPU problems of issue #12."""
    if quick:
        problems = [conv_problem(2, 4, 8, 6, device), sequence_problem(2, 4, 16, 4, device)]
        reps = 1
    else:
        problems = [conv_problem(64, 64, 32, 100, device), sequence_problem(32, 256, 1152, 12, device)]
        reps = 20
    rows: list[dict[str, Any]] = []
    for problem in problems:
        rows += driver_rows(problem, reps)
    print("\n## Solvers: host syncs and wall time against a plain loop and torchdeq\n")
    print(table(rows))
    compiled = compile_rows(device, quick)
    print("\n## torch.compile of a DEQLayer (fixed shapes)\n")
    print(table(compiled, COMPILE_COLUMNS))
    return {"rows": rows, "reps": reps, "compile": compiled}


COMPILE_COLUMNS = [
    ("solver", "solver", ""),
    ("tol", "tol", ""),
    ("first_call_s", "first call s", ".1f"),
    ("graphs", "graphs", "d"),
    ("new_graphs_after_second_call", "new graphs after call 2", "d"),
    ("eager_ms", "eager ms", ".3f"),
    ("compiled_ms", "compiled ms", ".3f"),
    ("compiled_vs_eager", "compiled / eager", ".2f"),
]


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
            _sync(device)
            first = time.perf_counter() - start
            compiled(x)
            after_second = len(graphs)
            times = {}
            for key, fn in (("eager", deq), ("compiled", compiled)):
                fn(x)
                _sync(device)
                start = time.perf_counter()
                for _ in range(reps):
                    fn(x)
                _sync(device)
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _optional_section(module: str, function: str) -> Callable[[str, bool], dict[str, Any]] | None:
    try:
        return getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as err:
        print(f"section {module}: {err}", file=sys.stderr)
        return None


# In the order they run: the riskiest (longest compiles) last, so a run cut short keeps the rest.
SECTIONS: dict[str, Callable[[], Callable[[str, bool], dict[str, Any]] | None]] = {
    "solvers": lambda: solvers_section,
    "chain": lambda: _optional_section("chain_gpu", "chain_section"),
    "fpdm": lambda: _optional_section("fpdm_gpu", "fpdm_section"),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes (a smoke test; numbers mean nothing)"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.sections.split(",") if name.strip()]
    wanted = [name for name in SECTIONS if name in wanted] + [name for name in wanted if name not in SECTIONS]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    payload: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in wanted:
        section = SECTIONS[name]()
        if section is None:
            print(f"section {name}: not available in this checkout, skipped", file=sys.stderr)
            continue
        start = time.perf_counter()
        result = section(args.device, args.quick)
        result["seconds"] = time.perf_counter() - start
        result["machine"] = machine(args.device)
        result["quick"] = args.quick
        payload[name] = result
        # Written after every section: a run cut short keeps what it measured.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(args.out)
        print(f"section {name}: {result['seconds']:.1f} s, wrote {args.out}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
