"""Exact gradients by the implicit function theorem."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor

from .._compile import compiling, outside_compile
from .._validate import (
    check_int,
    check_real,
    forward_mode_active,
    has_tangent,
    refuse_class,
    refuse_functorch,
)
from ..solvers import Anderson, Solver, SolverResult
from ..solvers._base import check_stop_mode
from ._base import ExplicitInputs
from ._implicit import NO_FORWARD_MODE, implicit_attach

__all__ = ["IFT", "BackwardSolveError", "BackwardSolveWarning"]

#: What :class:`IFT` does when a backward solve misses its tolerance.
ON_FAILURE = ("warn", "raise", "ignore")


class BackwardSolveError(RuntimeError):
    """The adjoint (backward) fixed-point solve of :class:`IFT` did not reach its tolerance."""


class BackwardSolveWarning(RuntimeWarning):
    """The adjoint (backward) fixed-point solve of :class:`IFT` did not reach its tolerance.

    The gradient was computed from the solve's best iterate and may be far from the exact one (even
    of the wrong sign when the spectral radius of the Jacobian is above 1). Turn it into an error
    with ``IFT(on_failure="raise")`` or ``warnings.simplefilter("error", BackwardSolveWarning)``,
    or silence it with ``IFT(on_failure="ignore")``.
    """


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
    on_failure : {"warn", "raise", "ignore"}
        What to do when a backward solve does not reach ``tol`` for some sample (the gradient is then
        that of the solve's best iterate, which can be arbitrarily wrong):

        * ``"warn"`` (default): emit a :class:`BackwardSolveWarning` with the number of samples not
          converged, the largest residual, ``tol`` and the evaluations used;
        * ``"raise"``: raise :class:`BackwardSolveError` from ``backward()``;
        * ``"ignore"``: say nothing (the failure is still in :attr:`last_backward`).

        Unlike the forward solve, which reports ``out.stats.converged`` to the caller, the backward
        solve runs inside ``backward()`` where nobody looks at a return value, hence a warning.
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
    >>> ift = IFT(solver=Picard(), max_iter=100, tol=1e-6)  # well above float32's rounding
    >>> deq = DEQLayer(lambda z, x: torch.tanh(0.3 * lin(z) + x), grad=ift, tol=1e-6, max_iter=100)
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
        on_failure: str = "warn",
        on_backward: Callable[[SolverResult], None] | None = None,
    ) -> None:
        solver = Anderson() if solver is None else solver
        refuse_class("solver", solver)
        if not callable(solver):
            raise TypeError(f"solver must be callable like a Solver, got {type(solver).__name__}")
        if on_backward is not None and not callable(on_backward):
            raise TypeError(f"on_backward must be callable or None, got {type(on_backward).__name__}")
        self.solver = solver
        self.max_iter = check_int("max_iter", max_iter, low=1)
        self.tol = check_real("tol", tol, low=0.0, low_open=True)
        self.stop_mode = check_stop_mode(stop_mode)
        if not isinstance(on_failure, str) or on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        self.on_failure = on_failure
        self.on_backward = on_backward
        self.last_backward: SolverResult | None = None

    def __repr__(self) -> str:
        return (
            f"IFT(solver={self.solver!r}, max_iter={self.max_iter}, tol={self.tol}, "
            f"stop_mode={self.stop_mode!r}, on_failure={self.on_failure!r})"
        )

    def forward_budget(self, max_iter: int, *, training: bool) -> int:
        """The forward cap, unchanged."""
        return max_iter

    @outside_compile
    def attach(self, f_x: Callable[[Tensor], Tensor], z_star: Tensor, *, training: bool) -> Tensor:
        """Attach ``z_star`` to autograd with the exact implicit gradient.

        ``f_x`` may say which tensors it receives (:class:`~implicitdiff.gradients.ExplicitInputs`, as
        the layer's maps do); a plain callable is differentiated with respect to the leaves its graph
        reaches.

        It runs outside ``torch.compile`` (like the solve) and evaluates a compiled ``f`` eagerly: the
        backward differentiates this one evaluation's graph once per adjoint iteration, which a
        compiled backward may refuse (its saved buffers donated to a single use).
        """
        if not compiling():
            inputs = [z_star, *(f_x.inputs if isinstance(f_x, ExplicitInputs) else ())]
            refuse_functorch(
                "IFT",
                inputs,
                "its backward walks the autograd graph of f; use torch.autograd.grad or .backward(), or "
                "JFB and PhantomGradient, which work under torch.func",
            )
            if forward_mode_active() and any(has_tangent(t) for t in inputs):
                raise RuntimeError(NO_FORWARD_MODE)
        if isinstance(f_x, ExplicitInputs) and f_x.inputs:
            bound = f_x
            explicit = bound.inputs

            def phi(z: Tensor, *inputs: Tensor) -> Tensor:
                return bound.with_inputs(*inputs)(z)

        else:
            explicit = ()

            def phi(z: Tensor, *inputs: Tensor) -> Tensor:
                return f_x(z)

        return implicit_attach(phi, z_star.detach(), explicit, self._solve)

    def _solve(self, vjp_map: Callable[[Tensor], Tensor], g: Tensor) -> SolverResult:
        result = self.solver(vjp_map, g, max_iter=self.max_iter, tol=self.tol, stop_mode=self.stop_mode)
        self.last_backward = result
        if self.on_backward is not None:
            self.on_backward(result)
        if self.on_failure == "ignore" or bool(result.converged.all()):
            return result
        bad = (~result.converged).nonzero().flatten().tolist()
        message = (
            f"IFT backward solve did not reach tol={self.tol:g} ({self.stop_mode}) within "
            f"max_iter={self.max_iter}: {len(bad)}/{result.converged.numel()} samples not converged "
            f"(samples {bad[:10]}{' ...' if len(bad) > 10 else ''}), max residual "
            f"{float(result.residual.max()):.3e}, nfe {result.nfe}"
        )
        nonfinite = result.nonfinite
        if nonfinite is not None and bool(nonfinite.any()):
            message += f", non-finite values in {int(nonfinite.sum())} samples"
        if self.on_failure == "raise":
            raise BackwardSolveError(message)
        warnings.warn(
            message + ". The gradient comes from the best iterate and may be wrong (the Jacobian of f "
            "may have spectral radius near or above 1: see implicitdiff.regularizers.spectral_radius). "
            "Raise IFT's max_iter or loosen its tol, or pass on_failure='raise' or 'ignore'.",
            BackwardSolveWarning,
            stacklevel=1,  # our callers are autograd's engine and our own code: point at the check
        )
        return result
