"""Whole solves as one launch: a fixed-budget solve captured once as a CUDA graph and replayed.

On a small map a GPU spends its time launching kernels, one per operation, whatever the solver does
with them. A CUDA graph records every kernel of a solve once and replays them with one launch, so an
iteration then costs the map's arithmetic and the rule's, and nothing else. :class:`Captured` wraps any
solver with the :class:`~implicitdiff.solvers.Solver` call and does this for fixed budgets
(``tol=None``), where the kernels of a solve do not depend on the data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .._validate import refuse_class
from ._base import Solver, SolverResult, check_stop_mode

__all__ = ["CaptureWarning", "Captured"]


class CaptureWarning(UserWarning):
    """A solve that :class:`Captured` could not capture ran eagerly; the message says why."""


@runtime_checkable
class _Rebindable(Protocol):
    """A map that names the function and tensors it reads and can be rebuilt on other tensors (the layer's
    maps, :class:`~implicitdiff.functional.BoundMap`, can)."""

    f: Callable[..., Tensor]

    @property
    def inputs(self) -> tuple[Tensor, ...]: ...

    def with_inputs(self, *tensors: Tensor) -> Callable[[Tensor], Tensor]: ...


@runtime_checkable
class _Uncapturable(Protocol):
    """A map that says why a replay cannot stand for its solve (the layer's map with ``n_states``)."""

    capture_refusal: str


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    z0: Tensor  # static input: the starting point
    inputs: tuple[Tensor, ...]  # static inputs: x and the tensors of f_kwargs
    result: SolverResult  # static outputs, overwritten by each replay


class Captured:
    r"""Run ``solver``'s fixed-budget solves as CUDA graphs: captured once per shape, then replayed.

    A solve with ``tol=None`` launches the same kernels whatever the data, so it is captured the first
    time a (shape, dtype, budget) is seen and replayed after that: the inputs are copied into the
    graph's own buffers, one launch runs every iteration, and the outputs are copied out. The results
    are those of the eager solve (the same kernels on the same numbers).

    Where capture is impossible the solve runs eagerly, with one :class:`CaptureWarning` per reason:

    * a tolerance is given (the number of iterations depends on the data: pass ``tol=None``);
    * the map does not say which tensors it reads (the layer's maps do; a plain function closes over
      tensors that a replay could not change), or it does work a replay would skip (a layer call with
      ``n_states`` copies the intermediate states in Python at every evaluation);
    * the state is not on a CUDA device (CUDA graphs are CUDA's);
    * capture failed: the map reads a value on the host (``.item()``, ``bool(t)``), makes tensors on the
      CPU, or draws random numbers from a generator that is not graph-safe.

    A graph holds the addresses of ``f``'s parameters: updating them in place (an optimizer step,
    ``load_state_dict``) is seen by the next replay, but moving the model (``.to()``) is not: call
    :meth:`reset` after moving it. The graphs are kept per function ``f``, and each keeps its ``f``
    alive (as it keeps its parameters' memory): a graph is never replayed for another function, and
    :meth:`reset` frees them.

    Parameters
    ----------
    solver : Solver
        Any callable with the :class:`~implicitdiff.solvers.Solver` call, e.g. ``Anderson()``.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import DEQLayer, Anderson
    >>> from implicitdiff.solvers import Captured
    >>> lin = torch.nn.Linear(8, 8)
    >>> deq = DEQLayer(lambda z, x: torch.tanh(0.5 * lin(z) + x), solver=Captured(Anderson()), tol=None)
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     out = deq(torch.randn(4, 8))  # on the CPU: eager, with a warning that says so
    >>> "CUDA device" in str(caught[0].message)
    True
    """

    def __init__(self, solver: Solver) -> None:
        refuse_class("solver", solver)
        if not callable(solver):
            raise TypeError(f"solver must be callable like a Solver, got {type(solver).__name__}")
        self.solver = solver
        # Called with tol=None too: our solvers take it, and a capture only ever asks for it.
        self._solve: Callable[..., SolverResult] = solver
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._refused: set[tuple[Any, ...]] = set()
        self._warned: set[str] = set()
        #: How many graphs were captured (a replay captures nothing).
        self.captures = 0

    def __repr__(self) -> str:
        return f"Captured({self.solver!r})"

    def reset(self) -> None:
        """Forget every captured graph (after moving the model to other memory)."""
        self._graphs.clear()
        self._refused.clear()

    def __call__(
        self,
        g: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        max_iter: int,
        tol: float | None,
        stop_mode: str = "abs",
        **options: Any,
    ) -> SolverResult:
        """Solve ``z = g(z)``: replayed from a CUDA graph where possible, eagerly otherwise."""
        reason = self._why_not(g, z0, tol)
        if reason is not None:
            self._warn(reason)
            return self._solve(g, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **options)
        assert isinstance(g, _Rebindable)
        stop_mode = check_stop_mode(stop_mode)
        inputs = g.inputs
        key = (
            tuple(z0.shape),
            z0.dtype,
            z0.device,
            max_iter,
            stop_mode,
            tuple(sorted(options.items())),
            tuple((tuple(t.shape), t.dtype, t.device) for t in inputs),
            _Function(g.f),  # the graph holds this function's parameters
        )
        if key in self._refused:
            return self._solve(g, z0, max_iter=max_iter, tol=None, stop_mode=stop_mode, **options)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(g, z0, inputs, max_iter, stop_mode, options)
            except RuntimeError as err:
                self._refused.add(key)
                self._warn(f"capture failed ({str(err).splitlines()[0]}); the solve runs eagerly")
                return self._solve(g, z0, max_iter=max_iter, tol=None, stop_mode=stop_mode, **options)
            self._graphs[key] = entry
        with torch.no_grad():
            entry.z0.copy_(z0)
            for static, tensor in zip(entry.inputs, inputs, strict=True):
                static.copy_(tensor)
        entry.graph.replay()
        return _copied(entry.result)

    def _why_not(self, g: Callable[[Tensor], Tensor], z0: Tensor, tol: float | None) -> str | None:
        if tol is not None:
            return (
                "a tolerance makes the number of iterations depend on the data, so only fixed budgets "
                "(tol=None) are captured; the solve runs eagerly"
            )
        if isinstance(g, _Uncapturable):
            return f"{g.capture_refusal}; the solve runs eagerly"
        if not isinstance(g, _Rebindable):
            return (
                "the map does not say which tensors it reads (pass it through DEQLayer or fixed_point), "
                "so a replay could not give it new inputs; the solve runs eagerly"
            )
        if not isinstance(z0, Tensor) or z0.device.type != "cuda":
            where = z0.device if isinstance(z0, Tensor) else type(z0).__name__
            return f"CUDA graphs need a CUDA device (the state is on {where}); the solve runs eagerly"
        return None

    def _warn(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"Captured({self.solver!r}): {reason}", CaptureWarning, stacklevel=3)

    def _capture(
        self,
        g: _Rebindable,
        z0: Tensor,
        inputs: tuple[Tensor, ...],
        max_iter: int,
        stop_mode: str,
        options: dict[str, Any],
    ) -> _Graph:
        static_z0 = z0.detach().clone()
        static_inputs = tuple(t.detach().clone() for t in inputs)
        static_map = g.with_inputs(*static_inputs)

        def solve() -> SolverResult:
            return self._solve(
                static_map, static_z0, max_iter=max_iter, tol=None, stop_mode=stop_mode, **options
            )

        # Warm up on a side stream (lazy initialisations, allocator), as CUDA graphs require.
        stream = torch.cuda.Stream(device=z0.device)
        stream.wait_stream(torch.cuda.current_stream(z0.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            solve()
        torch.cuda.current_stream(z0.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            result = solve()
        self.captures += 1
        return _Graph(graph, static_z0, static_inputs, result)


class _Function:
    """``f`` as a key of the graph cache: it holds ``f``, so no other function can take its ``id``.

    Equal for the same function, and for bound methods of the same function and object (a new method
    object is made at every attribute access); an unhashable callable is compared by identity.
    """

    def __init__(self, f: object) -> None:
        self.f = f
        try:
            self._hash = hash(f)
        except TypeError:
            self._hash = id(f)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Function):
            return NotImplemented
        try:
            return self.f is other.f or bool(self.f == other.f)
        except TypeError:
            return False


def _copied(result: SolverResult) -> SolverResult:
    """The result with every tensor copied out of the graph's buffers (the next replay overwrites them)."""
    values: dict[str, Any] = {}
    for name, value in vars(result).items():
        values[name] = value.clone() if isinstance(value, Tensor) else value
    return SolverResult(**values)
