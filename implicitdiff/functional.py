"""``fixed_point``: an implicit layer's machinery as a function."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from ._compile import compiling, outside_compile
from ._onefunction import Held, caching_active, holding, parts_of
from ._tree import PyTree, TreeSpec, tensor_leaves, tree_paths
from ._validate import check_bool, check_int, refuse_functorch
from .gradients import JFB, GradientEstimator
from .gradients._base import StartsFromImage
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


def _needs_grad(f: Callable[..., Any], x: PyTree, f_kwargs: Mapping[str, Any]) -> bool:
    """Whether autograd will want a gradient out of the solution.

    For an ``nn.Module`` we can look at its parameters; for any other callable we cannot see what it
    closes over, so we assume it may need one whenever grad mode is on.
    """
    if not torch.is_grad_enabled():
        return False
    if isinstance(x, Tensor):
        if x.requires_grad:
            return True
    elif any(leaf.requires_grad for leaf in tensor_leaves(x)):
        return True
    if f_kwargs and any(leaf.requires_grad for leaf in tensor_leaves(tuple(f_kwargs.values()))):
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

    A structured state (``spec`` given) is packed: the map takes and returns flat ``(B, n)`` rows,
    unpacks them into the structure of the user's ``z0`` for ``f`` (views, no copy), checks what ``f``
    returns leaf by leaf (naming the path of a leaf that differs) and packs it (one copy).

    An estimator that differentiates with respect to the inputs explicitly (:class:`~implicitdiff.IFT`)
    reads :attr:`inputs` (the tensor leaves of ``x``, then those of ``f_kwargs``'s values, in that
    order) and calls :meth:`with_inputs` for the same map on other tensors.
    """

    def __init__(
        self,
        f: Callable[..., Any],
        x: PyTree,
        z0: Tensor,
        f_kwargs: Mapping[str, Any],
        counter: list[int],
        *,
        spec: TreeSpec | None = None,
        held: Held | None = None,
    ) -> None:
        self.f, self.x, self.z0 = f, x, z0
        # Kept as a tuple of pairs: dynamo before torch 2.5 fails to guard a dict that it also sees in the
        # caller's frame.
        self._items = tuple(f_kwargs.items())
        self._counter = counter
        self._name = getattr(f, "__name__", type(f).__name__)
        self.spec, self.held = spec, held

    @property
    def calls(self) -> int:
        """Evaluations of ``f`` by this map and every map made from it by :meth:`with_inputs`."""
        return self._counter[0]

    def reset_calls(self) -> None:
        """Start :attr:`calls` from zero again."""
        self._counter[0] = 0

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        """The tensors ``f`` receives explicitly: the tensor leaves of ``x``, then of ``f_kwargs``."""
        return tuple(tensor_leaves((self.x, tuple(value for _, value in self._items))))

    def with_inputs(self, *tensors: Tensor) -> BoundMap:
        """The same map with :attr:`inputs` replaced by ``tensors`` (same order)."""
        leaves, treedef = pytree.tree_flatten((self.x, tuple(value for _, value in self._items)))
        expected = sum(isinstance(leaf, Tensor) for leaf in leaves)
        if len(tensors) != expected:
            raise ValueError(f"with_inputs takes {expected} tensors (the map's inputs), got {len(tensors)}")
        replacements = iter(tensors)
        leaves = [next(replacements) if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        x, values = pytree.tree_unflatten(leaves, treedef)
        kwargs = dict(zip((key for key, _ in self._items), values, strict=True))
        return BoundMap(self.f, x, self.z0, kwargs, self._counter, spec=self.spec, held=self.held)

    def __call__(self, z: Tensor) -> Tensor:
        if self.held and not _in_cache(self.held):
            # Called after the layer's call ended (IFT's backward with create_graph): the call's weights.
            with holding(self.held):
                return self._evaluate(z)
        return self._evaluate(z)

    def _evaluate(self, z: Tensor) -> Tensor:
        state = z if self.spec is None else self.spec.unpack(z)
        out = self.f(state, self.x, **dict(self._items)) if self._items else self.f(state, self.x)
        self._counter[0] += 1
        if self.spec is not None:
            autocast = _autocast_on(z.device.type)
            return self.spec.pack(self.spec.leaves_of(out, z.shape[0], f"f ({self._name})", autocast))
        return self._checked(out)

    def _checked(self, out: object) -> Tensor:
        z0 = self.z0
        if not isinstance(out, Tensor):
            raise TypeError(
                f"f ({self._name}) must return a Tensor, got {type(out).__name__} (for a structured state, "
                "pass z0 with that structure)"
            )
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


def _in_cache(held: Held) -> bool:
    key, tensor = next(iter(held.items()))
    return caching_active() and parametrize._cache.get(key) is tensor


def check_parts(solver: object, grad: object) -> None:
    """A ``TypeError`` unless ``solver`` is callable and ``grad`` is a gradient estimator."""
    if not callable(solver):
        raise TypeError(f"solver must be callable like a Solver, got {type(solver).__name__}")
    if not isinstance(grad, GradientEstimator):
        raise TypeError(
            f"grad must be a gradient estimator with forward_budget() and attach(), got {type(grad).__name__}"
        )


def _initial_state(x: PyTree, z0: PyTree | None) -> tuple[Tensor, TreeSpec | None]:
    """The working state (detached) and, for a structured ``z0``, the spec that packs it."""
    if isinstance(x, Tensor) and (z0 is None or isinstance(z0, Tensor)):
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
        return _initial_tensor(x, z0, x.shape[0], x.device), None
    batch, device = _batch_of(x)
    if z0 is None:
        raise ValueError(
            f"z0 is required when x is not a single tensor (x is a {type(x).__name__}): pass z0, the "
            "starting state, with the structure f returns"
        )
    if isinstance(z0, Tensor):
        return _initial_tensor(None, z0, batch, device), None
    spec = TreeSpec.of(z0, "z0", rows=batch)
    if spec.device != device:
        raise ValueError(f"z0 is on {spec.device} but x is on {device}")
    # Called z in what f returns (f(z, x)); z0 in the checks of the starting point above.
    return spec.pack(pytree.tree_leaves(z0)).detach(), spec.named("z")


def _batch_of(x: PyTree) -> tuple[int, torch.device]:
    paths, leaves, _ = tree_paths(x, "x")
    tensors = [(path, leaf) for path, leaf in zip(paths, leaves, strict=True) if isinstance(leaf, Tensor)]
    if not tensors:
        raise TypeError(f"x must be a Tensor or a pytree holding tensors, got {type(x).__name__}")
    first_path, first = tensors[0]
    if first.dim() < 1 or first.shape[0] < 1:
        raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(first.shape)} at {first_path}")
    for path, leaf in tensors[1:]:
        if leaf.dim() < 1 or leaf.shape[0] != first.shape[0]:
            raise ValueError(
                f"every tensor in x must have shape (B, ...) with one batch size B = {first.shape[0]} "
                f"({first_path}), got {tuple(leaf.shape)} at {path}"
            )
    return first.shape[0], first.device


