"""``fixed_point``: an implicit layer's machinery as a function."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._validate import check_bool, check_int
from .gradients import JFB, GradientEstimator
from .gradients._base import StartsFromImage
from .solvers import Anderson, Solver, SolverResult
from .solvers._driver import compiling, outside_compile

__all__ = ["BoundMap", "DEQOutput", "fixed_point"]


@dataclass
class DEQOutput:
    """The output of an implicit layer.

    Attributes
    ----------
    z : Tensor
        The fixed point, attached to autograd by the gradient estimator when a gradient is needed.
        Without a gradient, and with :class:`~implicitdiff.IFT`, it is the solver's iterate ``stats.z``,
        the one ``stats.residual`` describes. Estimators that differentiate through applications of
        ``f`` return those applications: :class:`~implicitdiff.JFB` returns ``f(stats.z)`` (equal in
        value to ``stats.fz``), :class:`~implicitdiff.PhantomGradient` ``k`` damped steps from
        ``stats.z``. An estimator with ``starts_from_image = True`` (:class:`~implicitdiff.SJFB`, which
        continues the solver's iteration) starts from ``stats.fz`` instead.
    stats : SolverResult
        Statistics of the forward solve: ``z``, ``residual``, ``converged``, ``nfe``, ``trace``,
        ``nonfinite``, and ``fz = f(stats.z)``, which the solver computed already (one step further for
        a contraction, free to use, but its residual is unknown).
    grad_evals : int
        Evaluations of ``f`` made while attaching the gradient (JFB: 1, IFT: 1, phantom gradient and
        S-JFB: their steps); ``0`` when no gradient was built. With ``stats.nfe`` it gives the cost of
        the call; the backward pass of IFT adds ``grad.last_backward.nfe`` vector-Jacobian products.
    """

    z: Tensor
    stats: SolverResult
    grad_evals: int = 0


def _needs_grad(f: Callable[..., Tensor], x: Tensor, f_kwargs: Mapping[str, Any]) -> bool:
    """Whether autograd will want a gradient out of the solution.

    For an ``nn.Module`` we can look at its parameters; for any other callable we cannot see what it
    closes over, so we assume it may need one whenever grad mode is on.
    """
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or any(isinstance(v, Tensor) and v.requires_grad for v in f_kwargs.values()):
        return True
    if isinstance(f, nn.Module):
        return any(p.requires_grad for p in f.parameters())
    return True


def _autocast_on(device_type: str) -> bool:
    return bool(torch.is_autocast_enabled(device_type))


class BoundMap:
    """``z -> f(z, x, **f_kwargs)`` with the inputs bound, checking each output against the state ``z0``.

    The state keeps ``z0``'s dtype. Under ``torch.autocast`` an ``f`` ending in a matrix product returns
    the autocast dtype (bfloat16, float16); its output is cast back to the state's dtype (differentiably),
    so the solver and every estimator work on states of one dtype. Outside autocast another dtype is an
    error. Every call adds one to :attr:`calls`.

    An estimator that differentiates with respect to the inputs explicitly (:class:`~implicitdiff.IFT`)
    reads :attr:`inputs` (``x`` and the tensors in ``f_kwargs``, in that order) and calls
    :meth:`with_inputs` for the same map on other tensors.
    """

    def __init__(
        self, f: Callable[..., Tensor], x: Tensor, z0: Tensor, f_kwargs: Mapping[str, Any], counter: list[int]
    ) -> None:
        self.f, self.x, self.z0 = f, x, z0
        # Kept as a tuple of pairs: dynamo before torch 2.5 fails to guard a dict that it also sees in the
        # caller's frame.
        self._items = tuple(f_kwargs.items())
        self._tensor_keys = tuple(key for key, value in self._items if isinstance(value, Tensor))
        self._counter = counter
        self._name = getattr(f, "__name__", type(f).__name__)

    @property
    def calls(self) -> int:
        """Evaluations of ``f`` by this map and every map made from it by :meth:`with_inputs`."""
        return self._counter[0]

    def reset_calls(self) -> None:
        """Start :attr:`calls` from zero again."""
        self._counter[0] = 0

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        """The tensors ``f`` receives explicitly: ``x``, then the tensors of ``f_kwargs``."""
        kwargs = dict(self._items)
        return (self.x, *(kwargs[key] for key in self._tensor_keys))

    def with_inputs(self, *tensors: Tensor) -> BoundMap:
        """The same map with :attr:`inputs` replaced by ``tensors`` (same order)."""
        kwargs = {**dict(self._items), **dict(zip(self._tensor_keys, tensors[1:], strict=True))}
        return BoundMap(self.f, tensors[0], self.z0, kwargs, self._counter)

    def __call__(self, z: Tensor) -> Tensor:
        z0 = self.z0
        out = self.f(z, self.x, **dict(self._items)) if self._items else self.f(z, self.x)
        self._counter[0] += 1
        if not isinstance(out, Tensor):
            raise TypeError(f"f ({self._name}) must return a Tensor, got {type(out).__name__}")
        if (
            out.dtype != z0.dtype
            and out.dtype.is_floating_point
            and out.device == z0.device
            and _autocast_on(out.device.type)
        ):
            out = out.to(z0.dtype)
        if out.shape != z0.shape:
            raise ValueError(
                f"f ({self._name}) must return a tensor shaped like z {tuple(z0.shape)}, got shape "
                f"{tuple(out.shape)}. If the state is not shaped like x, pass z0."
            )
        if out.dtype != z0.dtype or out.device != z0.device:
            raise ValueError(
                f"f ({self._name}) must return a tensor of the state's dtype and device ({z0.dtype} on "
                f"{z0.device}), got {out.dtype} on {out.device}. The state takes the dtype of z0 (of "
                "x when z0 is not given): pass a z0 of the dtype f computes in, or cast f's output; "
                "under torch.autocast the output is cast back for you."
            )
        return out


def check_parts(solver: object, grad: object) -> None:
    """A ``TypeError`` unless ``solver`` is callable and ``grad`` is a gradient estimator."""
    if not callable(solver):
        raise TypeError(f"solver must be callable like a Solver, got {type(solver).__name__}")
    if not isinstance(grad, GradientEstimator):
        raise TypeError(
            f"grad must be a gradient estimator with forward_budget() and attach(), got {type(grad).__name__}"
        )


def _initial_state(x: Tensor, z0: Tensor | None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
    if z0 is None:
        if not x.dtype.is_floating_point:
            raise TypeError(f"x has dtype {x.dtype}; pass a floating-point z0 to start from")
        return torch.zeros_like(x, memory_format=torch.contiguous_format)
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a Tensor or None, got {type(z0).__name__}")
    if z0.dim() < 1 or z0.shape[0] != x.shape[0]:
        raise ValueError(
            f"z0 must have the batch size of x ({x.shape[0]}) in its first dimension, got shape "
            f"{tuple(z0.shape)}"
        )
    if not z0.dtype.is_floating_point:
        raise TypeError(f"z0 must have a floating-point dtype, got {z0.dtype}")
    if z0.device != x.device:
        raise ValueError(f"z0 is on {z0.device} but x is on {x.device}")
    return z0.detach()


def _unsolved(z0: Tensor) -> SolverResult:
    batch = z0.shape[0]
    return SolverResult(
        z=z0,
        residual=torch.full((batch,), float("inf"), device=z0.device),
        converged=torch.zeros(batch, dtype=torch.bool, device=z0.device),
        nfe=0,
        evaluations=torch.zeros(batch, dtype=torch.long, device=z0.device),
    )


def fixed_point(
    f: Callable[..., Tensor],
    x: Tensor,
    z0: Tensor | None = None,
    *,
    solver: Solver | None = None,
    grad: GradientEstimator | None = None,
    max_iter: int = 30,
    tol: float | None = 1e-4,
    stop_mode: str = "abs",
    check_every: int | None = None,
    training: bool = False,
    raise_on_nonfinite: bool = False,
    f_kwargs: Mapping[str, Any] | None = None,
) -> DEQOutput:
    r"""Solve :math:`z^\star = f(z^\star, x)` and attach it to autograd.

    The solve runs without grad; when autograd needs a gradient, ``grad.attach`` builds the graph of
    the chosen estimator. A gradient is needed when grad mode is on and ``x`` or a tensor in
    ``f_kwargs`` requires grad, or, for an ``nn.Module`` ``f``, one of its parameters does; any other
    callable is assumed to need one whenever grad mode is on (use ``torch.no_grad()`` or
    ``torch.inference_mode()`` to only solve). Otherwise the plain solution is returned and nothing else
    runs.

    Parameters
    ----------
    f : callable
        ``f(z, x, **f_kwargs) -> z``, an ``nn.Module`` or any function; batched over dim 0. It must not
        write into ``z`` (a ``ValueError`` says so if it does).
    x : Tensor
        Input injection, shape ``(B, ...)``.
    z0 : Tensor, optional
        Starting point, shape ``(B, ...)``; zeros shaped like ``x`` by default (warm-start by
        passing a previous solution). Its dtype is the state's dtype.
    solver : Solver, optional
        Any callable with the :class:`~implicitdiff.solvers.Solver` call; ``Anderson()`` by default.
    grad : GradientEstimator, optional
        How gradients pass through the solution; ``JFB()`` by default.
    max_iter, tol, stop_mode
        The forward solve's cap on evaluations of ``f``, its tolerance and ``"abs"``/``"rel"``.
        ``tol=None`` is a fixed budget: exactly ``max_iter`` evaluations and no host reads.
    check_every : int, optional
        How often the solver's host reads whether every sample has converged (tolerance mode); the
        solver's default (:data:`~implicitdiff.solvers.DEFAULT_CHECK_EVERY`) when not given, and then
        not passed, so a user's solver without this argument works.
    training : bool
        Passed to the estimator: only stochastic estimators (S-JFB) behave differently in training.
    raise_on_nonfinite : bool
        Raise :class:`FloatingPointError` if ``f`` produced a non-finite value for any sample,
        instead of only reporting it in ``stats.nonfinite`` (this reads one flag from the device).
    f_kwargs : mapping, optional
        Extra keyword arguments for ``f`` (conditioning, masks).

    Returns
    -------
    DEQOutput
        ``z``, the forward solve's ``stats`` (which describe ``stats.z``, equal to ``z`` unless the
        estimator applies ``f``), and ``grad_evals``.
    """
    solver = Anderson() if solver is None else solver
    grad = JFB() if grad is None else grad
    check_parts(solver, grad)
    # Checked here, where the call enters; the solver checks tol, stop_mode and check_every, which it
    # is the one to use.
    max_iter = check_int("max_iter", max_iter, low=1)
    raise_on_nonfinite = check_bool("raise_on_nonfinite", raise_on_nonfinite)
    return solve_and_attach(
        f,
        x,
        z0,
        solver=solver,
        grad=grad,
        max_iter=max_iter,
        tol=tol,
        stop_mode=stop_mode,
        check_every=check_every,
        training=training,
        raise_on_nonfinite=raise_on_nonfinite,
        f_kwargs={} if f_kwargs is None else dict(f_kwargs),
    )


@outside_compile
def _forward_solve(
    solver: Solver,
    grad: GradientEstimator,
    f_x: BoundMap,
    z_init: Tensor,
    max_iter: int,
    tol: float | None,
    stop_mode: str,
    check_every: int | None,
    training: bool,
) -> tuple[SolverResult, Tensor]:
    """The estimator's budget and the no-grad solve: outside ``torch.compile``, where a drawn budget or a
    data-dependent number of iterations would be a guard of the compiled graph.

    Returns the statistics and the point the estimator starts from (detached).
    """
    budget = grad.forward_budget(max_iter, training=training)
    if budget == 0:
        # An estimator may ask for no forward iterations at all (S-JFB draws 0 sometimes): start
        # from z0 unsolved; its residual is unknown, so it is reported as not converged.
        return _unsolved(z_init), z_init.detach()
    options: dict[str, Any] = {"max_iter": budget, "tol": tol, "stop_mode": stop_mode}
    if check_every is not None:
        options["check_every"] = check_every
    with torch.no_grad():
        stats = solver(f_x, z_init, **options)
    if not isinstance(stats, SolverResult):
        raise TypeError(f"solver {solver!r} must return a SolverResult, got {type(stats).__name__}")
    if isinstance(grad, StartsFromImage) and grad.starts_from_image and stats.fz is not None:
        # An estimator that continues the iteration with grad (S-JFB) starts from g(stats.z), which the
        # solver computed already: n no-grad evaluations then give n steps, none evaluated twice.
        return stats, stats.fz.detach()
    return stats, stats.z.detach()


def solve_and_attach(
    f: Callable[..., Tensor],
    x: Tensor,
    z0: Tensor | None,
    *,
    solver: Solver,
    grad: GradientEstimator,
    max_iter: int,
    tol: float | None,
    stop_mode: str,
    check_every: int | None,
    training: bool,
    raise_on_nonfinite: bool,
    f_kwargs: dict[str, Any],
) -> DEQOutput:
    """:func:`fixed_point` on arguments its callers have checked (the layer, ``fixed_point`` itself)."""
    z_init = _initial_state(x, z0)
    f_x = BoundMap(f, x, z_init, f_kwargs, [0])

    stats, start = _forward_solve(solver, grad, f_x, z_init, max_iter, tol, stop_mode, check_every, training)
    z_star = stats.z.detach()
    nonfinite = stats.nonfinite
    if raise_on_nonfinite and nonfinite is not None and bool(nonfinite.any()):
        bad = torch.nonzero(nonfinite).flatten().tolist()
        raise FloatingPointError(
            f"f returned non-finite values during the forward solve for samples {bad[:10]}"
            + (" ..." if len(bad) > 10 else "")
        )
    if not _needs_grad(f, x, f_kwargs):
        return DEQOutput(z=z_star, stats=stats)
    if not compiling() and _autocast_on(z_init.device.type) and stats.nfe > 0:
        # Autocast caches the low-precision copies of the weights; before torch 2.5 a copy made in the
        # no-grad solve is reused by the estimator's evaluation with grad, which then has no graph back
        # to the weights. Only a gradient needs the cache cleared.
        torch.clear_autocast_cache()
    # Counted from zero (not from the solve's count): under torch.compile a count that differs from call
    # to call would be a guard of the compiled graph.
    f_x.reset_calls()
    z = grad.attach(f_x, start, training=training)
    return DEQOutput(z=z, stats=stats, grad_evals=f_x.calls)
