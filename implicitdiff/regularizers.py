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
from torch.utils import _pytree as pytree

from ._tree import PyTree, tree_paths
from ._validate import check_bool, check_int, check_real

__all__ = ["fixed_point_correction_loss", "jacobian_frobenius", "spectral_radius"]


def _pair_leaves(image: PyTree, z: PyTree) -> tuple[list[Tensor], list[Tensor]]:
    """The leaves of ``image`` and ``z``, checked to match (a tensor each, or pytrees of one structure)."""
    if isinstance(image, Tensor) and isinstance(z, Tensor):
        images, states, paths = [image], [z], ["z"]
    else:
        paths, states, z_def = tree_paths(z, "z")
        images, image_def = pytree.tree_flatten(image)
        if image_def != z_def:
            raise ValueError(f"image must have the structure of z ({z_def}), got {image_def}")
    for path, out, state in zip(paths, images, states, strict=True):
        if not isinstance(out, Tensor) or not isinstance(state, Tensor):
            raise TypeError(
                f"image and z must be Tensors (or pytrees of them), got {type(out).__name__} and "
                f"{type(state).__name__} at {path}"
            )
        if out.shape != state.shape:
            raise ValueError(
                f"image must be shaped like z {tuple(state.shape)}, got {tuple(out.shape)} at {path}"
            )
        if not state.requires_grad or not out.requires_grad:
            raise ValueError(
                f"z must require grad and image must be f(z, x) computed from it with grad enabled ({path})"
            )
    return images, states


def _per_sample_sq(tensors: Sequence[Tensor], batch: int) -> Tensor:
    """``sum_i ||t_i[b]||^2`` over the leaves, per sample ``b``."""
    total = tensors[0].reshape(batch, -1).pow(2).sum(dim=1)
    for tensor in tensors[1:]:
        total = total + tensor.reshape(batch, -1).pow(2).sum(dim=1)
    return total


def _probes(images: Sequence[Tensor], generator: torch.Generator | None) -> list[Tensor]:
    return [torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device) for out in images]


def jacobian_frobenius(
    image: PyTree,
    z: PyTree,
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
    image : Tensor or pytree of Tensor
        ``f(z, x)``, computed with grad from ``z``, with ``z``'s structure.
    z : Tensor or pytree of Tensor
        The state, ``(B, ...)`` per leaf, requiring grad (usually the detached fixed point with
        ``requires_grad_()``). For a pytree, :math:`J` is the Jacobian of the whole state (every leaf
        with respect to every leaf) and :math:`d` the total size of a sample's leaves.
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
    images, states = _pair_leaves(image, z)
    n_samples = check_int("n_samples", n_samples, low=1)
    normalize = check_bool("normalize", normalize)
    create_graph = check_bool("create_graph", create_graph)
    batch = states[0].shape[0]
    total = images[0].new_zeros(batch)
    for i in range(n_samples):
        vjps = torch.autograd.grad(
            images,
            states,
            _probes(images, generator),
            retain_graph=create_graph or i < n_samples - 1,
            create_graph=create_graph,
        )
        total = total + _per_sample_sq(vjps, batch)
    estimate = total / n_samples
    return estimate / sum(state[0].numel() for state in states) if normalize else estimate


@torch.no_grad()
def spectral_radius(
    image: PyTree, z: PyTree, *, n_iter: int = 30, generator: torch.Generator | None = None
) -> Tensor:
    r"""Power-iteration estimate of the spectral radius :math:`\rho(J)` of :math:`J = \partial f/\partial z`.

    Iterates :math:`v \leftarrow v J / \|v J\|` by vector-Jacobian products (``J`` and
    :math:`J^\top` have the same eigenvalues) and returns :math:`\|v J\|` per sample. It converges
    to :math:`|\lambda_{\max}|` when one eigenvalue (or a conjugate pair of equal modulus, as a
    limit of the norm ratio) dominates; it is a diagnostic and carries no gradient.

    Parameters
    ----------
    image, z : Tensor or pytree of Tensor
        ``f(z, x)`` computed with grad from ``z`` (which requires grad), ``(B, ...)`` per leaf; for a
        pytree, the vector :math:`v` spans every leaf and its norm is taken over all of them.
    n_iter : int
        Power iterations.
    generator : torch.Generator, optional
        For the starting vector.

    Returns
    -------
    Tensor
        ``(B,)`` estimates.
    """
    images, states = _pair_leaves(image, z)
    n_iter = check_int("n_iter", n_iter, low=1)
    batch = states[0].shape[0]

    def normalized(v: Sequence[Tensor]) -> list[Tensor]:
        norm = _per_sample_sq(v, batch).sqrt().clamp_min(torch.finfo(v[0].dtype).tiny)
        return [leaf / norm.reshape(batch, *([1] * (leaf.dim() - 1))) for leaf in v]

    v = normalized(_probes(images, generator))
    ratio = images[0].new_zeros(batch)
    for _ in range(n_iter):
        vjps = torch.autograd.grad(images, states, v, retain_graph=True)
        ratio = _per_sample_sq(vjps, batch).sqrt()
        v = normalized(vjps)
    return ratio


def fixed_point_correction_loss(
    states: Sequence[PyTree], loss_fn: Callable[[PyTree], Tensor], *, gamma: float = 0.8
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
    states : sequence of Tensor or pytree
        Intermediate states, earliest first (at least one): ``out.states`` of a layer called with
        ``n_states``. A state may be a pytree; ``loss_fn`` receives it as it is.
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
