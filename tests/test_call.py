"""One call: the no-grad solve, what a solver returns, the estimator's attachment (reverse and forward mode),
non-finite values, the intermediate states."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from implicitdiff import (
    IFT,
    JFB,
    Anderson,
    DEQLayer,
    PhantomGradient,
    Picard,
    fixed_point,
)
from implicitdiff.solvers import SolverResult


def picard_function(g, z0, *, max_iter, tol, stop_mode="abs"):
    """A user's own solver written as a plain function."""
    return Picard()(g, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)


@pytest.mark.parametrize("kind", ["class", "function"])
def test_a_users_own_solver_works_like_ours(cell, x, kind, make_recording_solver):
    solver = make_recording_solver() if kind == "class" else picard_function
    ours = DEQLayer(cell, solver=Anderson(), max_iter=100, tol=1e-7)(x)
    theirs = DEQLayer(cell, solver=solver, max_iter=200, tol=1e-7)(x)
    assert theirs.stats.all_converged
    torch.testing.assert_close(theirs.z, ours.z, atol=1e-5, rtol=0)
    theirs.z.sum().backward()
    assert cell.linear.weight.grad is not None


def test_a_solver_returning_something_else_is_a_clear_error(cell, x):
    with pytest.raises(TypeError, match="SolverResult"):
        DEQLayer(cell, solver=lambda g, z0, **kw: z0)(x)


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


def test_n_states_returns_differentiable_states_ending_at_z():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    f = lambda z, x: (torch.tanh(0.5 * lin(z[0]) + x), 0.5 * z[1] + 1)  # noqa: E731
    x = torch.randn(3, 4)
    out = fixed_point(f, x, (torch.zeros(3, 4), torch.zeros(3, 2)), n_states=4, tol=1e-6, max_iter=50)
    assert len(out.states) == 4
    assert out.states[-1] is out.z
    assert all(isinstance(state, tuple) and state[1].shape == (3, 2) for state in out.states)
    assert all(state[0].requires_grad for state in out.states)
    errors = [float((state[1].detach() - 2).abs().max()) for state in out.states]
    assert errors == sorted(errors, reverse=True)  # later states are closer to the fixed point
    assert out.grad_evals == 1 + 3
    layer = DEQLayer(f, n_states=3, tol=1e-6)
    assert len(layer(x, (torch.zeros(3, 4), torch.zeros(3, 2))).states) == 3
    assert layer(x, (torch.zeros(3, 4), torch.zeros(3, 2)), n_states=None).states is None
    with pytest.raises(ValueError, match="n_states must be an int >= 1"):
        DEQLayer(f, n_states=0)


def test_n_states_is_bounded_by_the_evaluations_made():
    x = torch.ones(2, 3)
    out = fixed_point(lambda z, x: 0.0 * z + x, x, n_states=10, solver=Picard(), tol=1e-6, check_every=1)
    assert out.stats.nfe == 2
    assert len(out.states) == 3  # the two points the solver evaluated, then z
    only = fixed_point(lambda z, x: 0.5 * z + x, x, n_states=1)
    assert len(only.states) == 1 and only.states[0] is only.z and only.grad_evals == 1


def test_vmap_over_a_solve_is_refused_in_one_line(tanh_f):
    f = tanh_f
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"does not run under torch.func.vmap: .*call it on the batch"):
        torch.func.vmap(lambda xi: fixed_point(f, xi[None]).z[0])(x)


def test_torch_func_grad_works_with_jfb_and_is_refused_with_ift(tanh_f):
    f = tanh_f
    x = torch.randn(4, 3)
    got = torch.func.grad(lambda xx: fixed_point(f, xx, grad=JFB(), tol=1e-6, max_iter=60).z.sum())(x)
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(fixed_point(f, xr, grad=JFB(), tol=1e-6, max_iter=60).z.sum(), xr)
    torch.testing.assert_close(got, expected)
    with pytest.raises(
        RuntimeError, match=r"IFT does not run under torch.func transforms.*torch.autograd.grad"
    ):
        torch.func.grad(lambda xx: fixed_point(f, xx, grad=IFT()).z.sum())(x)


def nan_for_negative_x(z: Tensor, x: Tensor) -> Tensor:
    """A contraction for samples with ``x[:, 0] >= 0``, NaN from the first call for the others."""
    return 0.5 * torch.tanh(z) + x + torch.sqrt(x[:, :1])