def _initial_tensor(x: Tensor | None, z0: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """The checks of a single-tensor state (a tensor ``x`` gives the zeros default when ``z0`` is None)."""
    if z0 is None:
        assert x is not None
        if not x.dtype.is_floating_point:
            raise TypeError(f"x has dtype {x.dtype}; pass a floating-point z0 to start from")
        return torch.zeros_like(x, memory_format=torch.contiguous_format)
    if z0.dim() < 1 or z0.shape[0] != batch:
        raise ValueError(
            f"z0 must have the batch size of x ({batch}) in its first dimension, got shape {tuple(z0.shape)}"
        )
    if not z0.dtype.is_floating_point:
        raise TypeError(f"z0 must have a floating-point dtype, got {z0.dtype}")
    if z0.device != device:
        raise ValueError(f"z0 is on {z0.device} but x is on {device}")
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
        n_states=check_n_states(n_states),
    )


def check_n_states(n_states: object) -> int | None:
    """``n_states`` as an int >= 1, or ``None``."""
    return None if n_states is None else check_int("n_states", n_states, low=1)


def solve_and_attach(
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
    call = _Call(f, x, solver, grad, training, f_kwargs, n_states)
    parts = parts_of(f) if isinstance(f, nn.Module) else None
    if parts is None or not parts.active:
        return call.run(z0, max_iter, tol, stop_mode, check_every, raise_on_nonfinite)
    with parametrize.cached():
        call.held = parts.begin_call(with_grad=call.needs_grad)
        return call.run(z0, max_iter, tol, stop_mode, check_every, raise_on_nonfinite)


class _Trajectory:
    """A map that keeps evenly spaced copies of the points it is evaluated at: at most ``2 * keep``.

    Every ``stride``-th point is copied; when more than ``2 * keep`` are held, every other one is
    dropped and the stride doubles, so the points stay evenly spaced over a solve of unknown length.
    """

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


class _Call:
    """One call of :func:`solve_and_attach`: the solve, the estimator, the intermediate states."""

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
        self.needs_grad = _needs_grad(f, x, f_kwargs)

    def run(
        self,
        z0: PyTree | None,
        max_iter: int,
        tol: float | None,
        stop_mode: str,
        check_every: int | None,
        raise_on_nonfinite: bool,
    ) -> DEQOutput:
        z_init, spec = _initial_state(self.x, z0)
        f_x = BoundMap(self.f, self.x, z_init, self.f_kwargs, [0], spec=spec, held=self.held or None)
        wanted = 0 if self.n_states is None else self.n_states - 1  # states before z
        trajectory = _Trajectory(f_x, wanted) if wanted else None
        stats, start = self.solve(trajectory or f_x, z_init, max_iter, tol, stop_mode, check_every)
        _check_finite(stats, raise_on_nonfinite)
        # Counted from zero (not from the solve's count): under torch.compile a count that differs
        # from call to call would be a guard of the compiled graph.
        f_x.reset_calls()
        if not self.needs_grad:
            z = stats.z.detach()
        else:
            z = self.attach(f_x, stats, start)
        z_out = z if spec is None else spec.unpack(z)
        states = None
        if self.n_states is not None:
            with torch.set_grad_enabled(z.requires_grad):
                steps = [f_x(point) for point in trajectory.spread()] if trajectory else []
            states = [*(step if spec is None else spec.unpack(step) for step in steps), z_out]
        return DEQOutput(z=z_out, stats=stats, grad_evals=f_x.calls, states=states)

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
        if not isinstance(stats, SolverResult):
            raise TypeError(f"solver {self.solver!r} must return a SolverResult, got {type(stats).__name__}")
        grad = self.grad
        if isinstance(grad, StartsFromImage) and grad.starts_from_image and stats.fz is not None:
            # An estimator that continues the iteration with grad (S-JFB) starts from g(stats.z), which
            # the solver computed already: n no-grad evaluations then give n steps, none evaluated twice.
            return stats, stats.fz.detach()
        return stats, stats.z.detach()

    def attach(self, f_x: BoundMap, stats: SolverResult, start: Tensor) -> Tensor:
        if not compiling() and _autocast_on(start.device.type) and stats.nfe > 0:
            # Autocast caches the low-precision copies of the weights; before torch 2.5 a copy made in the
            # no-grad solve is reused by the estimator's evaluation with grad, which then has no graph back
            # to the weights. Only a gradient needs the cache cleared.
            torch.clear_autocast_cache()
        return self.grad.attach(f_x, start, training=self.training)


def _check_finite(stats: SolverResult, raise_on_nonfinite: bool) -> None:
    nonfinite = stats.nonfinite
    if raise_on_nonfinite and nonfinite is not None and bool(nonfinite.any()):
        bad = torch.nonzero(nonfinite).flatten().tolist()
        raise FloatingPointError(
            f"f returned non-finite values during the forward solve for samples {bad[:10]}"
            + (" ..." if len(bad) > 10 else "")
        )
