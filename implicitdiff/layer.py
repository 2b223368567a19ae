"""``DEQLayer``: a deep equilibrium layer as an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor, nn

from ._validate import check_bool, check_int
from .functional import DEQOutput, check_parts, solve_and_attach
from .gradients import JFB, GradientEstimator
from .solvers import Anderson, Solver
from .solvers._base import check_solve_args

__all__ = ["DEQLayer"]


class DEQLayer(nn.Module):
    r"""An implicit layer: its output is the fixed point :math:`z^\star = f(z^\star, x)`.

    How :math:`z^\star` is found (the ``solver``) and how gradients pass through it (the ``grad``
    estimator) are independent choices, swapped by passing other objects.

    Parameters
    ----------
    f : nn.Module or callable
        ``f(z, x, **kwargs) -> z``. If it is a module it is registered as a submodule, so its
        parameters belong to the layer.
    solver : Solver, optional
        Any callable with the :class:`~implicitdiff.solvers.Solver` call; ``Anderson()`` by default.
    grad : GradientEstimator, optional
        ``JFB()`` by default.
    max_iter : int
        Default cap on evaluations of ``f`` in the forward solve.
    tol : float or None
        Default tolerance of the forward solve; ``None`` is a fixed budget of ``max_iter`` evaluations
        with no host reads (see :func:`~implicitdiff.solvers.iterate`).
    stop_mode : {"abs", "rel"}
        Absolute or relative residual.
    check_every : int, optional
        How often the solver's host reads "all converged?" in tolerance mode; the solver's default
        when not given.
    raise_on_nonfinite : bool
        Raise :class:`FloatingPointError` when ``f`` produces a non-finite value.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import DEQLayer, Anderson, JFB
    >>> lin = torch.nn.Linear(8, 8)
    >>> f = lambda z, x: torch.tanh(0.5 * lin(z) + x)
    >>> deq = DEQLayer(f, solver=Anderson(m=5), grad=JFB(), max_iter=50, tol=1e-6)
    >>> out = deq(torch.randn(4, 8))
    >>> out.z.shape, bool(out.stats.converged.all())
    (torch.Size([4, 8]), True)
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        *,
        solver: Solver | None = None,
        grad: GradientEstimator | None = None,
        max_iter: int = 30,
        tol: float | None = 1e-4,
        stop_mode: str = "abs",
        check_every: int | None = None,
        raise_on_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be an nn.Module or a callable f(z, x), got {type(f).__name__}")
        self.f = f
        self.solver = Anderson() if solver is None else solver
        self.grad = JFB() if grad is None else grad
        check_parts(self.solver, self.grad)
        self.max_iter, self.tol, self.stop_mode, _ = check_solve_args(max_iter, tol, stop_mode, check_every)
        self.check_every = check_every
        self.raise_on_nonfinite = check_bool("raise_on_nonfinite", raise_on_nonfinite)

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, grad={self.grad!r}, max_iter={self.max_iter}, tol={self.tol}, "
            f"stop_mode={self.stop_mode!r}"
        )

    def forward(
        self,
        x: Tensor,
        z0: Tensor | None = None,
        *,
        max_iter: int | None = None,
        tol: float | Literal["layer"] | None = "layer",
        solver: Solver | None = None,
        **f_kwargs: Any,
    ) -> DEQOutput:
        """Solve for the fixed point.

        Parameters
        ----------
        x : Tensor
            Input injection ``(B, ...)``.
        z0 : Tensor, optional
            Starting point (warm start); zeros shaped like ``x`` by default.
        max_iter, tol, solver : optional
            Override the layer's defaults for this call only (a sampler gives each diffusion step
            its own compute this way). ``tol=None`` asks for a fixed budget; ``"layer"`` (the default)
            keeps the layer's tolerance.
        **f_kwargs
            Passed on to ``f`` as keyword arguments.

        Returns
        -------
        DEQOutput
            ``out.z`` (the solution) and ``out.stats`` (the forward solve's statistics).
        """
        # The defaults were checked at construction; an override is checked here, once per call (the
        # solver checks the tolerance it is given).
        if max_iter is not None:
            max_iter = check_int("max_iter", max_iter, low=1)
        if solver is not None:
            check_parts(solver, self.grad)
        return solve_and_attach(
            self.f,
            x,
            z0,
            solver=self.solver if solver is None else solver,
            grad=self.grad,
            max_iter=self.max_iter if max_iter is None else max_iter,
            tol=self.tol if isinstance(tol, str) and tol == "layer" else tol,
            stop_mode=self.stop_mode,
            check_every=self.check_every,
            training=self.training,
            raise_on_nonfinite=self.raise_on_nonfinite,
            f_kwargs=f_kwargs,
        )
