"""DEQLayer: per-call overrides, warm start, user solvers, grad mode, modules, kwargs and input checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from implicitdiff import IFT, JFB, SJFB, DEQLayer, PhantomGradient, fixed_point
from implicitdiff.solvers import Anderson, Broyden, Picard, SolverResult


class TanhCell(nn.Module):
    r""":math:`f(z, x) = \tanh(W z + x)` with :math:`\|W\|_2 = L` (a contraction in ``z``)."""

    def __init__(self, n: int, lipschitz: float = 0.7, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            w = torch.randn(n, n, generator=gen)
            self.linear.weight.copy_(lipschitz * w / torch.linalg.matrix_norm(w, 2))

    def forward(self, z: Tensor, x: Tensor, scale: float = 1.0) -> Tensor:
        return torch.tanh(self.linear(z) + scale * x)


class RecordingSolver:
    """A user's own solver: a plain class with the Solver call, doing Picard steps itself."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, g, z0, *, max_iter, tol, stop_mode="abs"):
        self.calls.append({"max_iter": max_iter, "tol": tol, "stop_mode": stop_mode})
        z, nfe, trace = z0, 0, []
        batch = z0.shape[0]
        while True:
            fz = g(z)
            nfe += 1
            residual = (fz - z).reshape(batch, -1).norm(dim=1)
            trace.append(float(residual.max()))
            if bool((residual <= tol).all()) or nfe >= max_iter:
                break
            z = fz
        return SolverResult(z=z, residual=residual, converged=residual <= tol, nfe=nfe, trace=trace)


def picard_function(g, z0, *, max_iter, tol, stop_mode="abs"):
    """A user's own solver written as a plain function."""
    return Picard()(g, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)


@pytest.fixture
def cell() -> TanhCell:
    return TanhCell(6)


@pytest.fixture
def x() -> Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------
# Per-call overrides and warm start
# ---------------------------------------------------------------------------------------------------------


def test_per_call_max_iter_overrides_the_layer_default(cell, x):
    deq = DEQLayer(cell, solver=Picard(), max_iter=100, tol=1e-10)
    assert deq(x).stats.nfe > 3
    out = deq(x, max_iter=3)
    assert out.stats.nfe == 3 and not out.stats.all_converged
    # The override lasts for one call only.
    assert deq(x).stats.nfe > 3


def test_per_call_tol_overrides_the_layer_default(cell, x):
    deq = DEQLayer(cell, solver=Picard(), max_iter=200, tol=1e-6)
    tight = deq(x)
    loose = deq(x, tol=1e-2)
    assert tight.stats.all_converged and loose.stats.all_converged
    assert float(loose.stats.residual.max()) <= 1e-2 < float(tight.stats.trace[0])
    assert loose.stats.nfe < tight.stats.nfe
    assert float(tight.stats.residual.max()) <= 1e-6


def test_per_call_solver_overrides_the_layer_default(cell, x):
    default, override = RecordingSolver(), RecordingSolver()
    deq = DEQLayer(cell, solver=default, max_iter=50, tol=1e-6)
    deq(x, solver=override, max_iter=7, tol=1e-3)
    assert default.calls == [] and override.calls == [{"max_iter": 7, "tol": 1e-3, "stop_mode": "abs"}]
    deq(x)
    assert default.calls == [{"max_iter": 50, "tol": 1e-6, "stop_mode": "abs"}]


@pytest.mark.parametrize("solver", [Picard(), Anderson(), Broyden()], ids=repr)
@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), lipschitz=st.floats(0.3, 0.9))
def test_warm_start_near_the_solution_takes_fewer_evaluations(solver, seed, lipschitz):
    f = TanhCell(8, lipschitz, seed)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    deq = DEQLayer(f, solver=solver, max_iter=300, tol=1e-5)
    with torch.no_grad():
        cold = deq(x)
        z_near = cold.z + 1e-4 * torch.randn(4, 8, generator=torch.Generator().manual_seed(seed + 1))
        warm = deq(x, z0=z_near)
    assert cold.stats.all_converged and warm.stats.all_converged
    assert warm.stats.nfe < cold.stats.nfe
    torch.testing.assert_close(warm.z, cold.z, atol=2e-5 / (1 - lipschitz), rtol=0)


