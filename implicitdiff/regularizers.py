r"""Regularisers and diagnostics for implicit layers.

* :func:`jacobian_frobenius`: Hutchinson estimate of :math:`\|J_f\|_F^2` (Bai et al., 2021), the
  Jacobian penalty that keeps a DEQ's fixed point easy to find.
* :func:`spectral_radius`: power-iteration estimate of :math:`\rho(J_f)` at a fixed point, a diagnostic
  of how contractive ``f`` is (the forward and IFT-backward solves converge when it is below 1).
* :func:`fixed_point_correction_loss`: the fixed-point correction loss of Bai et al. (2022) over
  intermediate states.

Spectral and weight normalisation
---------------------------------
Normalising ``f``'s weights is done with PyTorch's parametrizations, which recompute the weight
from the original parameter on every access, so every estimator (including :class:`~implicitdiff.IFT`,
which finds ``f``'s leaves by walking its graph) differentiates through the normalisation:

>>> import torch
>>> from torch.nn.utils import parametrizations
>>> lin = parametrizations.spectral_norm(torch.nn.Linear(16, 16))   # ||W||_2 ~ 1 (power method)
>>> lin = parametrizations.weight_norm(torch.nn.Linear(16, 16))     # W = g v / ||v|| per row
>>> sorted(name for name, _ in lin.named_parameters())
['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']

``spectral_norm`` makes :math:`\|W\|_2 \approx 1`; scale it (e.g. ``0.9 * lin(z)``) for a contraction
of ``tanh(W z + x)``. ``spectral_norm`` updates its power-iteration vectors only in training mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._validate import check_bool, check_int, check_real

__all__ = ["fixed_point_correction_loss", "jacobian_frobenius", "spectral_radius"]


def _check_pair(image: Tensor, z: Tensor) -> None:
    if not isinstance(image, Tensor) or not isinstance(z, Tensor):
        raise TypeError(f"image and z must be Tensors, got {type(image).__name__} and {type(z).__name__}")
    if image.shape != z.shape:
        raise ValueError(f"image must be shaped like z {tuple(z.shape)}, got {tuple(image.shape)}")
    if not z.requires_grad or not image.requires_grad:
        raise ValueError("z must require grad and image must be f(z, x) computed from it with grad enabled")


def jacobian_frobenius(
    image: Tensor,
    z: Tensor,
    *,
    n_samples: int = 1,
    normalize: bool = True,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutchinson estimate of the squared Frobenius norm of :math:`J = \partial f/\partial z`, per sample.

    With :math:`\varepsilon \sim \mathcal N(0, I)`, :math:`\mathbb E\,\|\varepsilon^\top J\|_2^2 =
    \operatorname{tr}(J J^\top) = \|J\|_F^2` (Hutchinson, 1989); the estimate averages ``n_samples``
    vector-Jacobian products. Bai et al. (2021, "Stabilizing Equilibrium Models by Jacobian
    Regularization") add :math:`\gamma \|J\|_F^2 / d` to the loss.

    Parameters
    ----------
    image : Tensor
        ``f(z, x)``, computed with grad from ``z``.
    z : Tensor
        The state, ``(B, ...)``, requiring grad (usually the detached fixed point with
        ``requires_grad_()``).
    n_samples : int
        Number of probe vectors.
    normalize : bool
        Divide by the state's dimension :math:`d` (as Bai et al. do).
    create_graph : bool
        Keep the graph, so the estimate can be used as a penalty and differentiated.
    generator : torch.Generator, optional
        For the probe vectors.

    Returns
    -------
    Tensor
        ``(B,)`` estimates.
    """
    _check_pair(image, z)
    n_samples = check_int("n_samples", n_samples, low=1)
    normalize = check_bool("normalize", normalize)
    create_graph = check_bool("create_graph", create_graph)
    batch = z.shape[0]
    total = image.new_zeros(batch)
    for i in range(n_samples):
        probe = torch.randn(image.shape, generator=generator, dtype=image.dtype).to(image.device)
        (vjp,) = torch.autograd.grad(
            image, z, probe, retain_graph=create_graph or i < n_samples - 1, create_graph=create_graph
        )
        total = total + vjp.reshape(batch, -1).pow(2).sum(dim=1)
    estimate = total / n_samples
    return estimate / z[0].numel() if normalize else estimate


@torch.no_grad()
def spectral_radius(
    image: Tensor, z: Tensor, *, n_iter: int = 30, generator: torch.Generator | None = None
) -> Tensor:
    r"""Power-iteration estimate of the spectral radius :math:`\rho(J)` of :math:`J = \partial f/\partial z`.

    Iterates :math:`v \leftarrow v J / \|v J\|` by vector-Jacobian products (``J`` and
    :math:`J^\top` have the same eigenvalues) and returns :math:`\|v J\|` per sample. It converges
    to :math:`|\lambda_{\max}|` when one eigenvalue (or a conjugate pair of equal modulus, as a
    limit of the norm ratio) dominates; it is a diagnostic and carries no gradient.

    Parameters
    ----------
    image, z : Tensor
        ``f(z, x)`` computed with grad from ``z`` (which requires grad), ``(B, ...)``.
    n_iter : int
        Power iterations.
    generator : torch.Generator, optional
        For the starting vector.

    Returns
    -------
    Tensor
        ``(B,)`` estimates.
    """
    _check_pair(image, z)
    n_iter = check_int("n_iter", n_iter, low=1)
    batch = z.shape[0]

    def normalized(v: Tensor) -> Tensor:
        norm = v.reshape(batch, -1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
        out: Tensor = v / norm.reshape(batch, *([1] * (v.dim() - 1)))
        return out

    v = normalized(torch.randn(image.shape, generator=generator, dtype=image.dtype).to(image.device))
    ratio = image.new_zeros(batch)
    for _ in range(n_iter):
        (vjp,) = torch.autograd.grad(image, z, v, retain_graph=True)
        ratio = vjp.reshape(batch, -1).norm(dim=1)
        v = normalized(vjp)
    return ratio


def fixed_point_correction_loss(
    states: Sequence[Tensor], loss_fn: Callable[[Tensor], Tensor], *, gamma: float = 0.8
) -> Tensor:
    r"""Fixed-point correction loss over intermediate states (Bai et al., 2022, "Deep Equilibrium
    Optical Flow Estimation").

    .. math:: \mathcal L = \sum_{i=1}^{n} \gamma^{\,n - i}\, \ell(z_i),

    where :math:`z_1, \dots, z_n` are states along the solver's (or the phantom gradient's)
    trajectory, each carrying its own gradient, and :math:`\ell` is the task loss. Later states
    weigh more; the last has weight 1. It supervises the path to the fixed point, which corrects the
    bias of inexact gradients.

    Parameters
    ----------
    states : sequence of Tensor
        Intermediate states, earliest first (at least one).
    loss_fn : callable
        ``loss_fn(state) -> scalar Tensor``.
    gamma : float
        Decay in ``(0, 1]``.

    Returns
    -------
    Tensor
        The weighted sum.
    """
    states = list(states)
    if not states:
        raise ValueError("states must hold at least one state, got an empty sequence")
    gamma = check_real("gamma", gamma, low=0.0, low_open=True, high=1.0)
    n = len(states)
    # A loop rather than sum(), whose start value 0 would make the result an int to a type checker.
    total = gamma ** (n - 1) * loss_fn(states[0])
    for i in range(1, n):
        total = total + gamma ** (n - 1 - i) * loss_fn(states[i])
    return total
