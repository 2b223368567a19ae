"""Adapters that run torchdeq's and scipy's solvers through our :class:`~implicitdiff.solvers.Solver` call.

They exist to compare against: the tests check our solvers against them. They live with the tests, not in
the package: driving scipy's per-sample root finders on a batched map takes threads and queues, which is
scaffolding for a comparison, not something the library offers. Both
adapters wrap ``g`` so that *we* count every evaluation, compute every residual with our rule
(:func:`~implicitdiff.solvers.residual_norm`), keep per sample the best iterate seen, freeze a
sample once it has converged or produced a non-finite value, and stop the external solver as soon
as every sample has converged or ``max_iter`` evaluations are spent. The result therefore follows
the :class:`~implicitdiff.solvers.SolverResult` contract whatever the external solver's own
stopping rule and bookkeeping are.

torchdeq and scipy are imported when an adapter is constructed. Install them with
``pip install implicitdiff[bench]``.
"""

from __future__ import annotations

import inspect
import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from implicitdiff.solvers import SolverResult
from implicitdiff.solvers._base import check_solve_args
from implicitdiff.solvers._driver import Evaluator, Progress
from implicitdiff.solvers._driver import residual as driver_residual

__all__ = ["ScipySolver", "TorchDEQSolver"]

TORCHDEQ_SOLVERS = ("anderson", "broyden", "fixed_point_iter")

#: Methods of :func:`scipy.optimize.root` that need no Jacobian from the user.
SCIPY_METHODS = (
    "anderson",
    "broyden1",
    "broyden2",
    "diagbroyden",
    "excitingmixing",
    "linearmixing",
    "krylov",
    "df-sane",
    "hybr",
    "lm",
)
_SCIPY_NONLIN = (
    "anderson",
    "broyden1",
    "broyden2",
    "diagbroyden",
    "excitingmixing",
    "linearmixing",
    "krylov",
)

# Arguments of a torchdeq solver that the adapter sets itself.
_TORCHDEQ_CONTROLLED = ("func", "x0", "max_iter", "tol", "stop_mode", "indexing", "return_final")


def _one(like: Tensor, i: int) -> Tensor:
    mask = torch.zeros_like(like)
    mask[i] = True
    return mask


class _StopSolve(Exception):
    """Raised inside the wrapped map to end an external solver: budget spent or all samples done."""


def _missing_extra(package: str, err: ImportError) -> ImportError:
    return ImportError(
        f"{package} is needed for this adapter but could not be imported ({err}). "
        "Install the optional dependencies with `pip install implicitdiff[bench]`."
    )


class TorchDEQSolver:
    """A torchdeq solver behind our :class:`~implicitdiff.solvers.Solver` call.

    torchdeq's solver runs on the flattened state in the working dtype (at least float32, so fp16
    and bf16 states work); every evaluation of ``g`` it makes goes through our bookkeeping. The
    returned ``z`` is, per sample, the evaluated iterate with the lowest residual by our rule (not
    torchdeq's ``lowest_xest``, whose residual is unknown without one more evaluation), and ``nfe``
    counts every evaluation, line-search trials included.

    Parameters
    ----------
    name : {"anderson", "broyden", "fixed_point_iter"}
        Which torchdeq solver (``torchdeq.solver.get_solver(name)``).
    **kwargs
        The solver's own options (``m``, ``lam``, ``tau`` for Anderson; ``LBFGS_thres``, ``ls`` for
        Broyden; ``tau`` for fixed-point iteration). Unlike torchdeq, an unknown option raises
        ``TypeError``. Note that torchdeq's Broyden keeps ``LBFGS_thres`` (default: ``max_iter``)
        rank-one terms, so its memory grows with ``max_iter`` unless it is set.

    Raises
    ------
    ImportError
        If torchdeq is not installed (``pip install implicitdiff[bench]``).
    """

    def __init__(self, name: str = "anderson", **kwargs: Any) -> None:
        if name not in TORCHDEQ_SOLVERS:
            raise ValueError(f"name must be one of {TORCHDEQ_SOLVERS}, got {name!r}")
        try:
            from torchdeq.solver import get_solver
        except ImportError as err:
            raise _missing_extra("torchdeq", err) from err
        self.name = name
        self._solve = get_solver(name)
        params = inspect.signature(self._solve).parameters
        allowed = sorted(
            key
            for key, p in params.items()
            if p.kind is not inspect.Parameter.VAR_KEYWORD and key not in _TORCHDEQ_CONTROLLED
        )
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for torchdeq's {name!r} solver; it takes {allowed}")
        self.kwargs = dict(kwargs)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"TorchDEQSolver({self.name!r}{options})"

    def __call__(
        self,
        g: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        max_iter: int,
        tol: float | None,
        stop_mode: str = "abs",
    ) -> SolverResult:
        max_iter, tol, stop_mode, _ = check_solve_args(max_iter, tol, stop_mode)
        evaluate = Evaluator.of_map(g, z0)
        start = evaluate.flat(z0)
        progress = Progress(start, tol)

        def done() -> bool:
            # The host reads a flag at every evaluation: external solvers run their own loop.
            return evaluate.nfe >= max_iter or not progress.any_active()

        def tracked_map(z: Tensor) -> Tensor:
            if done():
                raise _StopSolve
            fz = evaluate(z)
            progress.record(z, fz, driver_residual(fz, z, stop_mode))
            if done():
                raise _StopSolve
            # A sample that went non-finite is over for us; show torchdeq a harmless fixed point so
            # that its batched linear algebra stays finite for the other samples.
            safe_z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
            return torch.where(progress.nonfinite[:, None], safe_z, fz)

        try:
            self._solve(
                tracked_map,
                start.clone(),
                max_iter=max_iter,
                tol=0.0 if tol is None else tol,
                stop_mode=stop_mode,
                return_final=False,
                **self.kwargs,
            )
        except _StopSolve:
            pass
        return progress.result(evaluate.unflat, evaluate.nfe)


