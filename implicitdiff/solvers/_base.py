"""The solver protocol, the result every solver returns, and the residual rule.

A *solver* finds ``z`` with ``g(z) = z`` for a batched map ``g``. It sees neither the
module ``f`` nor its input ``x``: the layer binds them into ``g(z) = f(z, x)``. Any callable
with the call below is a solver; nothing in the library tests for our own classes. Our own
solvers are update rules run by one driver, :func:`~implicitdiff.solvers.iterate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .._validate import check_int, check_real

__all__ = [
    "DEFAULT_CHECK_EVERY",
    "STOP_MODES",
    "Solver",
    "SolverResult",
    "check_solve_args",
    "check_stop_mode",
    "residual_norm",
    "working_dtype",
]

STOP_MODES = ("abs", "rel")

#: Added to ``||g(z)||`` in the relative residual so that a zero fixed point is not a division by zero.
REL_EPS = 1e-9

#: How many iterations pass between two host reads of the "all converged?" flag in tolerance mode.
#:
#: A read makes the host wait for the device (one synchronisation); skipping reads costs at most
#: ``check_every - 1`` evaluations of a batch that has already converged. With a read costing about
#: ``c`` evaluations of ``g`` and a solve of ``N`` iterations, the overhead ``c N / k + (k - 1) / 2``
#: is smallest at ``k = sqrt(2 c N)``: 4 to 8 for the usual ``N = 15 ... 50`` and ``c`` between 0.5
#: (small maps on a GPU, where a wait exposes the launch latency of a whole iteration) and 1. We take
#: 4, the low end, because a large ``f`` makes ``c`` smaller, not larger. Results never depend on it:
#: converged samples are frozen.
DEFAULT_CHECK_EVERY = 4


@dataclass
class SolverResult:
    """What a solve returns.

    Every tensor stays on the device of ``z0``; reading it (``float(...)``, ``bool(...)``) is the
    caller's choice of when to wait for the device.

    Attributes
    ----------
    z : Tensor
        Per sample, the iterate the residual describes, shape ``(B, ...)`` and the dtype of ``z0``:
        in tolerance mode the one with the lowest residual seen; with a fixed budget (``tol=None``) the
        last iterate (the best one for solvers that track residuals to restart, see
        :func:`~implicitdiff.solvers.iterate`).
    residual : Tensor
        ``(B,)`` residual of ``z`` in the requested ``stop_mode``: ``||g(z) - z||`` for ``"abs"``.
    converged : Tensor
        ``(B,)`` bool, ``residual <= tol``; all ``False`` with a fixed budget (no tolerance was set).
    nfe : int
        Number of (batched) evaluations of ``g``.
    trace : Tensor
        ``(nfe,)``: per evaluation, the largest residual over the samples still iterating (``0`` once
        none is). Empty with a fixed budget, where no residual is computed between evaluations.
    nonfinite : Tensor
        ``(B,)`` bool: ``g`` returned a non-finite value for this sample, or one whose residual overflows
        the working dtype (a float32 norm overflows past about ``1e19``). In tolerance mode such a
        sample stops iterating and returns its best finite iterate (``z0`` if none was seen).
    fz : Tensor or None
        ``g(z)``, the image of the returned iterate, which the solver has already computed (``None``
        where a solver does not provide it). For a contraction it is closer to the fixed point than
        ``z``, but its own residual is unknown without one more evaluation.
    evaluations : Tensor or None
        ``(B,)`` int: evaluations of ``g`` per sample while it was still iterating. The batched
        ``nfe`` can be larger, since converged samples ride along in the batch until the host looks
        (see :attr:`frozen_evaluations`).
    """

    z: Tensor
    residual: Tensor
    converged: Tensor
    nfe: int
    trace: Tensor | None = None
    nonfinite: Tensor | None = None
    fz: Tensor | None = None
    evaluations: Tensor | None = None

    def __post_init__(self) -> None:
        if self.nonfinite is None:
            self.nonfinite = torch.zeros_like(self.converged)
        if self.trace is None:
            self.trace = self.residual.new_zeros(0)
        if self.evaluations is None:
            self.evaluations = torch.full_like(self.converged, self.nfe, dtype=torch.long)

    @property
    def all_converged(self) -> bool:
        """Whether every sample reached the tolerance (reads one flag from the device)."""
        return bool(self.converged.all())

    @property
    def frozen_evaluations(self) -> int:
        """Evaluations of samples that had already converged or failed, ``nfe * B - sum(evaluations)``.

        A batch runs until its last sample stops, and every evaluation maps the whole batch, so a sample
        that stopped early keeps being evaluated (its state frozen) until then.
        """
        assert self.evaluations is not None
        return self.nfe * self.converged.numel() - int(self.evaluations.sum())

    def summary(self) -> str:
        """One line for logs: samples converged, max residual, evaluations."""
        assert self.nonfinite is not None
        return (
            f"converged {int(self.converged.sum())}/{self.converged.numel()}, "
            f"max residual {float(self.residual.max()):.3e}, nfe {self.nfe}"
            + (f", non-finite {int(self.nonfinite.sum())}" if bool(self.nonfinite.any()) else "")
        )


@runtime_checkable
class Solver(Protocol):
    """Anything that solves ``z = g(z)`` for a batch.

    ``g`` maps a tensor of shape ``(B, ...)`` to one of the same shape, dtype and device;
    samples are independent along the first dimension. Our solvers also take ``tol=None`` (a
    fixed budget of exactly ``max_iter`` evaluations) and ``check_every``; the layer passes those
    only when the user asks for them, so a callable with just this call is a solver too.
    """

    def __call__(
        self,
        g: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        max_iter: int,
        tol: float,
        stop_mode: str = "abs",
    ) -> SolverResult: ...


def check_solve_args(
    max_iter: object, tol: object, stop_mode: object, check_every: object = None
) -> tuple[int, float | None, str, int]:
    """Validate the solve arguments; returns them normalised (numpy numbers become Python ones).

    ``max_iter`` is an int >= 1; ``tol`` a finite float > 0 or ``None`` (fixed budget); ``stop_mode``
    one of :data:`STOP_MODES`; ``check_every`` an int >= 1 or ``None`` (:data:`DEFAULT_CHECK_EVERY`).
    """
    max_iter = check_int("max_iter", max_iter, low=1)
    if tol is not None:
        tol = check_real("tol", tol, low=0.0, low_open=True)
    every = DEFAULT_CHECK_EVERY if check_every is None else check_int("check_every", check_every, low=1)
    return max_iter, tol, check_stop_mode(stop_mode), every


def check_stop_mode(stop_mode: object) -> str:
    """``stop_mode`` if it is one of :data:`STOP_MODES`, else ``ValueError``."""
    if not isinstance(stop_mode, str) or stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    return stop_mode


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a solver keeps its state and linear algebra in: ``dtype``, at least float32."""
    if not dtype.is_floating_point:
        raise TypeError(f"z0 must have a floating-point dtype, got {dtype}")
    return torch.promote_types(dtype, torch.float32)


def residual_norm(fz: Tensor, z: Tensor, stop_mode: str, diff: Tensor | None = None) -> Tensor:
    r"""Per-sample residual of flattened states ``(B, n)``.

    ``abs``: :math:`\|g(z) - z\|_2`; ``rel``: :math:`\|g(z) - z\|_2 / (\|g(z)\|_2 + 10^{-9})`.
    Non-finite rows give ``inf``. ``diff``, if given, is ``fz - z`` already computed by the caller.
    """
    res = torch.linalg.vector_norm(fz - z if diff is None else diff, dim=1)
    if stop_mode == "rel":
        res = res / (torch.linalg.vector_norm(fz, dim=1) + REL_EPS)
    return torch.nan_to_num(res, nan=float("inf"), posinf=float("inf"))
