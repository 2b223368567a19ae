"""What the sequential and the parallel sampler share: the model call, the sampling run, the summary.

The two samplers differ in how they walk the timesteps (one after another, or all at once as one fixed
point); what happens at a timestep is the same and is written here once: the model's noise prediction
with classifier-free guidance (:func:`model_eps`), the model in eval mode for the run (:func:`sampling_run`)
and the costs as JSON (:class:`RunSummary`). The reverse update itself is
:meth:`fpdm.diffusion.GaussianDiffusion.ddim_step`, which takes one timestep or many.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fpdm.models import ModelState

__all__ = ["RunClock", "RunSummary", "model_eps", "sampling_run"]


def model_eps(
    model: Any,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    *,
    guidance: float = 1.0,
    null_label: int | None = None,
    **options: Any,
) -> tuple[Tensor, ModelState]:
    r"""The model's predicted noise and its state, with classifier-free guidance (Ho & Salimans 2021).

    .. math:: \hat\epsilon = \epsilon_\theta(x, t, \varnothing) + w\,(\epsilon_\theta(x, t, y)
              - \epsilon_\theta(x, t, \varnothing))

    ``guidance = 1`` calls the model once on ``(x, t, y)``; any other ``w`` calls it once on the doubled
    batch ``cat([x, x])``, ``cat([t, t])``, ``cat([y, null])``, whose state is returned (its ``z`` is the
    warm start of the doubled batch). ``null_label`` defaults to ``model.null_label``; ``options`` go to
    the model (``max_iter``, ``tol``, ``solver``, ``z0`` for FPDM).
    """
    if guidance == 1.0:
        return model(x, t, y, **options)
    null = model.null_label if null_label is None else null_label
    batch = x.shape[0]
    both, state = model(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]), **options
    )
    eps_cond, eps_uncond = both[:batch], both[batch:]
    return eps_uncond + guidance * (eps_cond - eps_uncond), state


@dataclasses.dataclass
class RunClock:
    """Wall-clock of a sampling run, set when the run ends."""

    wall_s: float = math.nan


@contextlib.contextmanager
def sampling_run(model: nn.Module) -> Iterator[RunClock]:
    """The model in eval mode for a sampling run (its mode restored afterwards, even on an error); the
    yielded clock holds the run's wall-clock once the block ends."""
    clock = RunClock()
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        yield clock
        clock.wall_s = time.perf_counter() - start
    finally:
        model.train(was_training)


def _json_ready(value: Any) -> Any:
    """Lists of floats with ``nan`` or ``inf`` (no residual) as ``None``; anything else as it is."""
    if isinstance(value, list):
        return [None if isinstance(v, float) and not math.isfinite(v) else v for v in value]
    return value


class RunSummary:
    """:meth:`summary` for the result dataclasses of the samplers: their options, then the fields named in
    ``SUMMARY``, as plain JSON-ready values (no images)."""

    SUMMARY: ClassVar[tuple[str, ...]] = ()
    options: dict[str, Any]
    images: Tensor

    @property
    def num_images(self) -> int:
        """Samples in the result."""
        return int(self.images.shape[0])

    def summary(self) -> dict[str, Any]:
        """The options and costs of the run as plain JSON-ready values (no images)."""
        return {**self.options, **{name: _json_ready(getattr(self, name)) for name in self.SUMMARY}}
