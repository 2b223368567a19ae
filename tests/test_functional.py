"""fixed_point, the face: its defaults, its checks, and the same results as the layer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from implicitdiff import Broyden, DEQLayer, fixed_point, solve_chain
from implicitdiff.diagnostics import SyncCounter


def test_fixed_point_function_matches_the_layer(cell, x):
    with torch.no_grad():
        layer = DEQLayer(cell, solver=Broyden(), max_iter=50, tol=1e-7)(x)
        func = fixed_point(cell, x, solver=Broyden(), max_iter=50, tol=1e-7)
    torch.testing.assert_close(layer.z, func.z)
    assert layer.stats.nfe == func.stats.nfe


def test_non_callable_solver_or_f_is_rejected(cell):
    with pytest.raises(TypeError, match="solver"):
        DEQLayer(cell, solver="anderson")
    with pytest.raises(TypeError, match="callable"):
        DEQLayer(42)


def test_f_kwargs_reach_f_and_are_explicit_inputs(cell, x):
    scale = torch.tensor(0.5, requires_grad=True)
    out = fixed_point(cell, x, max_iter=100, tol=1e-7, f_kwargs={"scale": scale})
    with torch.no_grad():
        torch.testing.assert_close(
            out.z, fixed_point(cell, 0.5 * x, max_iter=100, tol=1e-7).z, atol=1e-5, rtol=0
        )
    out.z.sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


# ------------------------------------------------------------------------------------------------------
# One vocabulary: tol=None is a fixed budget in fixed_point, DEQLayer and solve_chain
# ------------------------------------------------------------------------------------------------------


def test_tol_none_is_a_fixed_budget_with_no_host_reads_in_all_three_entry_points():
    def f(z: Tensor, x: Tensor) -> Tensor:
        return 0.5 * z + x  # converges at once to any tolerance the default would set

    x = torch.randn(3, 4)
    with torch.no_grad(), SyncCounter() as syncs:
        point = fixed_point(f, x, tol=None, max_iter=17)
        layer = DEQLayer(f, tol=None, max_iter=13)(x)
        chain = solve_chain(lambda k, z: 0.5 * z + 1.0, torch.zeros(4), 30, tol=None, max_iter=20)
    assert syncs.count == 0, syncs.by_op
    assert point.stats.nfe == 17 and not point.stats.converged.any()
    assert layer.stats.nfe == 13 and not layer.stats.converged.any()
    # A chain's budget is sweeps: each makes exactly one more step final (exact at its image), however
    # early the others would have met a tolerance.
    assert chain.sweeps == 20 and chain.converged.tolist() == [True] * 20 + [False] * 10
    assert solve_chain(lambda k, z: 0.5 * z + 1.0, torch.zeros(4), 30, max_iter=20).sweeps < 20