# ---------------------------------------------------------------------------------------------------------
# User solvers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [RecordingSolver(), picard_function], ids=["class", "function"])
def test_a_users_own_solver_works_like_ours(cell, x, solver):
    ours = DEQLayer(cell, solver=Anderson(), max_iter=100, tol=1e-7)(x)
    theirs = DEQLayer(cell, solver=solver, max_iter=200, tol=1e-7)(x)
    assert theirs.stats.all_converged
    torch.testing.assert_close(theirs.z, ours.z, atol=1e-5, rtol=0)
    theirs.z.sum().backward()
    assert cell.linear.weight.grad is not None


def test_a_solver_returning_something_else_is_a_clear_error(cell, x):
    with pytest.raises(TypeError, match="SolverResult"):
        DEQLayer(cell, solver=lambda g, z0, **kw: z0)(x)


def test_non_callable_solver_or_f_is_rejected(cell):
    with pytest.raises(TypeError, match="solver"):
        DEQLayer(cell, solver="anderson")
    with pytest.raises(TypeError, match="callable"):
        DEQLayer(42)


# ---------------------------------------------------------------------------------------------------------
# Grad mode, eval mode, modules and kwargs
# ---------------------------------------------------------------------------------------------------------


def test_under_no_grad_the_output_does_not_require_grad(cell, x):
    deq = DEQLayer(cell)
    x = x.clone().requires_grad_(True)
    with torch.no_grad():
        out = deq(x)
    assert not out.z.requires_grad and out.z.grad_fn is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_follow_grad_mode_not_training_mode(cell, x, training):
    deq = DEQLayer(cell, max_iter=100, tol=1e-8).train(training)
    x = x.clone().requires_grad_(True)
    out = deq(x)
    assert out.z.requires_grad
    out.z.square().sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    assert cell.linear.weight.grad is not None and bool(cell.linear.weight.grad.abs().sum() > 0)


def test_f_as_module_registers_its_parameters(cell):
    deq = DEQLayer(cell)
    assert any(p is cell.linear.weight for p in deq.parameters())
    assert "f.linear.weight" in deq.state_dict()
    assert deq.double().f.linear.weight.dtype == torch.float64


def test_f_as_plain_function_adds_no_parameters(x):
    deq = DEQLayer(lambda z, x: 0.5 * torch.tanh(z) + x)
    assert list(deq.parameters()) == []
    out = deq(x)
    assert out.stats.all_converged
    torch.testing.assert_close(out.z, 0.5 * torch.tanh(out.z) + x, atol=1e-4, rtol=0)


def test_f_kwargs_are_passed_through_to_f(cell, x):
    deq = DEQLayer(cell, max_iter=100, tol=1e-7)
    with torch.no_grad():
        scaled = deq(x, scale=0.5)
        half_x = deq(0.5 * x)
        plain = deq(x)
    torch.testing.assert_close(scaled.z, half_x.z, atol=1e-5, rtol=0)
    assert float((scaled.z - plain.z).abs().max()) > 1e-2


def test_fixed_point_function_matches_the_layer(cell, x):
    with torch.no_grad():
        layer = DEQLayer(cell, solver=Broyden(), max_iter=50, tol=1e-7)(x)
        func = fixed_point(cell, x, solver=Broyden(), max_iter=50, tol=1e-7)
    torch.testing.assert_close(layer.z, func.z)
    assert layer.stats.nfe == func.stats.nfe


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tol": 0.0}, ValueError),
        ({"tol": -1.0}, ValueError),
        ({"max_iter": 0}, ValueError),
        ({"stop_mode": "inf"}, ValueError),
    ],
)
def test_bad_layer_settings_raise_at_construction(cell, kwargs, error):
    with pytest.raises(error):
        DEQLayer(cell, **kwargs)


@pytest.mark.parametrize(("kwargs", "error"), [({"tol": 0.0}, ValueError), ({"max_iter": 0}, ValueError)])
def test_bad_per_call_settings_raise(cell, x, kwargs, error):
    with pytest.raises(error):
        DEQLayer(cell)(x, **kwargs)


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


def nan_for_negative_x(z: Tensor, x: Tensor) -> Tensor:
    """A contraction for samples with ``x[:, 0] >= 0``, NaN from the first call for the others."""
    return 0.5 * torch.tanh(z) + x + torch.sqrt(x[:, :1])