class _ScipyWorker:
    """One sample's scipy solve, run in a thread; each evaluation of F is a request to the caller."""

    def __init__(self, solve: Callable[[Callable[[np.ndarray], np.ndarray]], object]) -> None:
        self.requests: queue.Queue[np.ndarray | None] = queue.Queue()
        self.replies: queue.Queue[np.ndarray | None] = queue.Queue()
        self.error: BaseException | None = None
        self._solve = solve
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _residual(self, x: np.ndarray) -> np.ndarray:
        self.requests.put(np.array(x, dtype=np.float64, copy=True).ravel())
        reply = self.replies.get()
        if reply is None:
            raise _StopSolve
        return reply

    def _run(self) -> None:
        try:
            # Stalled secant updates divide by zero inside scipy; what matters is the point it asks for next.
            with np.errstate(all="ignore"):
                self._solve(self._residual)
        except _StopSolve:
            pass
        except ValueError as err:
            # scipy < 1.16 checks its own step for NaN (``norm(dx)``) and raises where newer versions
            # hand the NaN point back; either way scipy's arithmetic broke down, not g: the sample stops
            # at its best iterate, as for a non-finite point.
            if "infs or NaNs" not in str(err):
                self.error = err
        except BaseException as err:  # handed to the caller's thread, which re-raises it
            self.error = err
        finally:
            self.requests.put(None)


