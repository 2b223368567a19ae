"""The solver protocol, the result every solver returns, and the shared bookkeeping.

A *solver* finds ``z`` with ``g(z) = z`` for a batched map ``g``. It sees neither the
module ``f`` nor its input ``x``: the layer binds them into ``g(z) = f(z, x)``. Any callable
with the call below is a solver; nothing in the library tests for our own classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "STOP_MODES",
    "IterationTracker",
    "Solver",
    "SolverResult",
    "check_solve_args",
    "residual_norm",
    "working_dtype",
]

STOP_MODES = ("abs", "rel")

#: Added to ``||g(z)||`` in the relative residual so that a zero fixed point is not a division by zero.
REL_EPS = 1e-9


@dataclass
class SolverResult:
    """What a solve returns.

    Attributes
    ----------
    z : Tensor
        Per sample, the iterate with the lowest residual seen, shape ``(B, ...)`` and the dtype of ``z0``.
    residual : Tensor
        ``(B,)`` residual of the returned ``z`` in the requested ``stop_mode``.
    converged : Tensor
        ``(B,)`` bool, ``residual <= tol``.
    nfe : int
        Number of (batched) evaluations of ``g``.
    trace : list[float]
        Per evaluation, the largest residual over the samples still iterating.
    nonfinite : Tensor
        ``(B,)`` bool: ``g`` returned a non-finite value for this sample at some point. Such a sample
        stops iterating and returns its best finite iterate (``z0`` if none was seen).
    fz : Tensor or None
        ``g(z)``, the image of the returned iterate, which the solver has already computed (``None``
        where a solver does not provide it). For a contraction it is closer to the fixed point than
        ``z``; the layer returns it, so that ``n`` evaluations give ``n`` Picard steps, not ``n - 1``.
    """

    z: Tensor
    residual: Tensor
    converged: Tensor
    nfe: int
    trace: list[float] = field(default_factory=list)
    nonfinite: Tensor | None = None
    fz: Tensor | None = None

    def __post_init__(self) -> None:
        if self.nonfinite is None:
            self.nonfinite = torch.zeros_like(self.converged)

    @property
    def all_converged(self) -> bool:
        """Whether every sample reached the tolerance."""
        return bool(self.converged.all())

    def summary(self) -> str:
        """One line for logs: samples converged, max residual, evaluations."""
        return (
            f"converged {int(self.converged.sum())}/{self.converged.numel()}, "
            f"max residual {float(self.residual.max()):.3e}, nfe {self.nfe}"
            + (f", non-finite {int(self.nonfinite.sum())}" if bool(self.nonfinite.any()) else "")
        )


@runtime_checkable
class Solver(Protocol):
    """Anything that solves ``z = g(z)`` for a batch.

    ``g`` maps a tensor of shape ``(B, ...)`` to one of the same shape, dtype and device;
    samples are independent along the first dimension.
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


