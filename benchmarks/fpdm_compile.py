"""Compiled against eager training steps of the small presets on the CPU (``models.compile_blocks``).

Run::

    python -m benchmarks.fpdm_compile            # writes benchmarks/results/fpdm_compile.json
    python -m benchmarks.fpdm_compile --whole    # also torch.compile of the whole model
    python -m benchmarks.fpdm_compile --quick    # batch 8, 2 timed steps, the eager backend

Per preset (FPDM-Digits/2 with S-JFB's random draws, DiT-Digits/2), one training step (loss, backward,
AdamW) in three ways: ``eager``; ``blocks``, :func:`models.compile_blocks` with the inductor backend (the
solver loop and S-JFB's draws stay eager); and, with ``--whole``, ``torch.compile`` of the whole model.
Reported: the median step time after warm-up, the modes' steps interleaved one by one (wall-clock and the
process's CPU time; the machine is shared, so the CPU time and the ratio of medians measured side by side
are the figures to quote), the warm-up steps' time (compilation), and the graphs compiled during warm-up
and after it (dynamo's ``unique_graphs``: a graph after warm-up is a recompilation).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.models import compile_blocks, create_model

from benchmarks import harness
from implicitdiff import SJFB

WARMUP = 4


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _stepper(preset: str, mode: str, batch: int, backend: str) -> Any:
    """A training step of a fresh model (same weights, data and S-JFB draws for every mode)."""
    torch.manual_seed(0)
    overrides: dict[str, Any] = {}
    if preset.startswith("FPDM"):
        overrides["grad"] = SJFB(no_grad_iters=(0, 6), grad_iters=(1, 3), seed=0)
    model = create_model(preset, **overrides).train()
    net = model
    if mode == "blocks":
        compile_blocks(model, backend=backend)
    elif mode == "whole":
        net = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, model.in_channels, model.input_size, model.input_size, generator=gen) * 2 - 1
    y = torch.randint(0, model.num_classes, (batch,), generator=gen)

    def step() -> float:
        loss, _ = diffusion.training_loss(net, x, y, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def bench(preset: str, modes: list[str], batch: int, steps: int, backend: str) -> list[dict[str, Any]]:
    """Warm up every mode (compilation), then time ``steps`` steps of each, interleaved step by step."""
    torch._dynamo.reset()
    runs, rows = {}, {}
    for mode in modes:
        step = _stepper(preset, mode, batch, backend)
        graphs_before, start = _graphs(), time.perf_counter()
        for _ in range(WARMUP):
            step()
        row = {"preset": preset, "mode": mode, "batch": batch, "warmup_s": time.perf_counter() - start}
        rows[mode] = row | {"graphs_warmup": _graphs() - graphs_before, "graphs_after_warmup": 0}

        def counted(step: Any = step, row: dict[str, Any] = rows[mode]) -> None:
            before = _graphs()
            step()
            row["graphs_after_warmup"] += _graphs() - before  # a graph after warm-up is a recompilation

        runs[mode] = counted
    timings = harness.interleaved(runs, steps, warmup=0)
    for mode, row in rows.items():
        row.update(step_ms=1e3 * timings[mode].wall, step_cpu_ms=1e3 * timings[mode].cpu)
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "fpdm_compile.json")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole", action="store_true", help="also torch.compile of the whole model")
    args = parser.parse_args(argv)
    started = harness.start()
    torch.set_num_threads(args.threads)
    batch, steps = (8, 2) if args.quick else (args.batch, args.steps)
    backend = "eager" if args.quick else "inductor"  # quick: dynamo's graphs without code generation
    modes = ["eager", "blocks"] + (["whole"] if args.whole else [])
    rows = []
    for preset in ("FPDM-Digits/2", "DiT-Digits/2"):
        rows.extend(bench(preset, modes, batch, steps, backend))
        eager = next(r for r in rows if r["preset"] == preset and r["mode"] == "eager")
        for row in rows:
            if row["preset"] == preset:
                row["vs_eager"] = row["step_ms"] / eager["step_ms"]
                row["cpu_vs_eager"] = row["step_cpu_ms"] / eager["step_cpu_ms"]
    record = {"steps": steps, "backend": backend, "results": rows}
    return harness.finish(args, "fpdm_compile.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
