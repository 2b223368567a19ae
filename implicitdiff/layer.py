"""``DEQLayer``: a deep equilibrium layer as an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch import nn

from ._compile import compiling
from ._onefunction import parts_of
from ._tree import PyTree
from ._validate import check_bool, check_int, refuse_class, warn_caller
from .functional import DEQOutput, _check_n_states, _check_solver_and_grad, _solve_and_attach
from .gradients import JFB, GradientEstimator, Stateful
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
        ``f(z, x, **f_kwargs) -> z``. If it is a module it is registered as a submodule, so its
        parameters belong to the layer. The state ``z`` and the input ``x`` may be tensors or pytrees
        of tensors (tuples, lists, dicts: one feature map per resolution); see
        :func:`~implicitdiff.fixed_point`.
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
    n_states : int, optional
        Default number of intermediate states to return in ``out.states`` (for
        :func:`~implicitdiff.regularizers.fixed_point_correction_loss`); ``None``: none.

    Notes
    -----
    **f is one function for the length of a call.** A fixed point exists only if ``f`` does not change
    between the solver's evaluations. When ``f`` is an ``nn.Module``:

    * every parametrized tensor inside it (``torch.nn.utils.parametrizations.spectral_norm``,
      ``weight_norm``) is computed once per call, under ``parametrize.cached()``, with grad when a
      gradient is needed; the forward solve, the estimator and IFT's backward all use it (in training
      mode ``spectral_norm`` refines its estimate once per call, not once per evaluation);
    * every :class:`~implicitdiff.nn.VariationalDropout` inside it draws one mask per call, held by every
      evaluation of the call and by its backward;
    * ``nn.Dropout`` (and ``Dropout1d/2d/3d``, ``AlphaDropout``) in training mode draws a new mask at every
      evaluation: the solve chases a moving map and does not converge. The first call that meets one
      warns (once per ``f``) and names it; use :class:`~implicitdiff.nn.VariationalDropout` instead;
    * **BatchNorm** in training mode normalises with the statistics of the batch's current iterates, so
      each sample's ``f`` depends on every other sample's iterate: the samples are no longer
      independent, and a sample the solver froze as converged is off its fixed point again once the
      others move the statistics. It also updates its running statistics at every evaluation, ``nfe``
      updates per call: with momentum :math:`m` the call moves them by :math:`1 - (1 - m)^{nfe}` instead
      of :math:`m`, towards the last iterates. Prefer a per-sample normalisation (``GroupNorm``,
      ``LayerNorm``), as the DEQ models do, or keep BatchNorm outside ``f``.

    The layer inspects ``f``'s modules once, when it is constructed (or at the first call, for a module
    it has not seen), and keeps what it found per module; after adding or removing submodules of ``f``
    call ``implicitdiff.nn.forget(f)``. When ``f`` is a
    plain function closing over modules, the layer cannot see them: wrap the call in
    ``parametrize.cached()`` and call :func:`~implicitdiff.nn.reset_masks` yourself.

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
        f: Callable[..., Any],
        *,
        solver: Solver | None = None,
        grad: GradientEstimator | None = None,
        max_iter: int = 30,
        tol: float | None = 1e-4,
        stop_mode: str = "abs",
        check_every: int | None = None,
        raise_on_nonfinite: bool = False,
        n_states: int | None = None,
    ) -> None:
        super().__init__()
        refuse_class("f", f)
        if not callable(f):
            raise TypeError(f"f must be an nn.Module or a callable f(z, x), got {type(f).__name__}")
        self.f = f
        if isinstance(f, nn.Module):
            # Walked now rather than inside the first forward: a compiled forward then reads the parts
            # without inserting them (an insertion would change what its guards saw and recompile).
            parts_of(f)
        self.solver = Anderson() if solver is None else solver
        self.grad = JFB() if grad is None else grad
        _check_solver_and_grad(self.solver, self.grad)
        self.max_iter, self.tol, self.stop_mode, _ = check_solve_args(max_iter, tol, stop_mode, check_every)
        self.check_every = check_every
        self.raise_on_nonfinite = check_bool("raise_on_nonfinite", raise_on_nonfinite)
        self.n_states = _check_n_states(n_states)

    def get_extra_state(self) -> dict[str, Any]:
        """The estimator's own state (S-JFB's generator), saved in the layer's ``state_dict``."""
        return {"grad": self.grad.state_dict()} if isinstance(self.grad, Stateful) else {}

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved.

        A state dict saved with another estimator loads too (weights trained with S-JFB fine-tuned with
        IFT, say): the estimator's state never stands between a user and their weights. Where the two
        estimators' states do not match, a ``UserWarning`` says what was not restored.
        """
        if not isinstance(state, dict):
            raise TypeError(f"the layer's extra state must be a dict, got {type(state).__name__}")
        grad = self.grad
        if "grad" in state and isinstance(grad, Stateful):
            grad.load_state_dict(state["grad"])
        elif "grad" in state:
            warn_caller(
                f"the state dict holds an estimator's state (a draw sequence), which this layer's "
                f"estimator {self.grad!r} does not have: the weights are loaded, the draw sequence is not",
                UserWarning,
            )
        elif isinstance(grad, Stateful):
            warn_caller(
                f"the state dict holds no estimator state (it was saved with an estimator that has none): "
                f"the weights are loaded, and {self.grad!r} keeps its own draw sequence",
                UserWarning,
            )

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, grad={self.grad!r}, max_iter={self.max_iter}, tol={self.tol}, "
            f"stop_mode={self.stop_mode!r}" + (f", n_states={self.n_states}" if self.n_states else "")
        )

    def forward(
        self,
        x: PyTree,
        z0: PyTree | None = None,
        *,
        max_iter: int | None = None,
        tol: float | Literal["layer"] | None = "layer",
        solver: Solver | None = None,
        n_states: int | Literal["layer"] | None = "layer",
        f_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> DEQOutput:
        """Solve for the fixed point.

        Parameters
        ----------
        x : Tensor or pytree of Tensor
            Input injection ``(B, ...)``.
        z0 : Tensor or pytree of Tensor, optional
            Starting point (warm start); zeros shaped like ``x`` by default when ``x`` is a tensor,
            required otherwise. ``out.z`` has its structure.
        max_iter, tol, solver : optional
            Override the layer's defaults for this call only (a sampler gives each diffusion step
            its own compute this way). ``tol=None`` asks for a fixed budget; ``"layer"`` (the default)
            keeps the layer's tolerance.
        n_states : int or None, optional
            Intermediate states to return in ``out.states`` for this call (``"layer"``: the layer's).
        f_kwargs : mapping, optional
            Keyword arguments for ``f`` (conditioning, masks), as in :func:`~implicitdiff.fixed_point`;
            their tensor leaves are explicit inputs for :class:`~implicitdiff.IFT`, like ``x``'s.
        **kwargs
            Deprecated: keyword arguments for ``f`` given loose (``deq(x, scale=0.3)``) still reach ``f``,
            with a ``DeprecationWarning``; pass ``f_kwargs={"scale": 0.3}``, whose names cannot collide
            with the layer's own options.

        Returns
        -------
        DEQOutput
            ``out.z`` (the solution), ``out.stats`` (the forward solve's statistics, of the packed state
            for a pytree) and ``out.states`` (with ``n_states``).
        """
        # The defaults were checked at construction; an override is checked here, once per call (the
        # solver checks the tolerance it is given).
        if max_iter is not None:
            max_iter = check_int("max_iter", max_iter, low=1)
        if solver is not None:
            _check_solver_and_grad(solver, self.grad)
        states = self.n_states if isinstance(n_states, str) and n_states == "layer" else n_states
        return _solve_and_attach(
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
            f_kwargs=_f_kwargs(f_kwargs, kwargs),
            n_states=_check_n_states(states),
        )


def _f_kwargs(f_kwargs: Mapping[str, Any] | None, loose: dict[str, Any]) -> dict[str, Any]:
    """f's keyword arguments, given as ``f_kwargs=`` or (deprecated) loose in the layer's call."""
    if f_kwargs is not None and not isinstance(f_kwargs, Mapping):
        raise TypeError(f"f_kwargs must be a mapping of f's keyword arguments, got {type(f_kwargs).__name__}")
    if not loose:
        return {} if f_kwargs is None else dict(f_kwargs)
    if f_kwargs is not None:
        raise TypeError(
            f"pass f's keyword arguments one way: f_kwargs={{...}}, not also loose ({', '.join(loose)})"
        )
    if not compiling():  # a compiled forward would break its graph on the warning
        warn_caller(
            f"keyword arguments for f given loose to the layer's call ({', '.join(loose)}) are deprecated: "
            "pass them as f_kwargs={...}"
        )
    return loose