def check_solve_args(max_iter: object, tol: object, stop_mode: object) -> None:
    """Raise a clear error for a bad ``max_iter``, ``tol`` or ``stop_mode``."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int):
        raise TypeError(f"max_iter must be an int, got {type(max_iter).__name__} {max_iter!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a float, got {type(tol).__name__} {tol!r}")
    if not tol > 0 or tol != tol or tol == float("inf"):
        raise ValueError(f"tol must be a finite float > 0, got {tol}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")


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


class IterationTracker:
    """Bookkeeping shared by all our solvers.

    Wraps ``g`` to work on flat ``(B, n)`` states in the working dtype, counts evaluations, keeps the
    best iterate per sample, which samples are still active (not converged, nothing non-finite seen),
    and the residual trace. Solvers only write the update rule.
    """

    def __init__(
        self,
        g: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        max_iter: int,
        tol: float,
        stop_mode: str,
    ) -> None:
        check_solve_args(max_iter, tol, stop_mode)
        if not isinstance(z0, Tensor):
            raise TypeError(f"z0 must be a Tensor, got {type(z0).__name__}")
        if z0.dim() < 1 or z0.shape[0] == 0:
            raise ValueError(f"z0 must have shape (B, ...) with B >= 1, got {tuple(z0.shape)}")
        self._g = g
        self.shape = z0.shape
        self.dtype = z0.dtype
        self.wdtype = working_dtype(z0.dtype)
        self.max_iter = max_iter
        self.tol = float(tol)
        self.stop_mode = stop_mode
        batch = z0.shape[0]
        z0_flat = z0.detach().reshape(batch, -1).to(self.wdtype)
        self.best_z = z0_flat.clone()
        self.best_fz = z0_flat.clone()
        self.best_res = torch.full((batch,), float("inf"), dtype=self.wdtype, device=z0.device)
        self.active = torch.ones(batch, dtype=torch.bool, device=z0.device)
        self.nonfinite = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.nfe = 0
        self.trace: list[float] = []

    def z0(self) -> Tensor:
        """The flat starting point in the working dtype."""
        return self.best_z.clone()

    def g(self, z: Tensor) -> Tensor:
        """Evaluate ``g`` on a flat state; returns the flat image in the working dtype."""
        out = self._g(z.reshape(self.shape).to(self.dtype))
        self.nfe += 1
        if not isinstance(out, Tensor) or out.shape != self.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the fixed-point map must return a tensor shaped like z0 {tuple(self.shape)}, got {got}"
            )
        return out.reshape(self.shape[0], -1).to(self.wdtype)

    def record(self, z: Tensor, fz: Tensor, diff: Tensor | None = None) -> Tensor:
        """Record the residual of iterate ``z`` with image ``fz``; returns the residual ``(B,)``.

        Updates the best iterate of the samples that are still active, marks samples as converged
        (residual <= tol) or failed (non-finite image), and appends to the trace. ``diff`` is
        ``fz - z`` when the solver has computed it anyway (saves a pass over the state).
        """
        res = residual_norm(fz, z, self.stop_mode, diff)
        # Any non-finite entry of z or g(z) makes the residual non-finite (residual_norm maps NaN to
        # inf), so the (B,) residual clears the common case without two passes over the state; only
        # when it is not finite do we look at the values (a norm can also overflow on finite values).
        finite = torch.isfinite(res)
        if not bool(finite.all()):
            finite = torch.isfinite(fz).all(dim=1) & torch.isfinite(z).all(dim=1)
            res = torch.where(finite, res, torch.full_like(res, float("inf")))
        was_active = self.active
        self.trace.append(float(res[was_active].max()) if bool(was_active.any()) else 0.0)
        better = was_active & finite & (res < self.best_res)
        self.best_res = torch.where(better, res, self.best_res)
        if bool(better.all()):
            # The common case: every sample improved. Keep references, not copies; solvers never
            # write into an iterate after recording it.
            self.best_z, self.best_fz = z, fz
        else:
            self.best_z = torch.where(better[:, None], z, self.best_z)
            self.best_fz = torch.where(better[:, None], fz, self.best_fz)
        self.nonfinite = self.nonfinite | (was_active & ~finite)
        # A sample whose map went non-finite cannot continue meaningfully: it keeps its best iterate.
        self.active = was_active & finite & (res > self.tol)
        return res

    def diverged(self, res: Tensor, factor: float) -> Tensor:
        """``(B,)`` bool: active samples whose residual ``res`` exceeds ``factor`` times their best."""
        return self.active & (res > factor * self.best_res)

    def done(self) -> bool:
        """Whether every sample has converged or failed, or the evaluation budget is spent."""
        return self.nfe >= self.max_iter or not bool(self.active.any())

    def result(self) -> SolverResult:
        """Assemble the :class:`SolverResult` from the best iterates."""
        z = self.best_z.reshape(self.shape).to(self.dtype)
        return SolverResult(
            z=z,
            residual=self.best_res,
            converged=self.best_res <= self.tol,
            nfe=self.nfe,
            trace=self.trace,
            nonfinite=self.nonfinite,
            fz=self.best_fz.reshape(self.shape).to(self.dtype),
        )
