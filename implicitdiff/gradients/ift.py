"""Exact gradients by the implicit function theorem."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..solvers import Anderson, Solver, SolverResult
from ..solvers._base import check_solve_args
from ._implicit import implicit_attach

__all__ = ["IFT", "BackwardSolveError"]


class BackwardSolveError(RuntimeError):
    """The adjoint (backward) fixed-point solve of :class:`IFT` did not reach its tolerance."""


class IFT:
    r"""Exact gradients of a fixed point by the implicit function theorem (Bai et al., 2019).

    For :math:`z^\star = f(z^\star, x; \theta)` and a loss :math:`L(z^\star)`, with
    :math:`J = \partial f / \partial z` at :math:`z^\star`,

    .. math::

        \frac{\partial L}{\partial (x, \theta)} = u\,
        \frac{\partial f(z^\star, x; \theta)}{\partial (x, \theta)},
        \qquad u = u J + \frac{\partial L}{\partial z^\star},

    i.e. :math:`u = \partial L / \partial z^\star\, (I - J)^{-1}`. The adjoint fixed point is solved
    by ``solver``, any callable with the :class:`~implicitdiff.solvers.Solver` call, on the map
    :math:`u \mapsto u J + \partial L/\partial z^\star` (one vector-Jacobian product per evaluation),
    starting from :math:`\partial L/\partial z^\star` (the JFB estimate).

    The output is the node of one ``torch.autograd.Function`` whose inputs are the tensors ``f``
    depends on: ``x`` and tensor ``f_kwargs`` (given explicitly by the layer) and the leaves ``f``
    closes over (its parameters, found by walking the graph of one evaluation of ``f``). Therefore

    * a layer called several times in one graph differentiates each call independently (no hooks);
    * parameters receive their gradients through autograd's ordinary accumulation, so
      ``DistributedDataParallel`` reduces them as usual;
    * gradients follow autograd's grad mode, not ``module.training``;
    * ``create_graph=True`` gives exact higher derivatives: the backward is itself built from the
      same implicit machinery (the adjoint is the fixed point of a map differentiable in
      :math:`z^\star`, :math:`x` and :math:`\theta`).

    Memory between forward and backward is one evaluation of ``f`` with its graph, whatever the
    number of forward iterations.

    Parameters
    ----------
    solver : Solver, optional
        The backward solver; ``Anderson()`` by default.
    max_iter : int
        Cap on vector-Jacobian products in each backward solve.
    tol : float
        Tolerance of the backward solve (on :math:`\|u J + g - u\|` per sample for ``"abs"``).
    stop_mode : {"abs", "rel"}
        Absolute or relative residual.
    raise_on_failure : bool
        Raise :class:`BackwardSolveError` from ``backward()`` when a backward solve does not reach
        ``tol`` for some sample. Otherwise the gradient of the best iterate is used and the failure is
        visible in :attr:`last_backward`.
    on_backward : callable, optional
        Called with the :class:`~implicitdiff.solvers.SolverResult` of every backward solve (for
        logging; e.g. ``lambda r: writer.add_scalar("b_nfe", r.nfe)``).

    Attributes
    ----------
    last_backward : SolverResult or None
        Statistics (``nfe``, ``residual``, ``converged``, ``trace``) of the most recent backward
        solve; ``None`` before the first backward.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import DEQLayer, IFT, Picard
    >>> lin = torch.nn.Linear(4, 4)
    >>> ift = IFT(solver=Picard(), max_iter=100, tol=1e-8)
    >>> deq = DEQLayer(lambda z, x: torch.tanh(0.3 * lin(z) + x), grad=ift, tol=1e-8, max_iter=100)
    >>> deq(torch.randn(2, 4)).z.sum().backward()
    >>> ift.last_backward.all_converged
    True
    """

    def __init__(
        self,
        solver: Solver | None = None,
        max_iter: int = 50,
        tol: float = 1e-6,
        stop_mode: str = "abs",
        raise_on_failure: bool = False,
        on_backward: Callable[[SolverResult], None] | None = None,
    ) -> None:
        solver = Anderson() if solver is None else solver
        if not callable(solver):
            raise TypeError(f"solver must be callable like a Solver, got {type(solver).__name__}")
        check_solve_args(max_iter, tol, stop_mode)
        if not isinstance(raise_on_failure, bool):
            raise TypeError(f"raise_on_failure must be a bool, got {type(raise_on_failure).__name__}")
        if on_backward is not None and not callable(on_backward):
            raise TypeError(f"on_backward must be callable or None, got {type(on_backward).__name__}")
        self.solver = solver
        self.max_iter = max_iter
        self.tol = float(tol)
        self.stop_mode = stop_mode
        self.raise_on_failure = raise_on_failure
        self.on_backward = on_backward
        self.last_backward: SolverResult | None = None

    def __repr__(self) -> str:
        return (
            f"IFT(solver={self.solver!r}, max_iter={self.max_iter}, tol={self.tol}, "
            f"stop_mode={self.stop_mode!r})"
        )

    def forward_budget(self, max_iter: int, *, training: bool) -> int:
        """The forward cap, unchanged."""
        return max_iter

    def attach(self, f_x: Callable[[Tensor], Tensor], z_star: Tensor, *, training: bool) -> Tensor:
        """Attach ``z_star`` to autograd with the exact implicit gradient.

        ``f_x`` may expose ``explicit_inputs`` and ``with_inputs`` (the layer's maps do); a plain
        callable is differentiated with respect to the leaves its graph reaches.
        """
        explicit = tuple(getattr(f_x, "explicit_inputs", ()))
        with_inputs = getattr(f_x, "with_inputs", None)
        if explicit and with_inputs is not None:

            def phi(z: Tensor, *inputs: Tensor) -> Tensor:
                return with_inputs(*inputs)(z)

        else:
            explicit = ()

            def phi(z: Tensor) -> Tensor:
                return f_x(z)

        return implicit_attach(phi, z_star.detach(), explicit, self._solve)

    def _solve(self, vjp_map: Callable[[Tensor], Tensor], g: Tensor) -> SolverResult:
        result = self.solver(vjp_map, g, max_iter=self.max_iter, tol=self.tol, stop_mode=self.stop_mode)
        self.last_backward = result
        if self.on_backward is not None:
            self.on_backward(result)
        if self.raise_on_failure and not bool(result.converged.all()):
            bad = (~result.converged).nonzero().flatten().tolist()
            raise BackwardSolveError(
                f"IFT backward solve did not reach tol={self.tol} ({self.stop_mode}) within "
                f"max_iter={self.max_iter} for samples {bad[:10]}{' ...' if len(bad) > 10 else ''}: "
                f"{result.summary()}"
            )
        return result
