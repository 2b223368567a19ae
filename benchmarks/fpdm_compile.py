"""Compiled against eager training steps of the small presets on the CPU (``models.compile_blocks``).

Run::

    python benchmarks/fpdm_compile.py            # writes benchmarks/results/fpdm_compile.json
    python benchmarks/fpdm_compile.py --quick    # fewer steps
    python benchmarks/fpdm_compile.py --whole    # also torch.compile of the whole model (FPDM recompiles)

Per preset (FPDM-Digits/2 with S-JFB's random draws, DiT-Digits/2), one training step (loss, backward,
AdamW) in three ways: ``eager``; ``blocks``, :func:`models.compile_blocks` with the inductor backend (the
solver loop and S-JFB's draws stay eager); and, with ``--whole``, ``torch.compile`` of the whole model.
Reported: the median step time after warm-up, the modes' steps interleaved one by one (wall-clock and the
process's CPU time; the machine is shared, so the CPU time and the ratio of medians measured side by side
are the figures to quote), the warm-up steps' time (compilation), and the graphs compiled during warm-up
and after it (dynamo's ``unique_graphs``: a graph after warm-up is a recompilation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

# The example's package (examples/fpdm/fpdm/) is not installed: this is the one path entry.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "fpdm"))

from fpdm.diffusion import GaussianDiffusion
from fpdm.models import compile_blocks, create_model

from implicitdiff import SJFB

RESULTS = Path(__file__).parent / "results" / "fpdm_compile.json"
WARMUP = 4


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _stepper(preset: str, mode: str, batch: int) -> Any:
    """A training step of a fresh model (same weights, data and S-JFB draws for every mode)."""
    torch.manual_seed(0)
    overrides: dict[str, Any] = {}
    if preset.startswith("FPDM"):
        overrides["grad"] = SJFB(no_grad_iters=(0, 6), grad_iters=(1, 3), seed=0)
    model = create_model(preset, **overrides).train()
    net = model
    if mode == "blocks":
        compile_blocks(model, backend="inductor")
    elif mode == "whole":
        net = torch.compile(model, backend="inductor")
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


def bench(preset: str, modes: list[str], batch: int, steps: int) -> list[dict[str, Any]]:
    """Warm up every mode (compilation), then time ``steps`` steps of each, interleaved step by step."""
    torch._dynamo.reset()
    steppers, rows = {}, {}
    for mode in modes:
        steppers[mode] = _stepper(preset, mode, batch)
        graphs_before, start = _graphs(), time.perf_counter()
        for _ in range(WARMUP):
            steppers[mode]()
        rows[mode] = {"preset": preset, "mode": mode, "batch": batch, "warmup_s": time.perf_counter() - start}
        rows[mode].update(graphs_warmup=_graphs() - graphs_before, graphs_after_warmup=0, walls=[], cpus=[])
    for rep in range(steps):
        # Alternate the order, so that a change of the machine's load hits every mode alike.
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            graphs_before = _graphs()
            wall, cpu = time.perf_counter(), time.process_time()
            steppers[mode]()
            rows[mode]["walls"].append(time.perf_counter() - wall)
            rows[mode]["cpus"].append(time.process_time() - cpu)
            rows[mode]["graphs_after_warmup"] += _graphs() - graphs_before
    for row in rows.values():
        row["step_ms"] = 1e3 * statistics.median(row.pop("walls"))
        row["step_cpu_ms"] = 1e3 * statistics.median(row.pop("cpus"))
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="5 timed steps")
    parser.add_argument("--whole", action="store_true", help="also torch.compile of the whole model")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 5 if args.quick else args.steps
    modes = ["eager", "blocks"] + (["whole"] if args.whole else [])
    load_before = os.getloadavg()
    rows = []
    for preset in ("FPDM-Digits/2", "DiT-Digits/2"):
        rows.extend(bench(preset, modes, args.batch, steps))
        print(json.dumps(rows[-len(modes) :]), file=sys.stderr)
        eager = next(r for r in rows if r["preset"] == preset and r["mode"] == "eager")
        for row in rows:
            if row["preset"] == preset:
                row["vs_eager"] = row["step_ms"] / eager["step_ms"]
                row["cpu_vs_eager"] = row["step_cpu_ms"] / eager["step_cpu_ms"]
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "steps": steps,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'preset':<14} {'mode':<7} {'step ms':>8} {'cpu ms':>8} {'vs eager':>8} {'warm-up s':>9} graphs")
    for r in rows:
        print(
            f"{r['preset']:<14} {r['mode']:<7} {r['step_ms']:>8.1f} {r['step_cpu_ms']:>8.1f} "
            f"{r['cpu_vs_eager']:>8.2f} {r['warmup_s']:>9.1f} "
            f"{r['graphs_warmup']} + {r['graphs_after_warmup']}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
