"""Argument checks shared by the whole package: one clear error per bad value.

Python and numpy numbers are accepted alike (``numpy.int64(5)`` is an int, ``numpy.float32(0.5)`` a
float); ``bool`` is never a number here, and every error names the argument, what it got and what is
allowed.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import torch

__all__ = [
    "check_bool",
    "check_int",
    "check_real",
    "forward_mode_active",
    "has_tangent",
    "refuse_class",
    "refuse_functorch",
    "renamed_argument",
    "warn_caller",
]

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (``numpy.bool_`` included), else ``TypeError``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_describe(value)}")


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int if it is an integer (not a bool) within ``[low, high]``.

    Raises ``TypeError`` for a non-integer and ``ValueError`` for one out of range.
    """
    allowed = "an int" + (f" >= {low}" if low is not None else "")
    allowed += f" <= {high}" if high is not None else ""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {_describe(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a Python float if it is a real number (not a bool) in the given interval.

    ``low``/``high`` bound the interval, closed unless ``low_open``/``high_open``; ``finite`` refuses
    ``inf``; NaN is always refused. Raises ``TypeError`` for a non-number and ``ValueError`` otherwise.
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    allowed = ("a finite float" if finite else "a float") + (" " + " and ".join(parts) if parts else "")
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {_describe(value)}")
    value = float(value)
    bad = math.isnan(value) or (finite and math.isinf(value))
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def refuse_class(name: str, value: object) -> None:
    """A ``TypeError`` if ``value`` is a class where an instance of it is wanted (``solver=Anderson``).

    A class is callable, so it would pass for a solver or a map and fail at its first call instead.
    """
    if isinstance(value, type):
        raise TypeError(
            f"{name} must be an instance, got the class {value.__name__}: pass {value.__name__}() "
            "(with its options, if any)"
        )


def refuse_functorch(what: str, tensors: Iterable[object], instead: str, *, vmap_only: bool = False) -> None:
    """A one-line ``RuntimeError`` if a tensor is wrapped by a ``torch.func`` transform.

    With ``vmap_only`` only ``torch.func.vmap`` is refused; ``instead`` says what to use.
    """
    functorch = torch._C._functorch
    check = functorch.is_batchedtensor if vmap_only else functorch.is_functorch_wrapped_tensor
    if any(isinstance(t, torch.Tensor) and check(t) for t in tensors):
        under = "torch.func.vmap" if vmap_only else "torch.func transforms (grad, vjp, jvp, jacrev, vmap)"
        raise RuntimeError(f"{what} does not run under {under}: {instead}")


def forward_mode_active() -> bool:
    """Whether forward-mode AD could be under way: a ``forward_ad.dual_level`` or a ``torch.func`` transform.

    Two flag reads: the per-tensor check :func:`has_tangent` is then only paid where it can matter.
    """
    return (
        torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None
    )


def has_tangent(tensor: object) -> bool:
    """Whether ``tensor`` carries a forward-mode tangent (``torch.autograd.forward_ad``, ``torch.func.jvp``).

    Under ``torch.func`` transforms the tensors are wrapped; a wrapped tensor is taken as carrying one.
    """
    if not isinstance(tensor, torch.Tensor):
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        return True
    return torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None


def warn_caller(message: str, category: type[Warning] = DeprecationWarning) -> None:
    """Warn, pointing at the first frame outside implicitdiff and torch: the user's line.

    A layer's ``forward`` and ``set_extra_state`` are called through torch's own frames
    (``Module.__call__``, ``load_state_dict``), whose depth differs between torch versions; Python shows
    a ``DeprecationWarning`` by default only when it points at the user's ``__main__``.
    """
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in _OURS:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


_OURS = ("implicitdiff", "torch")


def renamed_argument(old: str, new: str) -> Callable[[_Fn], _Fn]:
    """A decorator: the keyword argument ``old`` still reaches ``new``, with a ``DeprecationWarning``.

    The decorated function keeps its own signature (``functools.wraps``), so the documentation shows
    only the new name.
    """

    def decorate(fn: _Fn) -> _Fn:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(
                        f"{fn.__name__}() got {new} and {old}, its deprecated name: pass {new} only"
                    )
                warn_caller(f"{fn.__name__}({old}=...) is deprecated: the argument is called {new}")
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return cast(_Fn, call)

    return decorate
