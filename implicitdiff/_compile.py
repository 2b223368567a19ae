"""What ``torch.compile`` must not trace, and how the library writes in place whether it traces or not.

A solve's number of iterations depends on the data (a tolerance, a drawn budget): traced, it would be a
guard of the compiled graph and each new count a recompilation, so solves run eagerly
(:func:`outside_compile`). Inside code that ``torch.compile`` may trace, ``out=`` into a strided view
and the tensors' version counters are not available (:func:`write_into`, :func:`call_watching_input`).

Nothing here imports ``torch._dynamo``: it costs seconds per process, and a program that never compiles
should not load the compiler. Only ``torch.compile`` itself brings it in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

__all__ = ["call_watching_input", "compiling", "outside_compile", "write_into"]

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def outside_compile(fn: _Fn) -> _Fn:
    """``fn`` run eagerly when ``torch.compile`` meets it (a graph break around it).

    A solve's number of iterations depends on the data (a tolerance, a drawn budget): traced, it would
    become a guard of the compiled graph, and each new count a recompilation. Run outside, it costs one
    graph break, and the code around it compiles once.

    When the compiler traces the call, it meets ``torch.compiler.disable(fn)`` (made at that first call,
    torch's lazy form of it) and steps out; an eager call goes straight to ``fn``, so a program that
    never compiles never imports the compiler (``torch._dynamo``: seconds per process).
    """
    disabled = torch._disable_dynamo(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return cast(_Fn, call)


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller."""
    return bool(torch.compiler.is_compiling())


def write_into(out: Tensor, op: Callable[..., Tensor], *args: Any, **kwargs: Any) -> None:
    """``out[...] = op(*args)`` with no temporary in eager mode (``op(*args, out=out)``).

    ``torch.compile`` refuses ``out=`` into a strided view (a slot of a history buffer); there the
    result is copied in, and the compiler fuses the two.
    """
    if compiling():
        out.copy_(op(*args, **kwargs))
    else:
        op(*args, **kwargs, out=out)


def call_watching_input(fn: Callable[..., Any], x: Tensor, *leading: Any) -> tuple[Any, bool]:
    """``fn(*leading, x)`` and whether it wrote into ``x`` in place.

    The version counter sees in-place writes for free (no copy), but ``torch.compile`` cannot trace it:
    under compilation the write is not detected and ``False`` is returned.
    """
    if compiling() or x.is_inference():
        # Inference tensors have no version counter: under torch.inference_mode() the check is skipped.
        return fn(*leading, x), False
    version = x._version
    out = fn(*leading, x)
    return out, x._version != version
