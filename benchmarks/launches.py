"""Kernel launches per solver iteration beside f's own, counted on the CPU.

On a GPU a small map (a convolution of a few MB) takes about as long as a handful of kernel launches,
so the launches a solver adds around ``f`` decide its speed there. ``LaunchCounter`` (in
``implicitdiff.diagnostics``) counts every aten operation that would launch a kernel (not views, not
allocations); this script runs each solver on the conv DEQ ``tanh(conv(z) + x)`` (3 launches per
evaluation of ``f``), in both modes, and prints the launches per iteration that are not ``f``'s:

    (launches of the solve - 3 * nfe) / nfe

Run: ``python -m benchmarks.launches`` (seconds); writes ``benchmarks/results/launches.json``. The counts
do not depend on the processor or the load, so ``--quick`` runs the same count.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks import harness
from implicitdiff import Anderson, Broyden, Picard
from implicitdiff.diagnostics import LaunchCounter

#: The rules at the settings the launch floors of the test suite hold them to.
RULES = {"Picard()": Picard(), "Anderson(m=6)": Anderson(m=6), "Broyden(memory=20)": Broyden(memory=20)}
#: Launches of one evaluation of ``tanh(conv(z) + x)``: convolution, add, tanh.
F_LAUNCHES = 3


def conv_map(batch: int = 2, channels: int = 4, size: int = 8, seed: int = 0) -> tuple[Callable, Tensor]:
    """``g(z) = tanh(conv(z) + x)`` with a contractive convolution, and a starting point."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    with torch.no_grad():
        # Contractive, but slowly enough that no residual reaches exactly zero within the budget.
        conv.weight.mul_(0.9)
    x = torch.randn(batch, channels, size, size, generator=gen)

    def g(z: Tensor) -> Tensor:
        return torch.tanh(conv(z) + x)

    return g, torch.zeros_like(x)


def extra_launches(rule: Callable, mode: str, iterations: int = 40) -> float:
    """Launches per evaluation that are not ``f``'s, over a solve of ``iterations`` evaluations.

    Tolerance mode uses a tolerance no sample reaches, so every solve runs its whole budget.
    """
    g, z0 = conv_map()
    tol = None if mode == "fixed" else 1e-30
    with torch.no_grad():
        rule(g, z0, max_iter=3, tol=tol)  # warm-up: lazy initialisations out of the count
        with LaunchCounter() as launches:
            out = rule(g, z0, max_iter=iterations, tol=tol)
    if out.nfe != iterations:
        raise RuntimeError(f"the solve stopped after {out.nfe} of {iterations} evaluations")
    return (launches.count - F_LAUNCHES * out.nfe) / out.nfe


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__, "launches.json").parse_args(argv)
    started = harness.start()
    modes = ("fixed", "tolerance")
    rows = {name: {mode: extra_launches(rule, mode) for mode in modes} for name, rule in RULES.items()}
    record = {"f_launches": F_LAUNCHES, "extra_launches_per_iteration": rows}
    return harness.finish(args, "launches.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