class WrongSolver:
    """A user's solver that returns something other than a solution of the state it was given."""

    def __init__(self, change) -> None:
        self.change = change

    def __repr__(self) -> str:
        return "WrongSolver()"

    def __call__(self, g, z0, *, max_iter, tol, stop_mode="abs"):
        z = self.change(Picard()(g, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode).z)
        residual = torch.zeros(z0.shape[0])
        return SolverResult(z=z, residual=residual, converged=residual == 0, nfe=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda z: z[:1], r"returned z \(1, 6\) torch.float32 on cpu; .* \(\(3, 6\) torch.float32 on cpu\)"),
        (lambda z: z.double(), r"returned z \(3, 6\) torch.float64 on cpu"),
        (lambda z: z.to("meta"), r"returned z \(3, 6\) torch.float32 on meta"),
        (lambda z: z.reshape(3, 2, 3), r"returned z \(3, 2, 3\)"),
    ],
)
def test_what_a_solver_returns_is_checked_and_the_solver_named(cell, x, change, message):
    # Before the check, a short batch reached f through the estimator and was blamed on f.
    with pytest.raises(ValueError, match=rf"solver WrongSolver\(\) {message}"):
        fixed_point(cell, x, solver=WrongSolver(change), grad=JFB())
    with pytest.raises(TypeError, match=r"solver WrongSolver\(\) returned a SolverResult whose z is list"):
        fixed_point(cell, x, solver=WrongSolver(lambda z: [z]))


# ------------------------------------------------------------------------------------------------------
# Forward mode: torch.func.jvp and torch.autograd.forward_ad
# ------------------------------------------------------------------------------------------------------


def _forward_problem():
    gen = torch.Generator().manual_seed(3)
    W = 0.5 * torch.randn(5, 5, generator=gen, dtype=torch.float64) / 5**0.5
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    v = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    return (lambda z, x: torch.tanh(z @ W.T + x)), W, x, v


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("how", ["func.jvp", "forward_ad"])
def test_forward_mode_through_jfb_and_unrolled_phantom_matches_their_formulas(how, grad_mode):
    f, W, x, v = _forward_problem()
    z_star = fixed_point(f, x, tol=1e-13, max_iter=300).z.detach()
    # JFB is f(z*, x) with z* held fixed: its tangent is f's partial derivative in x.
    jfb = (1 - torch.tanh(z_star @ W.T + x) ** 2) * v
    # Unrolled phantom, k steps z <- (1 - tau) z + tau f(z, x) from z*, carry the tangent
    # t <- (1 - tau) t + tau (f_z t + f_x v).
    k, tau, t, z = 3, 0.5, torch.zeros_like(v), z_star
    for _ in range(k):
        d = 1 - torch.tanh(z @ W.T + x) ** 2
        t = (1 - tau) * t + tau * d * (t @ W.T + v)
        z = (1 - tau) * z + tau * f(z, x)
    for grad, expected in ((JFB(), jfb), (PhantomGradient(k=k, tau=tau), t)):
        solve = DEQLayer(f, grad=grad, tol=1e-13, max_iter=300)
        with torch.set_grad_enabled(grad_mode):  # no_grad does not stop forward mode
            if how == "func.jvp":
                _, tangent = torch.func.jvp(lambda x: solve(x).z, (x,), (v,))
            else:
                with torch.autograd.forward_ad.dual_level():
                    out = solve(torch.autograd.forward_ad.make_dual(x, v)).z
                    tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
        assert tangent is not None
        torch.testing.assert_close(tangent, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("how", ["func.jvp", "forward_ad"])
def test_ift_refuses_forward_mode_in_one_line_naming_what_works(how):
    f, _, x, v = _forward_problem()
    solve = DEQLayer(f, grad=IFT(), tol=1e-10, max_iter=100)
    with pytest.raises(RuntimeError, match=r"IFT .*(forward-mode|torch.func).*(JFB|\.backward)") as caught:
        if how == "func.jvp":
            torch.func.jvp(lambda x: solve(x).z, (x,), (v,))
        else:
            with torch.autograd.forward_ad.dual_level():
                solve(torch.autograd.forward_ad.make_dual(x, v))
    assert "\n" not in str(caught.value)
