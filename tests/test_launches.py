"""Kernel launches per solver iteration stay at the floor the maths needs (counted on the CPU).

On a GPU each aten operation that computes something is one kernel launch, and on small maps launches
are the cost. ``LaunchCounter`` counts them on any device; these tests hold each rule, in each mode, to
the number its step and the driver's bookkeeping need (see benchmarks/launches.py for the table).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from implicitdiff import Anderson, Broyden, Picard
from implicitdiff.diagnostics import LaunchCounter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from launches import extra_launches

#: Extra launches per iteration beside f's own: the most each rule may add (fixed budget, tolerance).
FLOOR = {
    "picard": (Picard(), 1, 10),
    "picard_damped": (Picard(tau=0.5), 2, 11),
    "anderson": (Anderson(m=6), 16, 28),
    "anderson_damped": (Anderson(m=6, beta=0.5, lam=1e-3), 17, 29),
    "broyden": (Broyden(memory=20), 22, 34),
}


@pytest.mark.parametrize("name", list(FLOOR))
@pytest.mark.parametrize("mode", ["fixed", "tolerance"])
def test_a_solver_iteration_launches_no_more_kernels_than_its_floor(name, mode):
    rule, fixed, tolerance = FLOOR[name]
    extra = extra_launches(rule, mode)
    assert extra <= (fixed if mode == "fixed" else tolerance), extra


def test_a_plain_loop_with_a_fixed_budget_launches_only_the_map():
    # Picard with tol=None is the plain loop: its only extra work (the returned residual and the result's
    # fields) is done once per solve, whatever the number of iterations.
    short, long = (extra_launches(Picard(), "fixed", iterations=n) * n for n in (10, 40))
    assert short == long <= 16


def test_the_launch_counter_counts_computations_not_views_or_allocations():
    x = torch.randn(4, 3)
    with LaunchCounter() as launches:
        y = torch.tanh(x @ x.T)
        y.view(-1)[:5].t()
        x.detach().reshape(12)
        torch.empty(5)
        torch.addcmul(x, x, x, value=0.5)
        torch.sub(x, x, out=torch.empty_like(x))
    assert launches.count == 4
    assert launches.by_op == {"mm": 1, "tanh": 1, "addcmul": 1, "sub": 1}