class ScipySolver:
    r"""A :func:`scipy.optimize.root` method behind our :class:`~implicitdiff.solvers.Solver` call.

    Each sample is solved separately, unbatched, in float64 on the CPU, as the root of
    :math:`F(z) = g(z) - z`. The per-sample solves run in lock step (one thread each, doing only
    numpy work): every round gathers the point each unfinished solve asks for and evaluates ``g``
    once on the whole batch, so ``nfe`` counts batched evaluations as for our solvers. A sample
    stops when its residual by our rule is ``<= tol``, when ``g`` gives it a non-finite value, or
    when its scipy method returns; the whole solve stops after ``max_iter`` evaluations.

    scipy's own tolerances are set so that it does not stop before our rule (``fatol=0`` for the
    ``nonlin`` methods, ``ftol=0`` for ``df-sane``, ``xtol=0`` for ``hybr`` and ``lm``), and the
    finite-difference Jacobian of ``hybr`` and ``lm`` steps by the square root of the state dtype's
    machine epsilon (float64's would be lost in a float32 ``g``). Options passed here override these.

    Parameters
    ----------
    method : str
        One of :data:`SCIPY_METHODS`: ``"anderson"``, ``"broyden1"``, ``"broyden2"``, ``"krylov"``,
        ``"df-sane"``, ``"hybr"``, ``"lm"``, ...
    **options
        Passed as ``options`` to :func:`scipy.optimize.root` (e.g. ``jac_options={"M": 5}`` for Anderson,
        ``line_search=None``). An option the method does not know raises ``ValueError``.

    Raises
    ------
    ImportError
        If scipy is not installed (``pip install implicitdiff[bench]``).
    """

    def __init__(self, method: str = "anderson", **options: Any) -> None:
        if method not in SCIPY_METHODS:
            raise ValueError(f"method must be one of {SCIPY_METHODS}, got {method!r}")
        try:
            import scipy.optimize as sciopt
        except ImportError as err:
            raise _missing_extra("scipy", err) from err
        self.method = method
        self.options = dict(options)
        self._root = sciopt.root
        # scipy only warns about an unknown option; try the options on a tiny problem to fail loudly.
        with warnings.catch_warnings():
            warnings.simplefilter("error", sciopt.OptimizeWarning)
            try:
                sciopt.root(lambda x: 0.5 * np.tanh(x) + 0.1 - x, np.zeros(2), method=method, options=options)
            except sciopt.OptimizeWarning as err:
                raise ValueError(f"bad options for scipy's {method!r}: {err}") from err
            except (TypeError, ValueError) as err:
                raise ValueError(f"bad options for scipy's {method!r}: {err}") from err

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"ScipySolver({self.method!r}{options})"

    def _scipy_options(self, max_iter: int, dtype: torch.dtype) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        if self.method in _SCIPY_NONLIN:
            defaults = {"fatol": 0.0, "maxiter": max_iter}
        elif self.method == "df-sane":
            defaults = {"ftol": 0.0, "fatol": 0.0, "maxfev": max_iter}
        elif self.method == "hybr":
            # MINPACK's finite-difference step is sqrt(eps) |x|: sized for the precision g runs in.
            defaults = {"xtol": 0.0, "eps": torch.finfo(dtype).eps}
        elif self.method == "lm":
            defaults = {"xtol": 0.0, "ftol": 0.0, "gtol": 0.0, "eps": torch.finfo(dtype).eps}
        return {**defaults, **self.options}

    def __call__(
        self,
        g: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        max_iter: int,
        tol: float | None,
        stop_mode: str = "abs",
    ) -> SolverResult:
        max_iter, tol, stop_mode, _ = check_solve_args(max_iter, tol, stop_mode)
        evaluate = Evaluator.of_map(g, z0)
        progress = Progress(evaluate.flat(z0), tol)
        start = progress.best_z.to("cpu", torch.float64).numpy()  # (B, n)
        options = self._scipy_options(max_iter, z0.dtype)

        def solver_for(row: np.ndarray) -> Callable[[Callable[[np.ndarray], np.ndarray]], object]:
            return lambda residual: self._root(residual, row.copy(), method=self.method, options=options)

        workers = [_ScipyWorker(solver_for(row)) for row in start]
        alive = set(range(len(workers)))
        pending: dict[int, np.ndarray] = {}
        try:
            for worker in workers:
                worker.thread.start()
            while alive:
                for i in sorted(alive):
                    point = workers[i].requests.get()
                    if point is None:
                        alive.discard(i)
                        # scipy gave up or finished by its own rule: the sample keeps its best iterate.
                        progress.retire(_one(progress.active, i))
                    elif not np.isfinite(point).all():
                        # scipy's own arithmetic broke down; g is not to blame, so it is not evaluated.
                        workers[i].replies.put(None)
                        progress.retire(_one(progress.active, i))
                    else:
                        pending[i] = point
                if not pending:
                    break
                rows = sorted(pending)
                # Samples not asking for a point this round sit at their best iterate.
                z = progress.best_z.clone()
                z[rows] = torch.from_numpy(np.stack([pending[i] for i in rows])).to(z)
                fz = evaluate(z)
                progress.record(z, fz, driver_residual(fz, z, stop_mode))
                residual = (fz - z).to("cpu", torch.float64).numpy()
                stop_all = evaluate.nfe >= max_iter or not progress.any_active()
                for i in rows:
                    keep_going = not stop_all and bool(progress.active[i])
                    workers[i].replies.put(residual[i].copy() if keep_going else None)
                pending.clear()
        finally:
            # On an error in g, release every solve waiting for a reply so that its thread ends.
            for i in pending:
                workers[i].replies.put(None)
            for worker in workers:
                worker.thread.join()
        for worker in workers:
            if worker.error is not None:
                raise RuntimeError(f"scipy's {self.method!r} failed: {worker.error}") from worker.error
        return progress.result(evaluate.unflat, evaluate.nfe)
