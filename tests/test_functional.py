"""fixed_point, the face: its defaults, its checks, and the same results as the layer."""

from __future__ import annotations

import pytest
import torch

from implicitdiff import (
    Broyden,
    DEQLayer,
    fixed_point,
)


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
