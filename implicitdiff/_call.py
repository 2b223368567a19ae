"""One call of an implicit layer: the no-grad solve, the estimator's attachment, the intermediate states."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._boundmap import BoundMap, autocast_on
from ._compile import compiling, outside_compile
from ._onefunction import Held
from ._start import initial_state
from ._tree import PyTree, tensor_leaves
from ._validate import forward_mode_active, has_tangent, refuse_functorch
from .gradients import GradientEstimator
from .gradients._base import StartsFromImage
from .solvers import Solver, SolverResult

__all__ = ["Call", "Solved"]


class Solved(NamedTuple):
    """What a call returns (the fields of :class:`~implicitdiff.DEQOutput`, in its order)."""

    z: PyTree
    stats: SolverResult
    grad_evals: int
    states: list[PyTree] | None


def needs_grad(f: Callable[..., Any], x: PyTree, f_kwargs: Mapping[str, Any]) -> bool:
    """Whether autograd will want a derivative out of the solution.

    For an ``nn.Module`` we can look at its parameters; for any other callable we cannot see what it
    closes over, so we assume it may need one whenever grad mode is on. An input (or parameter) that
    carries a forward-mode tangent wants one whatever the grad mode: ``no_grad`` does not stop forward
    mode.
    """
    inputs = [x] if isinstance(x, Tensor) and not f_kwargs else tensor_leaves((x, tuple(f_kwargs.values())))
    if forward_mode_active() and any(has_tangent(t) for t in (*inputs, *_parameters(f))):
        return True
    if not torch.is_grad_enabled():
        return False
    if any(t.requires_grad for t in inputs) or not isinstance(f, nn.Module):
        return True
    return any(p.requires_grad for p in f.parameters())


def _parameters(f: Callable[..., Any]) -> list[Tensor]:
    return list(f.parameters()) if isinstance(f, nn.Module) else []


class Trajectory:
    """A map that keeps evenly spaced copies of the points it is evaluated at: at most ``2 * keep``.

    Every ``stride``-th point is copied; when more than ``2 * keep`` are held, every other one is
    dropped and the stride doubles, so the points stay evenly spaced over a solve of unknown length.
    """

    #: Why :class:`~implicitdiff.solvers.Captured` cannot replay a solve of this map.
    capture_refusal = (
        "the intermediate states (n_states) are copied by Python code at every evaluation of f, which a "
        "replayed graph would skip; ask for n_states=None to capture the solve"
    )

    def __init__(self, g: Callable[[Tensor], Tensor], keep: int) -> None:
        self.g, self.keep = g, keep
        self.points: list[Tensor] = []
        self.stride, self.seen = 1, 0

    def __call__(self, z: Tensor) -> Tensor:
        if self.seen % self.stride == 0:
            self.points.append(z.detach().clone())
            if len(self.points) > 2 * self.keep:
                self.points = self.points[::2]
                self.stride *= 2
        self.seen += 1
        return self.g(z)

    def spread(self) -> list[Tensor]:
        """At most ``keep`` of the points, evenly spaced, earliest first."""
        count = len(self.points)
        if count <= self.keep:
            return list(self.points)
        picks = sorted({round(i * (count - 1) / max(self.keep - 1, 1)) for i in range(self.keep)})
        return [self.points[i] for i in picks]


class Call:
    """One call of the layer (or of ``fixed_point``) on checked arguments."""

    def __init__(
        self,
        f: Callable[..., Any],
        x: PyTree,
        solver: Solver,
        grad: GradientEstimator,
        training: bool,
        f_kwargs: dict[str, Any],
        n_states: int | None,
    ) -> None:
        self.f, self.x, self.solver, self.grad = f, x, solver, grad
        self.training, self.f_kwargs, self.n_states = training, f_kwargs, n_states
        self.held: Held | None = None
        # Decided once per call (for a module it walks the parameters): the weights computed for the
        # call and the estimator both follow it.
        self.needs_grad = needs_grad(f, x, f_kwargs)

    def run(
        self,
        z0: PyTree | None,
        max_iter: int,
        tol: float | None,
        stop_mode: str,
        check_every: int | None,
        raise_on_nonfinite: bool,
    ) -> Solved:
        """Solve from ``z0``, attach the solution, and collect the intermediate states."""
        z_init, spec = initial_state(self.x, z0)
        f_x = BoundMap(self.f, self.x, z_init, self.f_kwargs, spec=spec, held=self.held or None)
        wanted = 0 if self.n_states is None else self.n_states - 1  # states before z
        trajectory = Trajectory(f_x, wanted) if wanted else None
        stats, start = self.solve(trajectory or f_x, z_init, max_iter, tol, stop_mode, check_every)
        _check_finite(stats, raise_on_nonfinite)
        # Counted from zero (not from the solve's count): under torch.compile a count that differs
        # from call to call would be a guard of the compiled graph.
        f_x.reset_calls()
        z = self.attach(f_x, stats, start) if self.needs_grad else stats.z.detach()
        z_out = z if spec is None else spec.unpack(z)
        states = None
        if self.n_states is not None:
            with torch.set_grad_enabled(z.requires_grad):
                steps = [f_x(point) for point in trajectory.spread()] if trajectory else []
            states = [*(step if spec is None else spec.unpack(step) for step in steps), z_out]
        return Solved(z_out, stats, f_x.calls, states)

    @outside_compile
    def solve(
        self,
        g: Callable[[Tensor], Tensor],
        z_init: Tensor,
        max_iter: int,
        tol: float | None,
        stop_mode: str,
        check_every: int | None,
    ) -> tuple[SolverResult, Tensor]:
        """The estimator's budget and the no-grad solve; the statistics and where the estimator starts.

        Outside ``torch.compile``: a drawn budget or a data-dependent number of iterations would be a
        guard of the compiled graph, and each new one a recompilation.
        """
        refuse_functorch(
            "a DEQ solve",
            [z_init],
            "its loop decides per sample when to stop and reads flags from the device; samples are "
            "already batched along dim 0, so call it on the batch instead of mapping over it",
            vmap_only=True,
        )
        budget = self.grad.forward_budget(max_iter, training=self.training)
        if budget == 0:
            # An estimator may ask for no forward iterations at all (S-JFB draws 0 sometimes): start
            # from z0 unsolved; its residual is unknown, so it is reported as not converged.
            return _unsolved(z_init), z_init.detach()
        options: dict[str, Any] = {"max_iter": budget, "tol": tol, "stop_mode": stop_mode}
        if check_every is not None:
            options["check_every"] = check_every
        with torch.no_grad():
            stats = self.solver(g, z_init, **options)
        _check_returned(self.solver, stats, z_init)
        grad = self.grad
        if isinstance(grad, StartsFromImage) and grad.starts_from_image and stats.fz is not None:
            # An estimator that continues the iteration with grad (S-JFB) starts from g(stats.z), which
            # the solver computed already: n no-grad evaluations then give n steps, none evaluated twice.
            return stats, stats.fz.detach()
        return stats, stats.z.detach()

    def attach(self, f_x: BoundMap, stats: SolverResult, start: Tensor) -> Tensor:
        """The estimator's graph from ``start`` (detached) to the inputs and ``f``'s parameters."""
        if not compiling() and autocast_on(start.device.type) and stats.nfe > 0:
            # Autocast caches the low-precision copies of the weights; before torch 2.5 a copy made in the
            # no-grad solve is reused by the estimator's evaluation with grad, which then has no graph back
            # to the weights. Only a gradient needs the cache cleared.
            torch.clear_autocast_cache()
        return self.grad.attach(f_x, start, training=self.training)


def _check_returned(solver: Solver, stats: object, z_init: Tensor) -> None:
    """A clear error, naming the solver, when what it returned is not a solution of the state's kind."""
    if not isinstance(stats, SolverResult):
        raise TypeError(f"solver {solver!r} must return a SolverResult, got {type(stats).__name__}")
    want = f"{tuple(z_init.shape)} {z_init.dtype} on {z_init.device}"
    for name, value in (("z", stats.z), ("fz", stats.fz)):
        if name == "fz" and value is None:
            continue  # fz is optional
        if not isinstance(value, Tensor):
            raise TypeError(
                f"solver {solver!r} returned a SolverResult whose {name} is {type(value).__name__}"
            )
        if value.shape != z_init.shape or value.dtype != z_init.dtype or value.device != z_init.device:
            raise ValueError(
                f"solver {solver!r} returned {name} {tuple(value.shape)} {value.dtype} on {value.device}; "
                f"a solver returns the shape, dtype and device of the z0 it was given ({want})"
            )


def _unsolved(z0: Tensor) -> SolverResult:
    batch = z0.shape[0]
    return SolverResult(
        z=z0,
        residual=torch.full((batch,), float("inf"), device=z0.device),
        converged=torch.zeros(batch, dtype=torch.bool, device=z0.device),
        nfe=0,
        evaluations=torch.zeros(batch, dtype=torch.long, device=z0.device),
    )


def _check_finite(stats: SolverResult, raise_on_nonfinite: bool) -> None:
    nonfinite = stats.nonfinite
    if raise_on_nonfinite and nonfinite is not None and bool(nonfinite.any()):
        bad = torch.nonzero(nonfinite).flatten().tolist()
        raise FloatingPointError(
            f"f returned non-finite values during the forward solve for samples {bad[:10]}"
            + (" ..." if len(bad) > 10 else "")
        )
