"""BoundMap: what f returns is checked against the state (shape, dtype, device, structure)."""

from __future__ import annotations

import pytest
import torch

from implicitdiff import (
    IFT,
    JFB,
    SJFB,
    DEQLayer,
    PhantomGradient,
    fixed_point,
)
from implicitdiff.functional import BoundMap


def test_f_returning_another_shape_is_a_clear_error(x):
    deq = DEQLayer(lambda z, x: torch.cat([z, x], dim=1))
    with pytest.raises(ValueError, match="shape"):
        deq(x)


def test_f_returning_another_dtype_is_a_clear_error(x):
    deq = DEQLayer(lambda z, x: (0.5 * z + x).double())
    with pytest.raises(ValueError, match="dtype"):
        deq(x)


def test_f_returning_another_device_is_a_clear_error(x):
    # A second real device may not exist: the 'meta' device stands in for one.
    deq = DEQLayer(lambda z, x: torch.empty_like(z, device="meta"))
    with pytest.raises(ValueError, match="device"):
        deq(x)


@pytest.mark.parametrize(
    "grad",
    [JFB(), IFT(tol=1e-2, stop_mode="rel", on_failure="ignore"), PhantomGradient(k=3), SJFB(seed=0)],
    ids=repr,
)
def test_an_f_computing_in_bfloat16_under_autocast_works_with_every_estimator(grad):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    deq = DEQLayer(lambda z, x_: torch.tanh(0.4 * lin(z) + x_), grad=grad, max_iter=30, tol=1e-2,
                   stop_mode="rel").train()  # fmt: skip
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deq(x)
        loss = out.z.float().pow(2).sum()
    assert out.z.dtype == torch.float32  # the state's dtype, whatever f computes in
    loss.backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0


def test_another_dtype_outside_autocast_names_the_dtypes_not_z0_shapes(x):
    with pytest.raises(ValueError, match=r"dtype and device \(torch.float32") as info:
        DEQLayer(lambda z, x_: (z + x_).double())(x)
    assert "shaped like x" not in str(info.value)


def _two_leaves(batch: int = 2):
    return (torch.zeros(batch, 3), {"h": torch.zeros(batch, 2), "c": torch.zeros(batch, 2)})


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda z: (z[0], {"h": z[1]["h"]}), r"no leaf z\[1\]\['c'\]"),
        (lambda z: (z[0], {**z[1], "x": z[0]}), r"a leaf z\[1\]\['x'\]"),
        (lambda z: [z[0], z[1]], "containers differ"),
        (lambda z: (z[0], {"h": z[1]["h"][:, :1], "c": z[1]["c"]}), r"shape \(2, 1\) at z\[1\]\['h'\]"),
        (lambda z: (z[0].double(), z[1]), r"torch.float64 on cpu at z\[0\]"),
        (lambda z: (z[0], {"h": z[1]["h"], "c": 1.0}), r"float at z\[1\]\['c'\]"),
    ],
)
def test_what_f_returns_is_checked_leaf_by_leaf_with_its_path(returned, message):
    with pytest.raises(ValueError, match=message):
        fixed_point(lambda z, x: returned(z), torch.zeros(2, 3), _two_leaves())


def test_under_autocast_the_leaves_f_returns_are_cast_back_to_the_state_dtype():
    lin = torch.nn.Linear(4, 4)
    f = lambda z, x: (torch.tanh(0.3 * lin(z[0]) + x), 0.5 * z[1])  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fixed_point(f, torch.randn(2, 4), (torch.zeros(2, 4), torch.ones(2, 3)), tol=1e-2)
    assert out.z[0].dtype == torch.float32 and out.z[1].dtype == torch.float32
    assert out.z[0].requires_grad


def test_a_bound_map_counts_its_calls_and_shares_the_count_with_the_maps_made_from_it():
    x = torch.randn(2, 3)
    g = BoundMap(lambda z, x, scale: scale * z + x, x, torch.zeros(2, 3), {"scale": torch.tensor(0.5)})
    g(torch.zeros(2, 3))
    other = g.with_inputs(torch.ones(2, 3), torch.tensor(2.0))
    torch.testing.assert_close(other(torch.ones(2, 3)), torch.full((2, 3), 3.0))
    assert g.calls == other.calls == 2
    g.reset_calls()
    assert other.calls == 0
    with pytest.warns(DeprecationWarning, match="counts its own calls"):
        old = BoundMap(lambda z, x: z + x, x, torch.zeros(2, 3), {}, [0])  # the 0.2 spelling
    old(torch.zeros(2, 3))
    assert old.calls == 1
