r"""The noise schedule of the diffusion: linear betas, their cumulative products, respaced timesteps.

Kept apart from the steps (:mod:`fpdm.diffusion`) as k-diffusion keeps schedules apart from samplers.
Values are kept in float64 (``1 - alpha_bar`` near ``t = 0`` is tiny and loses digits in float32) and
read on the host as Python floats, so a sampling loop never waits on the device for them.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

__all__ = ["SPACINGS", "NoiseSchedule"]

#: The timestep spacings of :meth:`NoiseSchedule.respace`.
SPACINGS = ("trailing", "linspace")


class NoiseSchedule:
    r"""A linear :math:`\beta` schedule (Ho et al. 2020, as DiT uses it) over timesteps ``0 .. T-1``.

    Parameters
    ----------
    num_timesteps : int
        Number of diffusion steps ``T``; timesteps are ``0 .. T-1``.
    beta_start, beta_end : float
        The linear schedule :math:`\beta_t` from ``beta_start`` to ``beta_end``.
    spacing : {"trailing", "linspace"}
        How :meth:`respace` picks ``S`` of the ``T`` timesteps. ``"trailing"`` (Lin et al. 2024, "Common
        diffusion noise schedules and sample steps are flawed"): :math:`t_i = \mathrm{round}(T - iT/S) - 1`,
        which starts at ``T - 1`` and ends at ``T/S - 1``; ``"linspace"``: ``S`` points from ``T - 1`` to
        ``0`` both included, as DiT samples. With few steps ``"linspace"`` wastes its last evaluation at
        ``t = 0``, where nothing is left to denoise, and its second-to-last step predicts :math:`x_0` from
        almost pure noise: on the digits, 2 linspace steps ``[999, 0]`` give noise and 2 trailing steps
        ``[999, 499]`` give digits. With many steps the two agree (``S = T`` gives every timestep either way).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        spacing: str = "trailing",
    ) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        self.num_timesteps = num_timesteps
        self.spacing = spacing
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # Host copies for the sampling loop (Python floats: reading them never waits for a device) and,
        # per device and dtype, the tables of q_sample (indexing them on the device needs no copy back).
        self._abar_host: list[float] = [1.0, *self.alphas_cumprod.tolist()]
        self._q_tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def alpha_bar(self, t: int | Tensor) -> Tensor:
        r""":math:`\bar\alpha_t` in float64; ``t = -1`` gives 1 (no noise)."""
        t = torch.as_tensor(t, dtype=torch.long)
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return padded[t + 1]

    def _abar(self, t: int) -> float:
        r""":math:`\bar\alpha_t` of one integer timestep as a Python float (``t = -1`` gives 1)."""
        if not -1 <= t < self.num_timesteps:
            raise IndexError(f"timestep {t} is outside [-1, {self.num_timesteps})")
        return self._abar_host[t + 1]

    def _q_table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        r"""``(T, 2)``: :math:`\sqrt{\bar\alpha_t}` and :math:`\sqrt{1 - \bar\alpha_t}` (float64 maths)."""
        key = (device, dtype)
        if key not in self._q_tables:
            abar = self.alphas_cumprod
            table = torch.stack([abar.sqrt(), (1 - abar).sqrt()], dim=1)
            self._q_tables[key] = table.to(device=device, dtype=dtype)
        return self._q_tables[key]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        r"""Noise clean data to timesteps ``t`` ``(B,)``.

        :math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon`.
        The coefficients are looked up on ``t``'s device (no copy back to the host).
        """
        coef = self._q_table(t.device, x0.dtype if x0.is_floating_point() else torch.float32)[t]  # (B, 2)
        coef = coef.to(x0.device).reshape(-1, 2, *([1] * (x0.dim() - 1)))
        return coef[:, 0] * x0 + coef[:, 1] * noise

    def respace(self, num_steps: int) -> list[int]:
        """``num_steps`` evenly spaced timesteps, descending from ``T - 1``, by ``self.spacing``."""
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_timesteps}], got {num_steps}")
        T = self.num_timesteps
        if self.spacing == "trailing":
            # Exact rational arithmetic, so round() does not depend on float error.
            return [round(Fraction(T * (num_steps - i), num_steps)) - 1 for i in range(num_steps)]
        if num_steps == 1:
            return [T - 1]
        steps = torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round().long()
        return steps.tolist()

    def _abars(self, t: int | Tensor, t_prev: int | Tensor, like: Tensor) -> tuple[Any, Any]:
        r""":math:`\bar\alpha` at ``t`` and ``t_prev``: host floats for integer timesteps; for ``(K,)``
        timesteps, ``(K, 1, ...)`` tensors on ``like``'s device and dtype (``like`` being ``(K, B, ...)``)."""
        if not isinstance(t, Tensor):
            if t_prev >= t:
                raise ValueError(f"t_prev ({t_prev}) must be below t ({t})")
            return self._abar(int(t)), self._abar(int(t_prev))
        shape = (-1, *([1] * (like.dim() - 1)))
        return tuple(
            self.alpha_bar(s.cpu()).to(device=like.device, dtype=like.dtype).reshape(shape)
            for s in (t, t_prev)
        )
