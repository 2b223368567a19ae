"""The starting state: the checks of x and z0 (batch, device, dtype, structure) and the zeros default."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from implicitdiff import (
    DEQLayer,
    fixed_point,
)


def test_z0_with_another_batch_than_x_is_a_clear_error(cell, x):
    with pytest.raises(ValueError, match="batch size"):
        DEQLayer(cell)(x, z0=torch.zeros(x.shape[0] + 1, x.shape[1]))


def test_z0_on_another_device_than_x_is_a_clear_error(cell, x):
    with pytest.raises(ValueError, match="z0 is on meta but x is on cpu"):
        DEQLayer(cell)(x, z0=torch.zeros(x.shape, device="meta"))


def test_state_not_shaped_like_x_needs_z0(x):
    # The state has 4 features while x has 6: the default z0 (zeros like x) cannot work.
    proj = torch.randn(6, 4)

    def f(z: Tensor, x: Tensor) -> Tensor:
        return 0.5 * torch.tanh(z[:, :4]) + x @ proj

    deq = DEQLayer(f, max_iter=100, tol=1e-7)
    with pytest.raises(ValueError, match="pass z0"):
        deq(x)
    out = deq(x, z0=torch.zeros(x.shape[0], 4))
    assert out.z.shape == (x.shape[0], 4) and out.stats.all_converged


def test_bad_pytree_arguments_are_refused_clearly():
    f = lambda z, x: z  # noqa: E731
    with pytest.raises(ValueError, match="z0 is required when x is not a single tensor"):
        fixed_point(f, (torch.zeros(2, 3),))
    with pytest.raises(TypeError, match=r"one dtype: z0\[0\] is torch.float32 but z0\[1\] is torch.float64"):
        fixed_point(f, torch.zeros(2, 3), (torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"batch size B = 2, got shape \(3, 1\) at z0\['b'\]"):
        fixed_point(f, torch.zeros(2, 3), {"a": torch.zeros(2, 3), "b": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match=r"one batch size B = 2 \(x\[0\]\), got \(4, 1\) at x\[1\]"):
        fixed_point(f, (torch.zeros(2, 3), torch.zeros(4, 1)), (torch.zeros(2, 3),))
    with pytest.raises(TypeError, match=r"floating point, got torch.int64 at z0\[0\]"):
        fixed_point(f, torch.zeros(2, 3), (torch.zeros(2, 3, dtype=torch.long),))
    with pytest.raises(TypeError, match=r"must be a Tensor, got str at z0\[1\]"):
        fixed_point(f, torch.zeros(2, 3), (torch.zeros(2, 3), "h"))
    with pytest.raises(ValueError, match="z0 must hold at least one tensor"):
        fixed_point(f, torch.zeros(2, 3), ())
    with pytest.raises(TypeError, match="x must be a Tensor or a pytree holding tensors"):
        fixed_point(f, (1, 2), (torch.zeros(2, 3),))
