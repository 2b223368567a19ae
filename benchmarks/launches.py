"""Kernel launches per solver iteration beside f's own, counted on the CPU.

On a GPU a small map (a convolution of a few MB) takes about as long as a handful of kernel launches,
so the launches a solver adds around ``f`` decide its speed there. ``LaunchCounter`` (in
``implicitdiff.diagnostics``) counts every aten operation that would launch a kernel (not views, not
allocations); this script runs each solver on the conv DEQ ``tanh(conv(z) + x)`` (3 launches per
evaluation of ``f``), in both modes, and prints the launches per iteration that are not ``f``'s:

    (launches of the solve - 3 * nfe) / nfe

Usage: ``python benchmarks/launches.py`` (seconds); writes ``benchmarks/results/launches.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gradients import processor_name  # benchmarks/gradients.py

from implicitdiff import Anderson, Broyden, Picard
from implicitdiff.diagnostics import LaunchCounter

RESULTS = Path(__file__).resolve().parent / "results" / "launches.json"

#: The rules as the issue that set the targets measured them.
RULES = {"picard": Picard(), "anderson": Anderson(m=6), "broyden": Broyden(memory=20)}
#: Launches of one evaluation of ``tanh(conv(z) + x)``: convolution, add, tanh.
F_LAUNCHES = 3


def conv_map(batch: int = 2, channels: int = 4, size: int = 8, seed: int = 0):
    """``g(z) = tanh(conv(z) + x)`` with a contractive convolution, and a starting point."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    with torch.no_grad():
        # Contractive, but slowly enough that no residual reaches exactly zero within the budget.
        conv.weight.mul_(0.9)
    x = torch.randn(batch, channels, size, size, generator=gen)
    z0 = torch.zeros_like(x)

    def g(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(conv(z) + x)

    return g, z0


def extra_launches(rule, mode: str, iterations: int = 40) -> float:
    """Launches per evaluation that are not ``f``'s, over a solve of ``iterations`` evaluations.

    Tolerance mode uses a tolerance no sample reaches, so every solve runs its whole budget.
    """
    g, z0 = conv_map()
    tol = None if mode == "fixed" else 1e-30
    with torch.no_grad():
        rule(g, z0, max_iter=3, tol=tol)  # warm-up: lazy initialisations out of the count
        with LaunchCounter() as launches:
            out = rule(g, z0, max_iter=iterations, tol=tol)
    assert out.nfe == iterations
    return (launches.count - F_LAUNCHES * out.nfe) / out.nfe


def measure() -> dict[str, dict[str, float]]:
    modes = ("fixed", "tolerance")
    return {name: {mode: extra_launches(rule, mode) for mode in modes} for name, rule in RULES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = measure()
    print(f"{'extra launches per iteration':<30}{'fixed budget':>14}{'tolerance':>12}")
    for name, row in rows.items():
        print(f"{name:<30}{row['fixed']:>14.1f}{row['tolerance']:>12.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "torch": torch.__version__,
        "machine": processor_name(),
        "f_launches": F_LAUNCHES,
        "extra_launches_per_iteration": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
