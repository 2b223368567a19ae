"""What a user meets at the edges: each case says what they now see."""

from __future__ import annotations

import pytest
import torch

from implicitdiff import IFT, JFB, SJFB, DEQLayer, PhantomGradient, Picard, fixed_point, solve_chain


def _f():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3)
    return lin, (lambda z, x: torch.tanh(0.5 * lin(z) + x))


def test_vmap_over_a_solve_is_refused_in_one_line():
    _, f = _f()
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"does not run under torch.func.vmap: .*call it on the batch"):
        torch.func.vmap(lambda xi: fixed_point(f, xi[None]).z[0])(x)


def test_torch_func_grad_works_with_jfb_and_is_refused_with_ift():
    _, f = _f()
    x = torch.randn(4, 3)
    got = torch.func.grad(lambda xx: fixed_point(f, xx, grad=JFB(), tol=1e-6, max_iter=60).z.sum())(x)
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(fixed_point(f, xr, grad=JFB(), tol=1e-6, max_iter=60).z.sum(), xr)
    torch.testing.assert_close(got, expected)
    with pytest.raises(
        RuntimeError, match=r"IFT does not run under torch.func transforms.*torch.autograd.grad"
    ):
        torch.func.grad(lambda xx: fixed_point(f, xx, grad=IFT()).z.sum())(x)


def test_neumann_phantom_gradients_refuse_higher_derivatives_and_unrolled_give_them():
    _, f = _f()
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


def test_the_layers_state_dict_carries_the_estimators_generator():
    _, f = _f()
    layer = DEQLayer(f, solver=Picard(), grad=SJFB(seed=5), tol=None).train()
    x = torch.randn(2, 3, requires_grad=True)
    layer(x)  # one draw
    saved = layer.state_dict()
    expected = [layer(x).grad_evals for _ in range(6)]
    restored = DEQLayer(f, solver=Picard(), grad=SJFB(seed=99), tol=None).train()
    restored.load_state_dict(saved)
    assert [restored(x).grad_evals for _ in range(6)] == expected
    with pytest.raises(ValueError, match="another estimator"):
        DEQLayer(f, grad=JFB()).load_state_dict(saved)
    # A layer whose estimator has no state round-trips an empty extra state.
    plain = DEQLayer(f, grad=JFB())
    plain.load_state_dict(plain.state_dict())


def test_solve_chain_refuses_an_x0_that_requires_grad():
    x0 = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"x0 requires grad.*x0.detach\(\)"):
        solve_chain(lambda k, x: 0.5 * x + 1.0, x0, 5)
    with torch.no_grad():
        assert solve_chain(lambda k, x: 0.5 * x + 1.0, x0, 5).all_converged
    assert solve_chain(lambda k, x: 0.5 * x + 1.0, x0.detach(), 5).all_converged
