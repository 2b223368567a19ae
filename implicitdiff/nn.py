r"""Modules for the inside of ``f``: dropout that keeps one mask for the length of a solve.

A fixed point :math:`z^\star = f(z^\star, x)` exists only if ``f`` is one function while it is solved.
Ordinary dropout (``nn.Dropout``) draws a new mask at every evaluation, so in training mode ``f``
changes at every iteration of the solver: there is no fixed point to find, the residual stalls at the
size of the dropout noise, and the estimator's evaluations see yet other masks. *Variational* dropout
(Gal & Ghahramani, 2016), as the DEQ models use it (Bai et al., 2019), draws the mask once and holds it:
here once per forward call of the implicit layer, for every evaluation of that call's solve, its
gradient estimator and :class:`~implicitdiff.IFT`'s backward. (IFT's first-order backward reuses the
graph built in the call; its double backward, ``create_graph=True``, evaluates ``f`` again and sees
the mask the module holds then: run it before the layer's next call.)

:class:`~implicitdiff.DEQLayer` and :func:`~implicitdiff.fixed_point` call :meth:`VariationalDropout.reset`
on every instance inside ``f`` (when ``f`` is an ``nn.Module``) at the start of each call; the module
draws its mask lazily at its first evaluation, with the shape of its input. For an ``f`` that is a plain
function closing over modules the layer cannot see them: call :func:`reset_masks` yourself before each
call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._onefunction import PerCall
from ._onefunction import forget as forget_parts
from ._validate import check_int, check_real

__all__ = ["VariationalDropout", "VariationalDropout2d", "forget", "reset_masks"]


class VariationalDropout(PerCall):
    r"""Dropout with one mask per implicit-layer call, shared along all dimensions but two.

    In training mode the output is :math:`y = m \odot x / (1 - p)` with :math:`m_{b,c} \sim
    \text{Bernoulli}(1 - p)` drawn once per call of the layer, for sample :math:`b` and channel
    :math:`c` (the dimension ``channel_dim``), and shared along every other dimension (the tokens or
    positions of a sequence, the pixels of a feature map). In eval mode, or with ``p = 0``, it is the
    identity.

    Parameters
    ----------
    p : float
        Probability of dropping a channel, in ``[0, 1)``.
    channel_dim : int
        The dimension whose entries get their own mask value: ``-1`` for tokens ``(B, ..., C)``, ``1``
        for ``(B, C, L)`` or ``(B, C, H, W)`` (see :class:`VariationalDropout2d`).

    Examples
    --------
    >>> import torch
    >>> drop = VariationalDropout(0.5)
    >>> x = torch.ones(2, 3, 4)              # (B, L, C): one mask value per (sample, channel)
    >>> y1, y2 = drop(x), drop(x)            # the same mask until reset()
    >>> bool((y1 == y2).all()), bool((y1[:, 0] == y1[:, 1]).all())
    (True, True)
    """

    def __init__(self, p: float = 0.1, channel_dim: int = -1) -> None:
        super().__init__()
        self.p = check_real("p", p, low=0.0, high=1.0, high_open=True)
        self.channel_dim = check_int("channel_dim", channel_dim)
        if channel_dim == 0:
            raise ValueError("channel_dim must not be 0, the batch dimension")
        self.mask: Tensor | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, channel_dim={self.channel_dim}"

    def reset(self) -> None:
        """Forget the mask: the next evaluation in training mode draws a new one."""
        self.mask = None

    def mask_shape(self, shape: torch.Size) -> tuple[int, ...]:
        """The mask's shape for an input of ``shape``: its batch and channel sizes, 1 elsewhere."""
        if len(shape) < 2:
            raise ValueError(f"VariationalDropout needs an input (B, ..., C) of 2 or more dims, got {shape}")
        channel = self.channel_dim % len(shape)
        if channel == 0:
            raise ValueError(f"channel_dim={self.channel_dim} is the batch dimension of an input {shape}")
        return tuple(size if dim in (0, channel) else 1 for dim, size in enumerate(shape))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = self.mask_shape(x.shape)
        mask = self.mask
        if mask is None or mask.device != x.device:
            keep = torch.full(shape, 1.0 - self.p, device=x.device)
            mask = torch.bernoulli(keep).div_(1.0 - self.p)
            self.mask = mask
        elif tuple(mask.shape) != shape:
            raise ValueError(
                f"VariationalDropout holds a mask of shape {tuple(mask.shape)} but got an input "
                f"{tuple(x.shape)} (mask {shape}): the input changed shape within one solve, or the mask "
                "was not reset between calls (call implicitdiff.nn.reset_masks(f) when f is not a module "
                "the layer can see)"
            )
        return x * mask.to(x.dtype)


class VariationalDropout2d(VariationalDropout):
    r"""Channel-wise :class:`VariationalDropout` for feature maps ``(B, C, H, W)``: one mask value per
    sample and channel, shared over the pixels, held for the length of an implicit-layer call."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__(p, channel_dim=1)


def reset_masks(module: nn.Module) -> int:
    """Reset every :class:`VariationalDropout` inside ``module``; returns how many were reset.

    The layer does this itself when ``f`` is an ``nn.Module``; call it before each call when ``f`` is a
    plain function that closes over modules.
    """
    found = [m for m in module.modules() if isinstance(m, VariationalDropout)]
    for m in found:
        m.reset()
    return len(found)


def forget(f: nn.Module) -> None:
    """Make the layer look at ``f``'s modules again at its next call.

    The layer walks ``f.modules()`` once, at the first call with that ``f``, for the parametrized
    weights it computes once per call and the dropout modules it resets or warns about; call this after
    adding or removing submodules of ``f``.
    """
    forget_parts(f)
