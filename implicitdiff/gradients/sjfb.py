"""Stochastic Jacobian-free backpropagation (FPDM)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._compile import outside_compile
from .._validate import check_int

__all__ = ["SJFB"]

#: The seeds ``torch.Generator.manual_seed`` accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _check_range(name: str, value: object, low: int) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair of ints (low, high), got {value!r}")
    lo, hi = (check_int(f"{name}[{i}]", v) for i, v in enumerate(value))
    if lo < low or lo > hi:
        raise ValueError(
            f"{name} must be an inclusive range (low, high) with {low} <= low <= high, got {(lo, hi)}"
        )
    return lo, hi


class SJFB:
    r"""Stochastic Jacobian-free backpropagation, the training scheme of the Fixed Point Diffusion
    Model (Bai & Melas-Kyriazi, 2024, "Fixed Point Diffusion Models").

    In training, each call draws :math:`n_{\text{nograd}} \sim U\{a, b\}` (``no_grad_iters``) and
    :math:`n_{\text{grad}} \sim U\{c, d\}` (``grad_iters``), inclusive, then

    .. math::

        z_0 \xrightarrow{\ n_{\text{nograd}}\ \text{solver iterations, no grad}\ } z^\star
        \xrightarrow{\ n_{\text{grad}}\ \text{steps}\ z \leftarrow f(z, x)\ \text{with grad}\ }
        z_{\text{out}},

    so the gradient is that of :math:`n_{\text{grad}}` unrolled steps from a detached point (JFB when
    :math:`n_{\text{grad}} = 1`). The no-grad iterations use the layer's solver (with ``Picard()`` they
    are plain fixed-point steps); a draw of 0 starts the differentiable steps from ``z0``.
    Out of training (``training=False``) the forward solve gets the full ``max_iter`` and the gradient
    is JFB.

    The draws come from a CPU ``torch.Generator`` owned by the estimator and seeded by ``seed``, so
    every DDP rank constructed with the same seed draws the same numbers (and runs the same number of
    iterations). Save and restore it with :meth:`state_dict` / :meth:`load_state_dict` for exact resume.

    Parameters
    ----------
    no_grad_iters : tuple of int
        Inclusive range ``(low, high)`` with ``0 <= low <= high``.
    grad_iters : tuple of int
        Inclusive range ``(low, high)`` with ``1 <= low <= high``.
    seed : int
        Seed of the estimator's generator.
    """

    #: The layer starts the differentiable steps from the image ``g(z)`` of the solver's iterate, which
    #: the solver computed already: ``n`` no-grad evaluations are ``n`` steps, as in the paper.
    starts_from_image = True

    def __init__(
        self, no_grad_iters: tuple[int, int] = (0, 6), grad_iters: tuple[int, int] = (1, 3), seed: int = 0
    ) -> None:
        self.no_grad_iters = _check_range("no_grad_iters", no_grad_iters, 0)
        self.grad_iters = _check_range("grad_iters", grad_iters, 1)
        self.seed = check_int("seed", seed, low=SEED_RANGE[0], high=SEED_RANGE[1])
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        #: The most recent draws, for logging: ``(n_nograd, n_grad)``; ``None`` before a draw.
        self.last_draw: tuple[int | None, int | None] = (None, None)

    def __repr__(self) -> str:
        return f"SJFB(no_grad_iters={self.no_grad_iters}, grad_iters={self.grad_iters}, seed={self.seed})"

    def _draw(self, bounds: tuple[int, int]) -> int:
        lo, hi = bounds
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator).item())

    # Both draws run outside torch.compile: a drawn number of iterations would otherwise be a guard
    # of the compiled graph, and each new draw a recompilation.
    @outside_compile
    def forward_budget(self, max_iter: int, *, training: bool) -> int:
        """In training, a drawn number of no-grad iterations (at most ``max_iter``); else ``max_iter``."""
        if not training:
            return max_iter
        n_nograd = self._draw(self.no_grad_iters)
        self.last_draw = (n_nograd, None)
        return min(n_nograd, max_iter)

    @outside_compile
    def attach(self, f_x: Callable[[Tensor], Tensor], z_star: Tensor, *, training: bool) -> Tensor:
        """In training, a drawn number of differentiable steps from ``z_star``; else one (JFB)."""
        n_grad = 1
        if training:
            n_grad = self._draw(self.grad_iters)
            self.last_draw = (self.last_draw[0], n_grad)
        z = z_star.detach()
        for _ in range(n_grad):
            z = f_x(z)
        return z

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (and the seed), for checkpoints."""
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator saved by :meth:`state_dict`."""
        if not isinstance(state, dict) or "generator" not in state:
            raise TypeError(f"state must be a dict from SJFB.state_dict(), got {type(state).__name__}")
        self.seed = int(state.get("seed", self.seed))
        self.generator.set_state(state["generator"])
