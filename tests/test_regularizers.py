"""Regularisers against exact dense references."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrizations

from implicitdiff import IFT, DEQLayer
from implicitdiff.regularizers import fixed_point_correction_loss, jacobian_frobenius, spectral_radius

DT = torch.float64


def tanh_map(d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    W = (0.8 * torch.randn(d, d, generator=gen, dtype=DT) / d**0.5).requires_grad_()
    x = torch.randn(3, d, generator=gen, dtype=DT)
    return (lambda z: torch.tanh(z @ W.T + x)), W, x


def dense_jacobians(f, z):
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda v: f(v[None])[0], z[b]) for b in range(len(z))]
    )


def hutchinson_standard_error(J: torch.Tensor, n_samples: int) -> torch.Tensor:
    r"""Standard error of the ``n_samples``-probe Hutchinson estimate of :math:`\|J\|_F^2`, per sample.

    One Gaussian probe gives :math:`X = \varepsilon^\top M \varepsilon` with :math:`M = J J^\top`
    (symmetric): :math:`\mathbb E X = \operatorname{tr} M = \|J\|_F^2` and
    :math:`\operatorname{Var} X = 2 \|M\|_F^2`, so the mean of ``n`` probes has standard error
    :math:`\sqrt{2 \|M\|_F^2 / n}`.
    """
    M = J @ J.transpose(-1, -2)
    return (2 * M.pow(2).sum(dim=(-2, -1)) / n_samples).sqrt()


def test_hutchinson_frobenius_is_unbiased_within_six_standard_errors():
    f, W, x = tanh_map(6, 0)
    z = torch.randn_like(x).requires_grad_()
    with torch.no_grad():  # J_b = diag(1 - f_b^2) W
        J = (1 - f(z) ** 2)[:, :, None] * W
    exact = J.pow(2).sum(dim=(1, 2))
    n = 4000
    gen = torch.Generator().manual_seed(1)
    estimate = jacobian_frobenius(f(z), z, n_samples=n, normalize=False, generator=gen)
    assert ((estimate - exact).abs() <= 6 * hutchinson_standard_error(J, n)).all()


def test_hutchinson_frobenius_is_normalised_by_the_state_dimension_per_sample():
    # f(z)_b = A_b z_b, so J_b = A_b exactly; the samples differ (a mix-up across the batch shows), and
    # d = 8 and batch 3: dividing by the batch's numel (24) or not at all is off by a factor of 3 or 8,
    # far more than the 6 standard errors allowed (about 6 * sqrt(2 / d) / sqrt(n) ~ 10% here).
    batch, d, n = 3, 8, 2000
    gen = torch.Generator().manual_seed(4)
    A = (
        torch.randn(batch, d, d, generator=gen, dtype=DT)
        * torch.tensor([1.0, 0.5, 2.0], dtype=DT)[:, None, None]
    )
    A.requires_grad_()
    z = torch.randn(batch, d, generator=gen, dtype=DT).requires_grad_()
    image = torch.einsum("bij,bj->bi", A, z)
    estimate = jacobian_frobenius(image, z, n_samples=n, generator=gen)
    exact = A.detach().pow(2).sum(dim=(1, 2)) / d
    bound = 6 * hutchinson_standard_error(A.detach(), n) / d
    assert (bound < 0.15 * exact).all()  # the test is sharp enough to see a wrong factor
    assert ((estimate - exact).abs() <= bound).all()

    # d estimate_b / d A_b = 2/(n d) sum_i e_i e_i^T A_b, whose mean is 2 A_b / d; entry (j, k) of one
    # term e e^T A has variance ||A[:, k]||^2 + A[j, k]^2 (Gaussian fourth moments).
    (grad_A,) = torch.autograd.grad(estimate.sum(), A)
    A_ = A.detach()
    column = A_.pow(2).sum(dim=1, keepdim=True)  # (B, 1, d): ||A_b[:, k]||^2
    grad_bound = 6 * (2 / d) * ((column + A_.pow(2)) / n).sqrt()
    assert ((grad_A - 2 * A_ / d).abs() <= grad_bound).all()


def test_spectral_radius_matches_the_dense_eigenvalues():
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(5, 5, generator=gen, dtype=DT)
    S = 0.5 * (A + A.T)  # symmetric: real eigenvalues, power iteration converges
    z = torch.randn(2, 5, generator=gen, dtype=DT).requires_grad_()
    scales = torch.tensor([[1.0], [0.3]], dtype=DT)
    image = scales * (z @ S)  # per-sample J = scale * S^T
    rho = spectral_radius(image, z, n_iter=300, generator=gen)
    exact = torch.linalg.eigvalsh(S).abs().max() * scales.squeeze(1)
    # |lambda_2 / lambda_1| = 0.53 for this S: after 300 iterations the power method's error,
    # O(0.53^600), is far below rounding, so rtol only has to cover float64 rounding (1e-6 is generous).
    torch.testing.assert_close(rho, exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_iter", [1, 2, 3, 5])
def test_spectral_radius_is_the_power_method_step_by_step(n_iter):
    # Few iterations are far from the eigenvalue: what is pinned is the power method itself, started from
    # the generator's vector, v <- v J / ||v J||, returning ||v J|| of the last step, per sample.
    A = torch.randn(4, 4, generator=torch.Generator().manual_seed(7), dtype=DT)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(8), dtype=DT).requires_grad_()
    scales = torch.tensor([[1.0], [0.5], [2.0]], dtype=DT)
    image = scales * torch.tanh(z @ A.T)
    J = torch.stack(
        [torch.autograd.functional.jacobian(lambda zz: image_of(zz, A, s), zi) for zi, s in zip(z, scales)]
    )
    got = spectral_radius(image, z, n_iter=n_iter, generator=torch.Generator().manual_seed(3))
    v = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    v = v / v.norm(dim=1, keepdim=True)
    for _ in range(n_iter):
        w = torch.einsum("bi,bij->bj", v, J)  # v J
        ratio, v = w.norm(dim=1), w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, ratio, rtol=1e-12, atol=0)


def image_of(z: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return scale * torch.tanh(z @ A.T)


def test_correction_loss_weighs_later_states_more():
    states = [torch.tensor(float(i)) for i in range(1, 4)]
    loss = fixed_point_correction_loss(states, lambda s: s, gamma=0.5)
    assert float(loss) == pytest.approx(0.25 * 1 + 0.5 * 2 + 1 * 3)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: fixed_point_correction_loss([], lambda s: s), ValueError, "at least one state"),
        (lambda: fixed_point_correction_loss([torch.ones(())], lambda s: s, gamma=0.0), ValueError, "gamma"),
        (lambda: jacobian_frobenius(torch.ones(2, 3), torch.ones(2, 3)), ValueError, "z must require grad"),
        (
            lambda: spectral_radius(
                torch.ones(2, 3, requires_grad=True), torch.ones(2, 2, requires_grad=True)
            ),
            ValueError,
            "shaped like z",
        ),
    ],
)
def test_regularizers_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_ift_differentiates_through_spectral_norm_parametrization():
    torch.manual_seed(0)
    lin = parametrizations.spectral_norm(torch.nn.Linear(4, 4).double())
    f = lambda z, x: torch.tanh(0.9 * lin(z) + x)  # noqa: E731
    lin.eval()  # freeze the power-iteration vectors so the map is deterministic
    x = torch.randn(2, 4, dtype=DT, requires_grad=True)
    deq = DEQLayer(f, grad=IFT(tol=1e-12, max_iter=200), max_iter=200, tol=1e-12)
    params = [p for p in lin.parameters()]
    got = torch.autograd.grad(deq(x).z.sum(), [x, *params])
    z = torch.zeros(2, 4, dtype=DT)
    with torch.no_grad():
        for _ in range(400):
            z = f(z, x)
    J = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda v, b=b: f(v[None], x[b : b + 1].detach())[0], z[b])
            for b in range(2)
        ]
    )
    u = torch.linalg.solve((torch.eye(4, dtype=DT) - J).transpose(1, 2), torch.ones(2, 4, dtype=DT))
    want = torch.autograd.grad(f(z, x), [x, *params], u)
    # Both solves stop at an absolute residual of 1e-12 on a map with Lipschitz constant <= 0.9, so z*
    # and the adjoint u are within 1e-12 / (1 - 0.9) = 1e-11 of exact (in norm): compare norm-wise,
    # relative to gradients of size O(1), not entry by entry (an entry near 0 has no relative accuracy).
    for a, b in zip(got, want, strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-8
