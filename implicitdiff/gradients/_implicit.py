"""The autograd machinery behind :class:`~implicitdiff.gradients.IFT`.

A fixed point ``p* = phi(p*, *inputs)`` is attached to autograd as the output of one
``torch.autograd.Function`` whose inputs are every tensor ``phi`` depends on: the *explicit* inputs
(``x`` and tensors passed as ``f_kwargs``, which the map exposes) and the *hidden* leaves it closes
over (``f``'s parameters), found by walking the graph of one evaluation of ``phi``. No tensor hooks
are used, so a layer called several times in one graph gives independent nodes.

First-order backward solves the adjoint fixed point ``u = u J + g`` and returns ``u dphi/dinputs``.
Under ``create_graph=True`` the backward is itself built from differentiable pieces: the adjoint is
attached by the same machinery (it is the fixed point of ``h(u) = g + u J(p)``), and the partial
derivatives ``u dphi/dinputs`` are computed on detached proxies and reconnected to the real tensors
by :class:`_Reconnect`, so that every order of derivative sees ``p*``, ``u`` and the inputs as the
functions of the parameters they are.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..solvers import SolverResult

__all__ = ["NO_FORWARD_MODE", "AdjointSolve", "implicit_attach"]

#: ``solve(vjp_map, g) -> SolverResult`` solves ``u = vjp_map(u)`` (which already includes ``+ g``).
AdjointSolve = Callable[[Callable[[Tensor], Tensor], Tensor], SolverResult]


def eager_graph() -> contextlib.AbstractContextManager[object]:
    """A context in which a compiled ``f`` runs eagerly, so that its graph is autograd's own.

    The adjoint solve differentiates one evaluation's graph once per iteration (``retain_graph=True``).
    AOTAutograd compiles a compiled region's backward for one use: its saved activations are *donated
    buffers* the backward may free or overwrite (``torch._functorch.config.donated_buffer``). When the
    forward saves a symbolic size (dynamic shapes: a second batch size, or two widths meeting one
    function), it compiles that backward at once, with donated buffers, and refuses a second use
    ("compiled with non-empty donated buffers"). Evaluated eagerly, the graph can be used any number of
    times. Before torch 2.6 (no ``set_stance``, no donated buffers) this is a null context, and so it is
    while ``torch._dynamo`` is not loaded (nothing can have been compiled; ``set_stance`` would load it).
    """
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    try:
        set_stance = torch.compiler.set_stance
    except AttributeError:  # torch < 2.6
        return contextlib.nullcontext()
    stance: contextlib.AbstractContextManager[object] = set_stance("force_eager")
    return stance


def _proxy(tensor: Tensor) -> Tensor:
    """A leaf with the value of ``tensor`` that requires grad, for partial derivatives."""
    return tensor.detach().requires_grad_(True)


def hidden_leaves(output: Tensor, exclude: Sequence[Tensor]) -> list[Tensor]:
    """The leaf tensors requiring grad that ``output``'s graph reaches, except those in ``exclude``.

    The walk goes through non-leaf tensors a closure captured (their history is part of the map),
    so a tensor computed outside ``f`` and captured by it is differentiated through correctly; pass
    such tensors as ``f_kwargs`` instead to keep the walk (and the backward) inside ``f``.

    The leaves come back in the order the walk first meets them, each once. Every node object the
    walk has touched is kept alive in ``visited`` until it ends: before torch 2.13 the Python wrapper
    of an autograd node is created on access and freed when dropped, so a freed wrapper's ``id()``
    could be reused by the next one (often a parameter's ``AccumulateGrad``), which a set of ids
    would then wrongly skip. Holding the wrappers makes their ids unique for the whole walk.
    """
    skip = {id(t) for t in exclude}
    found: dict[int, Tensor] = {}
    visited: dict[int, object] = {}  # id -> node; the node held so that its id is not reused
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited[id(node)] = node
        variable = getattr(node, "variable", None)
        if variable is not None:  # an AccumulateGrad node: a leaf
            if id(variable) not in skip:
                found.setdefault(id(variable), variable)
            continue
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return list(found.values())


@dataclass
class _Problem:
    """Everything the backward of one attached fixed point needs."""

    phi: Callable[..., Tensor]
    p_star: Tensor
    explicit: tuple[Tensor, ...]
    diff_index: list[int]
    hidden: list[Tensor]
    solve: AdjointSolve
    p_leaf: Tensor
    proxies: list[Tensor]
    image: Tensor | None = None  # phi(p_leaf, *proxies), built once with grad

    def call_with(self, p: Tensor, diff_inputs: Sequence[Tensor]) -> Tensor:
        explicit = list(self.explicit)
        for index, tensor in zip(self.diff_index, diff_inputs, strict=True):
            explicit[index] = tensor
        with eager_graph():  # the adjoint differentiates this graph many times
            return self.phi(p, *explicit)

    def adjoint(self, g: Tensor) -> Tensor:
        """Solve ``u = u J + g`` (no graph), with ``J`` the Jacobian of ``phi`` in ``p`` at ``p*``."""
        image, p_leaf = self.image, self.p_leaf
        assert image is not None, "the image is built when the problem is attached"

        def vjp_map(u: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(image, p_leaf, u, retain_graph=True)
            return vjp + g

        with torch.no_grad():
            return self.solve(vjp_map, g.detach()).z


def implicit_attach(
    phi: Callable[..., Tensor],
    p_star: Tensor,
    explicit: Sequence[Tensor],
    solve: AdjointSolve,
    hidden: Sequence[Tensor] | None = None,
) -> Tensor:
    """Return ``p*`` attached to autograd by the implicit function theorem.

    Parameters
    ----------
    phi : callable
        ``phi(p, *explicit) -> p``; may close over leaf tensors (parameters).
    p_star : Tensor
        The fixed point (detached).
    explicit : sequence of Tensor
        Tensors passed to ``phi`` explicitly; those requiring grad receive gradients.
    solve : AdjointSolve
        Solves the adjoint fixed point.
    hidden : sequence of Tensor, optional
        The leaves ``phi`` closes over; found by walking the graph when not given.
    """
    explicit = tuple(explicit)
    diff_index = [i for i, t in enumerate(explicit) if isinstance(t, Tensor) and t.requires_grad]
    proxies = [_proxy(explicit[i]) for i in diff_index]
    p_leaf = _proxy(p_star)
    problem = _Problem(phi, p_star.detach(), explicit, diff_index, [], solve, p_leaf, proxies)
    with torch.enable_grad():
        problem.image = problem.call_with(p_leaf, proxies)
    if hidden is None:
        hidden = hidden_leaves(problem.image, [p_leaf, *proxies])
    problem.hidden = list(hidden)
    real = [explicit[i] for i in diff_index]
    attached: Tensor = _ImplicitFunction.apply(problem, *real, *problem.hidden)
    return attached


#: The one line forward-mode AD meets: the implicit machinery is reverse mode only.
NO_FORWARD_MODE = (
    "IFT has no forward-mode derivative (torch.autograd.forward_ad, torch.func.jvp): use JFB() or "
    "PhantomGradient() for forward mode, or IFT with reverse mode (.backward(), torch.autograd.grad)"
)


class _ImplicitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, problem: _Problem, *inputs: Tensor) -> Tensor:
        ctx.problem = problem
        out = problem.p_star.clone()
        ctx.save_for_backward(out, *inputs)
        return out

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> Tensor:
        raise RuntimeError(NO_FORWARD_MODE)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        problem: _Problem = ctx.problem
        p_att, *inputs = ctx.saved_tensors
        n_diff = len(problem.diff_index)
        assert problem.image is not None
        if not torch.is_grad_enabled():
            u = problem.adjoint(g)
            grads = torch.autograd.grad(
                problem.image, [*problem.proxies, *problem.hidden], u, retain_graph=True, allow_unused=True
            )
            return (None, *grads)

        # create_graph=True: build the gradient from differentiable pieces.
        real_diff, hidden = inputs[:n_diff], inputs[n_diff:]
        u_star = problem.adjoint(g)
        explicit_real = list(problem.explicit)
        for index, tensor in zip(problem.diff_index, real_diff, strict=True):
            explicit_real[index] = tensor

        def adjoint_map(u: Tensor, g_: Tensor, p_: Tensor, *explicit_: Tensor) -> Tensor:
            with torch.enable_grad():
                image = problem.phi(p_, *explicit_)
                (vjp,) = torch.autograd.grad(image, p_, u, create_graph=True)
            return g_ + vjp

        u_att = implicit_attach(adjoint_map, u_star, [g, p_att, *explicit_real], problem.solve, hidden)

        p_px, u_px = _proxy(p_att), _proxy(u_att)
        diff_px = [_proxy(t) for t in real_diff]
        with torch.enable_grad():
            image = problem.call_with(p_px, diff_px)
            partials = torch.autograd.grad(
                image, [*diff_px, *hidden], u_px, create_graph=True, allow_unused=True
            )
        reconnected = reconnect(
            partials, [p_px, *diff_px, u_px, *hidden], [p_att, *real_diff, u_att, *hidden]
        )
        return (None, *reconnected)


def reconnect(
    outputs: Sequence[Tensor | None], proxies: Sequence[Tensor], reals: Sequence[Tensor]
) -> list[Tensor | None]:
    """Re-express ``outputs``, computed from leaf ``proxies``, as functions of ``reals``.

    The values are unchanged; the derivative of an output with respect to ``reals[i]`` is its
    derivative with respect to ``proxies[i]`` (to every order).
    """
    live = [i for i, out in enumerate(outputs) if out is not None and out.requires_grad]
    result = list(outputs)
    if not live:
        return result
    attached = _Reconnect.apply([outputs[i] for i in live], list(proxies), *reals)
    for i, tensor in zip(live, attached, strict=True):
        result[i] = tensor
    return result


class _Reconnect(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, outputs: list[Tensor], proxies: list[Tensor], *reals: Tensor) -> tuple[Tensor, ...]:
        ctx.outputs, ctx.proxies = outputs, proxies
        ctx.save_for_backward(*reals)
        return tuple(out.detach().clone() for out in outputs)

    @staticmethod
    def backward(ctx: Any, *d_outputs: Tensor) -> tuple[Tensor | None, ...]:
        reals = ctx.saved_tensors
        outputs, proxies = ctx.outputs, ctx.proxies
        if not torch.is_grad_enabled():
            grads = torch.autograd.grad(outputs, proxies, d_outputs, retain_graph=True, allow_unused=True)
            return (None, None, *grads)
        d_px = [_proxy(d) for d in d_outputs]
        with torch.enable_grad():
            grads = torch.autograd.grad(
                outputs, proxies, d_px, retain_graph=True, create_graph=True, allow_unused=True
            )
        return (None, None, *reconnect(grads, [*proxies, *d_px], [*reals, *d_outputs]))