def test_non_finite_values_are_reported_in_the_stats(x):
    x = x.abs()
    x[1, 0] = -1.0
    out = DEQLayer(nan_for_negative_x, max_iter=50, tol=1e-6)(x)
    assert out.stats.nonfinite.tolist() == [False, True, False]
    assert out.stats.converged.tolist() == [True, False, True]
    # Nothing finite was seen for sample 1: the solve returns its starting point (JFB's one
    # differentiable application of f on top of it is NaN again, as f is).
    assert bool(torch.isfinite(out.stats.z).all()) and torch.equal(out.stats.z[1], torch.zeros_like(x[1]))
    # Without grad the layer returns the image of the best iterate, finite where nothing finite was
    # seen (the starting point again).
    assert torch.equal(out.stats.fz[1], torch.zeros_like(x[1]))
    with torch.no_grad():
        assert torch.equal(DEQLayer(nan_for_negative_x, max_iter=50, tol=1e-6)(x).z, out.stats.z)


def test_non_finite_values_raise_when_asked(x):
    x = x.abs()
    x[2, 0] = -1.0
    with pytest.raises(
        FloatingPointError, match=r"non-finite values during the forward solve for samples \[2\]"
    ):
        DEQLayer(nan_for_negative_x, max_iter=50, raise_on_nonfinite=True)(x)


def test_finite_solves_do_not_raise_when_asked(cell, x):
    out = DEQLayer(cell, raise_on_nonfinite=True)(x)
    assert not bool(out.stats.nonfinite.any())


@settings(max_examples=10)
@given(
    batch=st.integers(1, 4),
    shape=st.sampled_from([(5,), (2, 3, 3)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_layer_output_keeps_shape_and_dtype_of_the_state(batch, shape, dtype):
    n = math.prod(shape)
    weight = 0.5 * torch.eye(n, dtype=dtype)

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z.reshape(batch, n) @ weight).reshape(z.shape) + x

    x = torch.randn(batch, *shape, dtype=dtype)
    out = DEQLayer(f, max_iter=100, tol=1e-5)(x)
    assert out.z.shape == x.shape and out.z.dtype == dtype
    assert out.stats.all_converged


# ---------------------------------------------------------------------------------------- round 2: issue #11


def test_the_stats_describe_the_returned_solution(x):
    """``z -> 2 z + x`` expands: after 5 Picard evaluations the residual in the stats must be out.z's."""

    def expanding(z: Tensor, x_: Tensor) -> Tensor:
        return 2 * z + x_

    with torch.no_grad():
        out = DEQLayer(expanding, solver=Picard(), max_iter=5, tol=1e-6)(x)
    measured = torch.linalg.vector_norm((expanding(out.z, x) - out.z).reshape(x.shape[0], -1), dim=1)
    torch.testing.assert_close(out.stats.residual, measured)
    assert torch.equal(out.z, out.stats.z)
    torch.testing.assert_close(out.stats.fz, expanding(out.z, x))


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


def test_grad_evals_count_the_estimators_evaluations(x):
    for grad, expected in ((JFB(), 1), (PhantomGradient(k=4), 4), (IFT(on_failure="ignore"), 1)):
        calls = []

        def f(z: Tensor, x_: Tensor) -> Tensor:
            calls.append(torch.is_grad_enabled())
            return 0.5 * torch.tanh(z) + x_

        out = fixed_point(f, x.requires_grad_(), grad=grad, max_iter=40, tol=1e-6)
        assert out.grad_evals == expected == sum(calls)
        assert out.stats.nfe == len(calls) - expected
        with torch.no_grad():
            assert fixed_point(f, x, grad=grad, max_iter=40, tol=1e-6).grad_evals == 0


def test_numpy_numbers_and_strict_bools():
    np = pytest.importorskip("numpy")
    layer = DEQLayer(lambda z, x_: 0.5 * z + x_, max_iter=np.int64(20), tol=np.float32(1e-5),
                     check_every=np.int16(2))  # fmt: skip
    assert layer.max_iter == 20 and isinstance(layer.max_iter, int)
    with pytest.raises(TypeError, match="raise_on_nonfinite must be a bool"):
        DEQLayer(lambda z, x_: z, raise_on_nonfinite=1)
    with pytest.raises(TypeError, match="max_iter must be an int"):
        DEQLayer(lambda z, x_: z, max_iter=True)
