"""``fixed_point``: an implicit layer's machinery as a function, and what it returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ._boundmap import BoundMap
from ._call import Call
from ._onefunction import parts_of
from ._tree import PyTree
from ._validate import check_bool, check_int, refuse_class
from .gradients import JFB, GradientEstimator
from .solvers import Anderson, Solver, SolverResult

__all__ = ["BoundMap", "DEQOutput", "fixed_point"]


@dataclass
class DEQOutput:
    """The output of an implicit layer.

    Attributes
    ----------
    z : Tensor or pytree of Tensor
        The fixed point, attached to autograd by the gradient estimator when a gradient is needed,
        with the structure of ``z0`` (a tensor, or a tuple, list or dict of tensors).
        Without a gradient, and with :class:`~implicitdiff.IFT`, it is the solver's iterate ``stats.z``,
        the one ``stats.residual`` describes. Estimators that differentiate through applications of
        ``f`` return those applications: :class:`~implicitdiff.JFB` returns ``f(stats.z)`` (equal in
        value to ``stats.fz``), :class:`~implicitdiff.PhantomGradient` ``k`` damped steps from
        ``stats.z``. An estimator with ``starts_from_image = True`` (:class:`~implicitdiff.SJFB`, which
        continues the solver's iteration) starts from ``stats.fz`` instead.
    stats : SolverResult
        Statistics of the forward solve: ``z``, ``residual``, ``converged``, ``nfe``, ``trace``,
        ``nonfinite``, and ``fz = f(stats.z)``, which the solver computed already (one step further for
        a contraction, free to use, but its residual is unknown). For a structured state they describe
        the *packed* state: ``stats.z`` and ``stats.fz`` are ``(B, n)`` rows holding every leaf
        flattened in turn, and the residual is the norm over all leaves together.
    grad_evals : int
        Evaluations of ``f`` made after the solve: attaching the gradient (JFB: 1, IFT: 1, phantom
        gradient and S-JFB: their steps) and the intermediate states; ``0`` when there was neither. With
        ``stats.nfe`` it gives the cost of the call; the backward pass of IFT adds
        ``grad.last_backward.nfe`` vector-Jacobian products.
    states : list or None
        With ``n_states=k``: up to ``k`` states along the way to the fixed point, earliest first, each
        with the structure of ``z0`` and its own gradient; the last is ``z``. ``None`` otherwise.
    """

    z: PyTree
    stats: SolverResult
    grad_evals: int = 0
    states: list[PyTree] | None = None


def fixed_point(
    f: Callable[..., Any],
    x: PyTree,
    z0: PyTree | None = None,
    *,
    solver: Solver | None = None,
    grad: GradientEstimator | None = None,
    max_iter: int = 30,
    tol: float | None = 1e-4,
    stop_mode: str = "abs",
    check_every: int | None = None,
    training: bool = False,
    raise_on_nonfinite: bool = False,
    n_states: int | None = None,
    f_kwargs: Mapping[str, Any] | None = None,
) -> DEQOutput:
    r"""Solve :math:`z^\star = f(z^\star, x)` and attach it to autograd.

    The solve runs without grad; when autograd needs a gradient, ``grad.attach`` builds the graph of
    the chosen estimator. A gradient is needed when grad mode is on and ``x`` or a tensor in
    ``f_kwargs`` requires grad, or, for an ``nn.Module`` ``f``, one of its parameters does; any other
    callable is assumed to need one whenever grad mode is on (use ``torch.no_grad()`` or
    ``torch.inference_mode()`` to only solve). Otherwise the plain solution is returned and nothing else
    runs.

    The state may be a *pytree*: a tuple, list, dict or named tuple (nested) of tensors, each
    ``(B, ...)`` with one batch size ``B`` and a shape of its own (feature maps at several resolutions,
    a hidden state and a flow field). ``f`` receives and returns that structure; the solver and the
    estimator work on the packed state, one ``(B, n)`` row per sample holding every leaf flattened in
    turn (:math:`n = \sum_i n_i`), so the residual, the tolerance and IFT's adjoint solve are over the
    whole state at once. Every leaf must have the same floating dtype and device (cast the leaves
    yourself when they differ). A single tensor is not packed.

    Parameters
    ----------
    f : callable
        ``f(z, x, **f_kwargs) -> z``, an ``nn.Module`` or any function; batched over dim 0. It must not
        write into ``z`` (a ``ValueError`` says so if it does). It returns the structure of ``z0``;
        a leaf of another path, shape, dtype or device is a ``ValueError`` that names the leaf
        (``z[1]['h']``).
    x : Tensor or pytree of Tensor
        Input injection, ``(B, ...)`` (every tensor leaf with the same ``B``); passed to ``f`` as it is.
    z0 : Tensor or pytree of Tensor, optional
        Starting point, ``(B, ...)`` per leaf; zeros shaped like ``x`` by default when ``x`` is a
        single tensor, otherwise required. Its dtype is the state's dtype.
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
    n_states : int, optional
        Also return up to ``n_states`` differentiable states along the way (``out.states``), for the
        fixed-point correction loss (Bai et al., 2022): the last is ``out.z``; the others are one
        differentiable step :math:`f(\bar z_j, x)` from points :math:`\bar z_j` (detached) spread
        evenly over the solver's evaluations, earliest first. Fewer when the solve made fewer
        evaluations. Costs ``n_states - 1`` evaluations of ``f`` with grad, and at most
        ``2 (n_states - 1)`` stored copies of the state during the solve.
    f_kwargs : mapping, optional
        Extra keyword arguments for ``f`` (conditioning, masks); their tensor leaves are explicit inputs
        for :class:`~implicitdiff.IFT`, like ``x``'s.

    Returns
    -------
    DEQOutput
        ``z`` (with ``z0``'s structure), the forward solve's ``stats`` (which describe ``stats.z``, the
        packed state for a pytree, equal to ``z`` unless the estimator applies ``f``), ``grad_evals``
        and ``states``.

    Notes
    -----
    When ``f`` is an ``nn.Module``, it is kept one function for the length of the call: every
    parametrized weight (``spectral_norm``, ``weight_norm``) is computed once, and every
    :class:`~implicitdiff.nn.VariationalDropout` inside draws one mask (see :class:`~implicitdiff.DEQLayer`).
    """
    solver = Anderson() if solver is None else solver
    grad = JFB() if grad is None else grad
    _check_solver_and_grad(solver, grad)
    # Checked here, where the call enters; the solver checks tol, stop_mode and check_every, which it
    # is the one to use.
    max_iter = check_int("max_iter", max_iter, low=1)
    raise_on_nonfinite = check_bool("raise_on_nonfinite", raise_on_nonfinite)
    return _solve_and_attach(
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
        n_states=_check_n_states(n_states),
    )


def _check_solver_and_grad(solver: object, grad: object) -> None:
    """A ``TypeError`` unless ``solver`` is a callable object and ``grad`` a gradient estimator."""
    refuse_class("solver", solver)
    refuse_class("grad", grad)
    if not callable(solver):
        raise TypeError(f"solver must be callable like a Solver, got {type(solver).__name__}")
    if not isinstance(grad, GradientEstimator):
        raise TypeError(
            f"grad must be a gradient estimator with forward_budget() and attach(), got {type(grad).__name__}"
        )


def _check_n_states(n_states: object) -> int | None:
    """``n_states`` as an int >= 1, or ``None``."""
    return None if n_states is None else check_int("n_states", n_states, low=1)


def _solve_and_attach(
    f: Callable[..., Any],
    x: PyTree,
    z0: PyTree | None,
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
    n_states: int | None = None,
) -> DEQOutput:
    """:func:`fixed_point` on arguments its callers have checked (the layer, ``fixed_point`` itself).

    When ``f`` is a module with parametrized weights or variational dropout, the call runs inside
    ``parametrize.cached()`` with the weights computed once and the masks reset; otherwise it runs as
    it is (a dictionary look-up for a module, nothing for a plain function).
    """
    call = Call(f, x, solver, grad, training, f_kwargs, n_states)
    parts = parts_of(f) if isinstance(f, nn.Module) else None
    if parts is None or not parts.active:
        return DEQOutput(*call.run(z0, max_iter, tol, stop_mode, check_every, raise_on_nonfinite))
    with parametrize.cached():
        call.held = parts.begin_call(with_grad=call.needs_grad)
        return DEQOutput(*call.run(z0, max_iter, tol, stop_mode, check_every, raise_on_nonfinite))
