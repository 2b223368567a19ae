"""Gradient estimators against an exact dense float64 reference, ``(I - J)^{-T}`` from autograd's jacobian."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

from implicitdiff import (
    IFT,
    JFB,
    SJFB,
    Anderson,
    BackwardSolveError,
    Broyden,
    DEQLayer,
    PhantomGradient,
    Picard,
    fixed_point,
)
from implicitdiff.gradients import BackwardSolveWarning
from implicitdiff.gradients._implicit import hidden_leaves

DT = torch.float64
SOLVERS = {"picard": Picard, "anderson": Anderson, "broyden": Broyden}


class TanhMap(nn.Module):
    r""":math:`f(z, x) = \tanh(W z + U x + b)` with :math:`\|W\|_2` set to ``contraction`` (a contraction)."""

    def __init__(self, d: int, d_x: int, contraction: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=gen, dtype=DT)
        W = contraction * W / torch.linalg.matrix_norm(W, 2)
        self.W = nn.Parameter(W)
        self.U = nn.Parameter(torch.randn(d, d_x, generator=gen, dtype=DT) / math.sqrt(d_x))
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=gen, dtype=DT))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def make_problem(batch: int, d: int, contraction: float, seed: int):
    f = TanhMap(d, d, contraction, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, d, generator=gen, dtype=DT).requires_grad_()
    weight = torch.randn(batch, d, generator=gen, dtype=DT)  # L = sum(weight * z) + sum(z^2) / 2
    return f, x, weight


def loss_of(z, weight):
    return (weight * z).sum() + 0.5 * (z**2).sum()


def exact_solution(f, x, iters: int = 2000):
    """Plain iteration far past machine precision (the maps are contractions)."""
    with torch.no_grad():
        z = torch.zeros(x.shape[0], f.W.shape[0], dtype=DT)
        for _ in range(iters):
            z_next = f(z, x)
            if torch.equal(z_next, z):
                break
            z = z_next
    return z


def dense_jacobians(f, z_star, x):
    """``(B, d, d)``: ``J_b = df(z, x_b)/dz`` at ``z_star_b``, by ``torch.autograd.functional.jacobian``."""
    return torch.stack(
        [
            torch.autograd.functional.jacobian(lambda z, b=b: f(z[None], x[b : b + 1].detach())[0], z_star[b])
            for b in range(z_star.shape[0])
        ]
    )


def exact_gradients(f, x, weight, params):
    """``dL/d(x, params)`` by the implicit function theorem with dense ``(I - J)^{-T}``."""
    z_star = exact_solution(f, x)
    J = dense_jacobians(f, z_star, x)
    eye = torch.eye(J.shape[-1], dtype=DT)
    g = weight + z_star  # dL/dz
    u = torch.linalg.solve((eye - J).transpose(1, 2), g)  # u = (I - J)^{-T} g, per sample
    with torch.enable_grad():
        image = f(z_star, x)
    return torch.autograd.grad(image, [x, *params], u)


def rel_err(got, want):
    """Largest norm-wise relative error over the tensors.

    The tolerances used with it: IFT tests solve forward and backward to an absolute residual of 1e-13
    on maps with Lipschitz constant <= 0.9, so ``z*`` and the adjoint ``u`` are within
    1e-13 / (1 - 0.9) = 1e-12 of exact, and the gradients are O(1): 1e-8 leaves four orders of magnitude
    for conditioning and float64 rounding (measured over 60 random problems with 1 and 2 threads: at
    most 1.2e-13). JFB and phantom tests compare closed forms at a forward residual of 1e-14 the same way.
    """
    return max(
        float((a - b).norm().detach() / (b.norm().detach() + 1e-300)) for a, b in zip(got, want, strict=True)
    )


problems = dict(
    batch=st.integers(1, 3),
    d=st.integers(2, 7),
    contraction=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**20),
)


@settings(max_examples=12)
@given(solver_name=st.sampled_from(sorted(SOLVERS)), **problems)
def test_ift_matches_dense_reference_with_each_backward_solver(solver_name, batch, d, contraction, seed):
    f, x, weight = make_problem(batch, d, contraction, seed)
    params = list(f.parameters())
    ift = IFT(solver=SOLVERS[solver_name](), max_iter=500, tol=1e-13)
    deq = DEQLayer(f, solver=Anderson(), grad=ift, max_iter=200, tol=1e-13, stop_mode="abs")
    out = deq(x)
    got = torch.autograd.grad(loss_of(out.z, weight), [x, *params])
    want = exact_gradients(f, x, weight, params)
    assert ift.last_backward is not None and ift.last_backward.all_converged
    assert rel_err(got, want) < 1e-8


def test_ift_finds_parameters_a_closure_captures():
    f, x, weight = make_problem(2, 5, 0.8, 3)
    closure = lambda z, x_: f(z, x_)  # noqa: E731 -- parameters are invisible to the layer
    deq = DEQLayer(closure, grad=IFT(tol=1e-13, max_iter=200), max_iter=200, tol=1e-13)
    got = torch.autograd.grad(loss_of(deq(x).z, weight), [x, *f.parameters()])
    assert rel_err(got, exact_gradients(f, x, weight, list(f.parameters()))) < 1e-8


def test_ift_gradient_is_exact_in_eval_mode_with_autograd_on():
    f, x, weight = make_problem(2, 4, 0.7, 5)
    deq = DEQLayer(f, grad=IFT(tol=1e-13, max_iter=200), max_iter=200, tol=1e-13).eval()
    got = torch.autograd.grad(loss_of(deq(x).z, weight), [x, *f.parameters()])
    assert rel_err(got, exact_gradients(f, x, weight, list(f.parameters()))) < 1e-8


def test_ift_passes_gradcheck_through_deq_layer():
    f, x, _ = make_problem(2, 3, 0.6, 11)
    deq = DEQLayer(f, grad=IFT(tol=1e-13, max_iter=200), max_iter=200, tol=1e-13)
    x = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_, W: (
            DEQLayer(
                lambda z, xi: torch.tanh(z @ W.T + xi @ f.U.T + f.b),
                grad=IFT(tol=1e-13, max_iter=200),
                max_iter=200,
                tol=1e-13,
            )(x_).z
        ),
        (x, f.W),
    )
    assert torch.autograd.gradcheck(lambda x_: deq(x_).z, (x,))


def test_same_layer_twice_in_one_graph_gives_the_gradient_of_the_composition():
    f = TanhMap(4, 4, 0.8, 7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=gen, dtype=DT).requires_grad_()
    deq = DEQLayer(f, grad=IFT(tol=1e-13, max_iter=200), max_iter=200, tol=1e-13)
    z1 = deq(x).z
    z2 = deq(z1).z
    got = torch.autograd.grad((z2**2).sum() + z1.sum(), [x, *f.parameters()])

    # Reference: chain two dense IFT gradients by hand.
    params = list(f.parameters())
    z1_ref = exact_solution(f, x)
    z2_ref = exact_solution(f, z1_ref)
    eye = torch.eye(4, dtype=DT)
    u2 = torch.linalg.solve((eye - dense_jacobians(f, z2_ref, z1_ref)).transpose(1, 2), 2 * z2_ref)
    with torch.enable_grad():
        z1_leaf = z1_ref.clone().requires_grad_()
        g2 = torch.autograd.grad(f(z2_ref, z1_leaf), [z1_leaf, *params], u2)
    u1 = torch.linalg.solve((eye - dense_jacobians(f, z1_ref, x)).transpose(1, 2), g2[0] + 1.0)
    with torch.enable_grad():
        g1 = torch.autograd.grad(f(z1_ref, x), [x, *params], u1)
    want = [g1[0], *(a + b for a, b in zip(g1[1:], g2[1:], strict=True))]
    assert rel_err(got, want) < 1e-8


def dense_first_derivative(f, x, weight):
    """``dL/d(x, W)`` as a differentiable function of ``(x, W)``, built from dense Jacobians.

    ``z(x)`` is the exact solution attached with its exact first derivative,
    ``z = z* + (I - J)^{-1} (f(z*, x) - z*)`` with ``J`` held fixed (value ``z*``, derivative
    ``(I - J)^{-1} df/dx``), which is all the second derivative of ``L`` needs.
    """
    z_star = exact_solution(f, x)
    J_fixed = dense_jacobians(f, z_star, x)
    eye = torch.eye(J_fixed.shape[-1], dtype=DT)
    z = z_star + torch.linalg.solve(eye - J_fixed, (f(z_star, x) - z_star).unsqueeze(-1)).squeeze(-1)
    rows = []
    for b in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(
            lambda zz, b=b: f(zz[None], x[b : b + 1])[0], z[b], create_graph=True
        )
        rows.append(torch.linalg.solve((eye - J).T, weight[b] + z[b]))
    u = torch.stack(rows)

    def image(x_, W):  # f with (x, W) explicit, so that the vjp below is the partial derivative
        return torch.tanh(z @ W.T + x_ @ f.U.T + f.b)

    return torch.autograd.functional.vjp(image, (x, f.W), u, create_graph=True)[1]


def test_double_backward_through_ift_matches_the_dense_second_derivative():
    f, x, weight = make_problem(2, 3, 0.7, 13)
    gen = torch.Generator().manual_seed(1)
    vx, vW = torch.randn(x.shape, generator=gen, dtype=DT), torch.randn(f.W.shape, generator=gen, dtype=DT)
    deq = DEQLayer(f, grad=IFT(tol=1e-13, max_iter=200), max_iter=200, tol=1e-13)
    gx, gW = torch.autograd.grad(loss_of(deq(x).z, weight), [x, f.W], create_graph=True)
    got = torch.autograd.grad((gx * vx).sum() + (gW * vW).sum(), [x, *f.parameters()])
    rx, rW = dense_first_derivative(f, x, weight)
    assert rel_err([gx, gW], [rx, rW]) < 1e-8
    want = torch.autograd.grad((rx * vx).sum() + (rW * vW).sum(), [x, *f.parameters()])
    assert rel_err(got, want) < 1e-8


def phantom_closed_form(f, x, weight, k, tau, params):
    r"""``g A_{k,tau} df/d(x, params)`` with :math:`A_{k,\tau} = \tau \sum_{i<k} (\tau J + (1-\tau) I)^i`."""
    z_star = exact_solution(f, x)
    J = dense_jacobians(f, z_star, x)
    eye = torch.eye(J.shape[-1], dtype=DT).expand_as(J)
    step = tau * J + (1 - tau) * eye
    A, power = torch.zeros_like(J), eye.clone()
    for _ in range(k):
        A, power = A + power, power @ step
    u = tau * torch.einsum("bi,bij->bj", weight + z_star, A)
    with torch.enable_grad():
        return torch.autograd.grad(f(z_star, x), [x, *params], u)


@settings(max_examples=8)
@given(
    k=st.integers(1, 8), tau=st.floats(0.1, 1.0), mode=st.sampled_from(["unrolled", "neumann"]), **problems
)
def test_phantom_gradient_equals_the_closed_form_estimate(k, tau, mode, batch, d, contraction, seed):
    f, x, weight = make_problem(batch, d, contraction, seed)
    params = list(f.parameters())
    deq = DEQLayer(f, grad=PhantomGradient(k=k, tau=tau, mode=mode), max_iter=300, tol=1e-14)
    got = torch.autograd.grad(loss_of(deq(x).z, weight), [x, *params])
    assert rel_err(got, phantom_closed_form(f, x, weight, k, tau, params)) < 1e-8


@pytest.mark.parametrize("mode", ["unrolled", "neumann"])
def test_phantom_gradient_approaches_the_exact_gradient_as_k_grows(mode):
    f, x, weight = make_problem(2, 6, 0.9, 17)
    params = list(f.parameters())
    exact = exact_gradients(f, x, weight, params)
    errors = []
    for k in (1, 4, 16, 64, 256):
        deq = DEQLayer(f, grad=PhantomGradient(k=k, tau=0.5, mode=mode), max_iter=300, tol=1e-14)
        errors.append(rel_err(torch.autograd.grad(loss_of(deq(x).z, weight), [x, *params]), exact))
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[0] > 1e-2 and errors[-1] < 1e-8


def test_phantom_k1_tau1_is_jfb_and_jfb_is_the_one_step_formula():
    f, x, weight = make_problem(3, 5, 0.8, 19)
    params = list(f.parameters())
    z_star = exact_solution(f, x)
    with torch.enable_grad():
        one_step = torch.autograd.grad(f(z_star, x), [x, *params], weight + z_star)
    for grad in (JFB(), PhantomGradient(k=1, tau=1.0), PhantomGradient(k=1, tau=1.0, mode="neumann")):
        deq = DEQLayer(f, grad=grad, max_iter=300, tol=1e-14)
        got = torch.autograd.grad(loss_of(deq(x).z, weight), [x, *params])
        assert rel_err(got, one_step) < 1e-10


def test_sjfb_in_training_runs_drawn_nograd_solver_steps_then_drawn_grad_steps():
    f, x, _ = make_problem(2, 4, 0.8, 23)
    sjfb = SJFB(no_grad_iters=(0, 4), grad_iters=(1, 3), seed=5)
    calls = []

    def counted(z, x_):
        calls.append(torch.is_grad_enabled())
        return f(z, x_)

    deq = DEQLayer(counted, solver=Picard(), grad=sjfb, max_iter=30, tol=1e-12).train()
    seen_nograd, seen_grad = set(), set()
    for _ in range(30):
        calls.clear()
        out = deq(x)
        n_nograd, n_grad = sjfb.last_draw
        seen_nograd.add(n_nograd)
        seen_grad.add(n_grad)
        assert out.stats.nfe == n_nograd
        assert calls == [False] * n_nograd + [True] * n_grad
        # n_nograd solver evaluations are n_nograd Picard steps (the layer starts from the image of
        # the solver's last iterate), then n_grad differentiable steps: nothing is evaluated twice.
        z = torch.zeros_like(x)
        for _ in range(n_nograd + n_grad):
            z = f(z, x)
        torch.testing.assert_close(out.z, z, rtol=0, atol=0)
    assert seen_nograd == set(range(5)) and seen_grad == {1, 2, 3}


def test_sjfb_in_eval_solves_fully_and_uses_jfb():
    f, x, weight = make_problem(2, 4, 0.8, 29)
    sjfb = SJFB(seed=1)
    deq = DEQLayer(f, grad=sjfb, max_iter=100, tol=1e-13).eval()
    state = sjfb.generator.get_state()
    out = deq(x)
    assert out.stats.all_converged
    assert torch.equal(sjfb.generator.get_state(), state)  # no draw out of training
    params = list(f.parameters())
    got = torch.autograd.grad(loss_of(out.z, weight), [x, *params])
    z_star = exact_solution(f, x)
    with torch.enable_grad():
        want = torch.autograd.grad(f(z_star, x), [x, *params], weight + z_star)
    assert rel_err(got, want) < 1e-9


def test_sjfb_draws_are_seeded_and_restored_from_state_dict():
    a, b = SJFB(seed=3), SJFB(seed=3)
    draws = [(a.forward_budget(50, training=True), b.forward_budget(50, training=True)) for _ in range(20)]
    assert all(x == y for x, y in draws)
    saved = a.state_dict()
    ahead = [a.forward_budget(50, training=True) for _ in range(10)]
    c = SJFB(seed=99)
    c.load_state_dict(saved)
    assert [c.forward_budget(50, training=True) for _ in range(10)] == ahead
    assert all(0 <= n <= 6 for n in ahead)


def test_ift_reports_backward_statistics_and_raises_on_failure_when_asked():
    f, x, weight = make_problem(2, 5, 0.95, 31)
    seen = []
    ift = IFT(solver=Picard(), max_iter=3, tol=1e-12, on_backward=seen.append)
    deq = DEQLayer(f, grad=ift, max_iter=200, tol=1e-12)
    with pytest.warns(BackwardSolveWarning, match="did not reach tol"):
        gx, *_ = torch.autograd.grad(loss_of(deq(x).z, weight), [x, *f.parameters()])
    assert torch.isfinite(gx).all()
    stats = ift.last_backward
    assert stats is seen[-1] and stats.nfe == 3 and not stats.converged.any()
    assert (stats.residual > 1e-12).all()

    strict = IFT(solver=Picard(), max_iter=3, tol=1e-12, on_failure="raise")
    deq = DEQLayer(f, grad=strict, max_iter=200, tol=1e-12)
    with pytest.raises(BackwardSolveError, match="did not reach tol"):
        loss_of(deq(x).z, weight).backward()


def test_estimators_add_no_work_without_grad():
    f, x, _ = make_problem(2, 4, 0.8, 37)
    for grad in (IFT(), JFB(), PhantomGradient(), SJFB()):
        with torch.no_grad():
            out = fixed_point(f, x, grad=grad, max_iter=100, tol=1e-10)
        # The plain solution: the solver's best iterate, the one its statistics describe.
        assert out.z.grad_fn is None and torch.equal(out.z, out.stats.z)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: PhantomGradient(k=0), ValueError, r"k must be an int >= 1, got 0"),
        (lambda: PhantomGradient(k=2.0), TypeError, r"k must be an int >= 1, got float"),
        (lambda: PhantomGradient(k=True), TypeError, r"k must be an int >= 1, got bool True"),
        (
            lambda: PhantomGradient(tau=0.0),
            ValueError,
            r"tau must be a finite float > 0.0 and <= 1.0, got 0.0",
        ),
        (
            lambda: PhantomGradient(tau=1.5),
            ValueError,
            r"tau must be a finite float > 0.0 and <= 1.0, got 1.5",
        ),
        (lambda: PhantomGradient(tau=np.bool_(True)), TypeError, r"tau must be a finite float"),
        (lambda: PhantomGradient(mode="exact"), ValueError, r"mode must be one of .* got 'exact'"),
        (
            lambda: SJFB(no_grad_iters=(3, 2)),
            ValueError,
            r"no_grad_iters must be an inclusive range .*\(3, 2\)",
        ),
        (lambda: SJFB(grad_iters=(0, 2)), ValueError, r"grad_iters .* 1 <= low <= high, got \(0, 2\)"),
        (lambda: SJFB(grad_iters=(1,)), TypeError, r"grad_iters must be a pair of ints"),
        (lambda: SJFB(grad_iters=(True, 2)), TypeError, r"grad_iters\[0\] must be an int"),
        (lambda: SJFB(no_grad_iters=(0, 2.0)), TypeError, r"no_grad_iters\[1\] must be an int"),
        (lambda: SJFB(seed=1.5), TypeError, r"seed must be an int"),
        (lambda: SJFB(seed=False), TypeError, r"seed must be an int.*got bool False"),
        (lambda: IFT(max_iter=0), ValueError, r"max_iter must be an int >= 1, got 0"),
        (lambda: IFT(max_iter=True), TypeError, r"max_iter must be an int >= 1, got bool True"),
        (lambda: IFT(tol=-1.0), ValueError, r"tol must be a finite float > 0"),
        (lambda: IFT(tol=float("nan")), ValueError, r"tol must be a finite float > 0"),
        (lambda: IFT(tol=True), TypeError, r"tol must be a finite float > 0.0, got bool True"),
        (lambda: IFT(stop_mode="max"), ValueError, r"stop_mode must be one of \('abs', 'rel'\), got 'max'"),
        (lambda: IFT(on_failure="loud"), ValueError, r"on_failure must be one of .*got 'loud'"),
        (lambda: IFT(on_failure=None), ValueError, r"on_failure must be one of .*got None"),
        # The 0.2 alias is gone (see CHANGELOG): Python itself names it.
        (lambda: IFT(raise_on_failure=True), TypeError, r"unexpected keyword argument 'raise_on_failure'"),
        (lambda: IFT(solver="anderson"), TypeError, r"solver must be callable"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_allowed_values(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_estimators_accept_numpy_numbers_where_they_take_python_ones():
    ift = IFT(max_iter=np.int64(50), tol=np.float32(1e-6))
    assert (type(ift.max_iter), ift.max_iter, type(ift.tol)) == (int, 50, float)
    assert ift.tol == pytest.approx(1e-6, rel=1e-6)  # float32(1e-6) is 1e-6 to float32 precision
    phantom = PhantomGradient(k=np.int64(3), tau=np.float64(0.5))
    assert (type(phantom.k), phantom.k, phantom.tau) == (int, 3, 0.5)
    sjfb = SJFB((np.int64(0), 6), (np.int32(1), np.int64(3)), seed=np.int64(4))
    assert sjfb.no_grad_iters == (0, 6) and sjfb.grad_iters == (1, 3)
    assert all(type(n) is int for n in (*sjfb.no_grad_iters, *sjfb.grad_iters, sjfb.seed))
    assert torch.equal(sjfb.generator.get_state(), SJFB(seed=4).generator.get_state())


# --- which leaves IFT differentiates: the graph walk -------------------------------------------------


def leaves_of(f, z, *inputs):
    """The hidden leaves IFT would find for ``f(z, *inputs)``, with ``z`` and ``inputs`` as proxies."""
    z_leaf = z.detach().requires_grad_()
    proxies = [t.detach().requires_grad_() for t in inputs]
    return hidden_leaves(f(z_leaf, *proxies), [z_leaf, *proxies])


def assert_same_tensors(got, want):
    """The same tensor objects (not equal values), each exactly once."""
    assert len(got) == len({id(t) for t in got}), "a leaf was found twice"
    assert {id(t) for t in got} == {id(t) for t in want}


def test_graph_walk_finds_module_parameters_and_not_the_inputs():
    torch.manual_seed(0)
    lin, inj = nn.Linear(4, 4), nn.Linear(3, 4)
    found = leaves_of(lambda z, x: torch.tanh(lin(z) + inj(x)), torch.randn(2, 4), torch.randn(2, 3))
    assert_same_tensors(found, [lin.weight, lin.bias, inj.weight, inj.bias])


def test_graph_walk_finds_closure_captured_leaves_and_the_leaves_behind_captured_non_leaves():
    torch.manual_seed(0)
    W = torch.randn(4, 4, requires_grad=True)  # a captured leaf
    A = torch.randn(4, requires_grad=True)
    scale = A.exp()  # a captured non-leaf: the walk goes through its history to A
    constant = torch.randn(4)  # captured, needs no grad: not a leaf of the graph
    found = leaves_of(lambda z: torch.tanh(z @ W.T * scale + constant), torch.randn(3, 4))
    assert_same_tensors(found, [W, A])


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_graph_walk_finds_the_original_parameters_of_a_parametrization(kind):
    torch.manual_seed(0)
    lin = getattr(parametrizations, kind)(nn.Linear(4, 4))
    originals = list(lin.parametrizations.weight.parameters())
    assert len(originals) == (2 if kind == "weight_norm" else 1)
    found = leaves_of(lambda z: torch.tanh(lin(z)), torch.randn(2, 4))
    assert_same_tensors(found, [lin.bias, *originals])


def test_graph_walk_finds_a_parameter_used_twice_once_and_skips_frozen_ones():
    torch.manual_seed(0)
    lin, frozen = nn.Linear(4, 4), nn.Linear(4, 4)
    frozen.weight.requires_grad_(False)
    found = leaves_of(lambda z: frozen(lin(torch.tanh(lin(z)))), torch.randn(2, 4))
    assert_same_tensors(found, [lin.weight, lin.bias, frozen.bias])


class _WrapperLeaf:
    __slots__ = ("variable",)

    def __init__(self, variable):
        self.variable = variable


class _WrapperOp:
    """An autograd node as torch before 2.13 exposes it: each access to ``next_functions`` makes new
    Python wrappers, freed as soon as nobody holds them (so a new one can reuse a freed one's id)."""

    __slots__ = ("children",)

    def __init__(self, children):
        self.children = children

    @property
    def next_functions(self):
        return tuple((_WrapperOp(c) if isinstance(c, list) else _WrapperLeaf(c), 0) for c in self.children)


class _WrapperOutput:
    def __init__(self, children):
        self.children = children

    @property
    def grad_fn(self):
        return _WrapperOp(self.children)


def test_graph_walk_does_not_depend_on_node_wrappers_outliving_the_walk():
    leaves = [torch.zeros(1, requires_grad=True) for _ in range(6)]
    tree = [[[leaves[0]], leaves[1]], [[leaves[2], [leaves[3]]]], leaves[4], [[[leaves[5]]]]]
    assert_same_tensors(hidden_leaves(_WrapperOutput(tree), []), leaves)
    assert_same_tensors(hidden_leaves(_WrapperOutput(tree), leaves[:2]), leaves[2:])


# --- a backward solve that fails is loud ---------------------------------------------------------------


def linear_problem(radius: float, batch: int = 2, d: int = 3):
    """``f(z, x) = radius * z + x``: the fixed point ``x / (1 - radius)`` exists for any radius != 1, and
    ``dL/dx = dL/dz / (1 - radius)``, but the adjoint iteration ``u <- radius u + g`` diverges for
    ``radius > 1``: its partial sums, and its best iterate ``g``, point the wrong way."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=gen, dtype=DT).requires_grad_()
    weight = torch.randn(batch, d, generator=gen, dtype=DT)
    z_star = x.detach() / (1.0 - radius)
    return (lambda z: radius * z + x), z_star, x, weight


def ift_grad_of_x(ift: IFT, radius: float):
    f_x, z_star, x, weight = linear_problem(radius)
    z = ift.attach(f_x, z_star, training=True)
    (gx,) = torch.autograd.grad((weight * z).sum(), x)
    return gx, weight / (1.0 - radius)


def test_a_failed_backward_solve_warns_by_default_with_its_numbers():
    ift = IFT(solver=Picard(), max_iter=20, tol=1e-8)
    with pytest.warns(BackwardSolveWarning) as record:
        got, exact = ift_grad_of_x(ift, radius=1.5)
    assert len(record) == 1
    message = str(record[0].message)
    assert "tol=1e-08 (abs)" in message and "max_iter=20" in message and "nfe 20" in message
    assert "2/2 samples not converged" in message
    residual = float(ift.last_backward.residual.max())
    assert f"max residual {residual:.3e}" in message and residual > 1e-8
    assert issubclass(BackwardSolveWarning, RuntimeWarning)
    # Why it must be loud: the gradient it returned points the wrong way.
    assert float((got * exact).sum()) < 0


def test_a_failed_backward_solve_raises_when_asked():
    ift = IFT(solver=Picard(), max_iter=20, tol=1e-8, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BackwardSolveError, match=r"2/2 samples not converged.*nfe 20"):
            ift_grad_of_x(ift, radius=1.5)


def test_a_failed_backward_solve_is_silent_when_ignored_but_still_reported():
    seen = []
    ift = IFT(solver=Picard(), max_iter=20, tol=1e-8, on_failure="ignore", on_backward=seen.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ift_grad_of_x(ift, radius=1.5)
    assert len(seen) == 1 and not seen[0].converged.any()


@pytest.mark.parametrize("on_failure", ["warn", "raise"])
def test_a_converged_backward_solve_is_silent_and_exact(on_failure):
    ift = IFT(solver=Picard(), max_iter=200, tol=1e-12, on_failure=on_failure)
    assert IFT().on_failure == "warn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, exact = ift_grad_of_x(ift, radius=0.5)
    assert ift.last_backward.all_converged
    # Picard on u <- 0.5 u + g stops at |residual| <= 1e-12, so the error in u is at most 1e-12 / 0.5.
    torch.testing.assert_close(got, exact, rtol=0, atol=4e-12)


# --- phantom gradients: every (k, tau, mode), deterministically -------------------------------------------


@pytest.mark.parametrize("mode", ["unrolled", "neumann"])
@pytest.mark.parametrize(("k", "tau"), [(1, 0.3), (2, 1.0), (2, 0.3), (5, 0.7)])
def test_phantom_gradient_equals_the_closed_form_for_fixed_k_and_tau(k, tau, mode):
    # The hypothesis test above samples (k, tau) at random; this grid pins the cases a one-line bug in
    # the damping (tau <-> 1 - tau), the number of terms (k vs k +- 1) or the final factor tau changes.
    f, x, weight = make_problem(2, 4, 0.8, 41)
    params = list(f.parameters())
    deq = DEQLayer(f, grad=PhantomGradient(k=k, tau=tau, mode=mode), max_iter=300, tol=1e-14)
    got = torch.autograd.grad(loss_of(deq(x).z, weight), [x, *params])
    assert rel_err(got, phantom_closed_form(f, x, weight, k, tau, params)) < 1e-8
    if (k, tau) != (1, 1.0):  # and the estimate is not the exact gradient, nor JFB's
        assert rel_err(got, exact_gradients(f, x, weight, params)) > 1e-3


# --- S-JFB's seed ----------------------------------------------------------------------------------------


def sjfb_draws(sjfb: SJFB, n: int = 40) -> list[tuple[int, int]]:
    draws = []
    for _ in range(n):
        sjfb.forward_budget(50, training=True)
        sjfb.attach(lambda z: z, torch.zeros(1, 1), training=True)
        draws.append(sjfb.last_draw)
    return draws


def test_sjfb_seed_decides_the_draws():
    # 40 pairs of draws from 7 x 3 values: two different seeds agree on all of them with probability
    # 21**-40, so "different seeds, different sequences" is a sharp test of the seed being used.
    for seed in (0, 1, 12345, 2**40):
        assert sjfb_draws(SJFB(seed=seed)) == sjfb_draws(SJFB(seed=seed))
    sequences = [tuple(sjfb_draws(SJFB(seed=seed))) for seed in (0, 1, 2, 12345)]
    assert len(set(sequences)) == len(sequences)


def test_sjfb_state_dict_resumes_the_draw_sequence_exactly():
    reference = sjfb_draws(SJFB(seed=8), 30)
    first = SJFB(seed=8)
    assert sjfb_draws(first, 12) == reference[:12]
    saved = first.state_dict()
    resumed = SJFB(seed=0)  # another seed: the state, not the seed, must decide what comes next
    resumed.load_state_dict(saved)
    assert resumed.seed == 8
    assert sjfb_draws(resumed, 18) == reference[12:]
    assert sjfb_draws(first, 18) == reference[12:]  # saving did not advance or disturb the original


def test_sjfb_never_asks_for_more_forward_iterations_than_the_cap():
    sjfb = SJFB(no_grad_iters=(5, 9), grad_iters=(1, 1), seed=0)
    assert {sjfb.forward_budget(3, training=True) for _ in range(20)} == {3}
    assert {sjfb.forward_budget(7, training=True) for _ in range(60)} == {5, 6, 7}


def test_ift_passes_its_own_cap_tolerance_and_stop_mode_to_the_backward_solver():
    calls = []

    def recording_solver(g, z0, *, max_iter, tol, stop_mode):
        calls.append((max_iter, tol, stop_mode))
        return Picard()(g, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)

    ift = IFT(solver=recording_solver, max_iter=np.int64(77), tol=1e-9, stop_mode="rel")
    got, exact = ift_grad_of_x(ift, radius=0.5)
    assert calls == [(77, 1e-9, "rel")] and type(calls[0][0]) is int
    # A relative residual of 1e-9 on u <- 0.5 u + g leaves u within 2e-9 * |u| of exact.
    assert float((got - exact).norm() / exact.norm()) < 4e-9


def test_a_backward_solve_that_meets_non_finite_values_says_so():
    def nan_solver(g, z0, *, max_iter, tol, stop_mode):
        result = Picard()(g, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
        result.nonfinite = torch.tensor([True, False])
        result.converged = torch.tensor([False, True])
        return result

    ift = IFT(solver=nan_solver, max_iter=50, tol=1e-8, on_failure="raise")
    with pytest.raises(
        BackwardSolveError, match=r"1/2 samples not converged \(samples \[0\]\).*non-finite .* 1 "
    ):
        ift_grad_of_x(ift, radius=0.5)


def test_neumann_phantom_gradients_refuse_higher_derivatives_and_unrolled_give_them(tanh_f):
    f = tanh_f
    x = torch.randn(2, 3, requires_grad=True)
    out = fixed_point(f, x, grad=PhantomGradient(k=3, mode="neumann"), tol=1e-6, max_iter=60)
    (gx,) = torch.autograd.grad(out.z.sum(), x, create_graph=False)  # first order works
    assert torch.isfinite(gx).all()
    out = fixed_point(f, x, grad=PhantomGradient(k=3, mode="neumann"), tol=1e-6, max_iter=60)
    with pytest.raises(RuntimeError, match=r"mode='neumann'\) has no higher derivatives.*mode='unrolled'"):
        torch.autograd.grad(out.z.sum(), x, create_graph=True)
    out = fixed_point(f, x, grad=PhantomGradient(k=3, mode="unrolled"), tol=1e-6, max_iter=60)
    (gx,) = torch.autograd.grad(out.z.sum(), x, create_graph=True)
    assert gx.requires_grad
