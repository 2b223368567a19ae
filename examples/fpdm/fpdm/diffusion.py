r"""The Gaussian diffusion process: linear noise schedule, training loss, DDPM and DDIM reverse steps.

:class:`GaussianDiffusion` holds the schedule (Ho et al. 2020, as DiT uses it) and the maths of a step;
the samplers (``sampling.py``, ``parallel.py``) decide which steps to take and what the model costs.
Schedule values are kept in float64 and read on the host as Python floats, so a sampling loop never waits
on the device for them.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["METHODS", "SPACINGS", "GaussianDiffusion", "to_device"]

#: The timestep spacings of :meth:`GaussianDiffusion.respace`.
SPACINGS = ("trailing", "linspace")
#: The reverse steps: deterministic (or ``eta``-noised) DDIM, ancestral DDPM.
METHODS = ("ddim", "ddpm")


def _at_least_zero(value: Any) -> Any:
    """``max(value, 0)`` of a float or a tensor (rounding can take ``1 - abar' - sigma^2`` below 0)."""
    return value.clamp(min=0) if isinstance(value, Tensor) else max(value, 0.0)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory without making the host wait.

    A plain ``.to("cuda")`` of pageable memory waits for the copy (the host stalls until the device's
    queue reaches it); a copy from pinned memory with ``non_blocking=True`` is queued like a kernel.
    The pinned buffer is fresh and never written again, so the copy cannot see a later change.
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class GaussianDiffusion:
    r"""Discrete-time Gaussian diffusion with a linear :math:`\beta` schedule and epsilon prediction.

    Parameters
    ----------
    num_timesteps : int
        Number of diffusion steps ``T``; timesteps are ``0 .. T-1``.
    beta_start, beta_end : float
        The linear schedule :math:`\beta_t` from ``beta_start`` to ``beta_end`` (Ho et al. 2020; DiT uses
        the same).
    clip_denoised : bool
        Clip the predicted :math:`x_0` to ``[-1, 1]`` in sampling steps (data scaled to ``[-1, 1]``; turn
        off for latents).
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
        clip_denoised: bool = True,
        spacing: str = "trailing",
    ) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        self.num_timesteps = num_timesteps
        self.clip_denoised = clip_denoised
        self.spacing = spacing
        # Kept in float64: 1 - alpha_bar near t = 0 is tiny and loses digits in float32.
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

    def training_loss(
        self,
        model: Callable[..., tuple[Tensor, Any]] | nn.Module,
        x0: Tensor,
        y: Tensor,
        *,
        generator: torch.Generator | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Any]:
        r"""Epsilon-prediction loss :math:`\text{mean}\,\|\epsilon - \epsilon_\theta(x_t, t, y)\|^2` and the
        model's state.

        Timesteps are uniform over ``0 .. T-1`` and the noise standard normal, both drawn from
        ``generator`` (the global RNG when ``None``) on the CPU and moved to ``x0``'s device (from pinned
        memory without waiting, on CUDA), so a run is reproducible across devices. ``model(x_t, t, y,
        **model_kwargs)`` returns ``(eps, state)``; the state travels with the loss (DDP passes the tuple
        through).
        """
        batch = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator)
        noise = to_device(torch.randn(x0.shape, generator=generator, dtype=x0.dtype), x0.device)
        t = to_device(t, x0.device)
        x_t = self.q_sample(x0, t, noise)
        eps, state = model(x_t, t, y, **(model_kwargs or {}))
        return (eps.float() - noise.float()).pow(2).mean(), state

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

    def _x0(self, x_t: Tensor, eps: Tensor, abar: Any) -> Tensor:
        r""":math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}`, clipped if asked
        (``abar``: a float or a tensor that broadcasts)."""
        x0 = (x_t - (1 - abar) ** 0.5 * eps) / abar**0.5
        return x0.clamp(-1, 1) if self.clip_denoised else x0

    def predict_x0(self, x_t: Tensor, eps: Tensor, t: int) -> Tensor:
        r"""The predicted clean data at timestep ``t``, clipped if asked.

        :math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}`.
        """
        return self._x0(x_t, eps, self._abar(t))

    def ddim_step(
        self,
        x_t: Tensor,
        eps: Tensor,
        t: int | Tensor,
        t_prev: int | Tensor,
        eta: float = 0.0,
        noise: Tensor | None = None,
    ) -> Tensor:
        r"""One DDIM step (Song et al. 2021) from ``t`` to ``t_prev < t``, or many at once.

        .. math:: x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0
                  + \sqrt{1 - \bar\alpha_{t'} - \sigma^2}\,\hat\epsilon + \sigma z,
                  \quad \sigma = \eta \sqrt{\tfrac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}
                  \big(1 - \tfrac{\bar\alpha_t}{\bar\alpha_{t'}}\big)}

        where :math:`\hat\epsilon` is recomputed from the (possibly clipped) :math:`\hat x_0`. ``eta = 0``
        is deterministic; ``noise`` is required when ``eta > 0`` and ``t_prev >= 0``. With ``(K,)`` tensors
        ``t`` and ``t_prev`` and ``(K, B, ...)`` inputs, the ``K`` deterministic steps of the parallel
        sampler in one go (``eta`` must then be 0).
        """
        abar, abar_prev = self._abars(t, t_prev, x_t)
        sigma = 0.0
        if eta != 0 and isinstance(t, Tensor):
            raise ValueError("ddim_step over many timesteps is deterministic: eta must be 0")
        if eta != 0:
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x0 = self._x0(x_t, eps, abar)
        eps = (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5
        x_prev = abar_prev**0.5 * x0 + _at_least_zero(1 - abar_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            x_prev = x_prev + sigma * noise
        return x_prev

    def ddpm_step(self, x_t: Tensor, eps: Tensor, t: int, t_prev: int, noise: Tensor | None = None) -> Tensor:
        r"""One ancestral DDPM step (Ho et al. 2020) from ``t`` to ``t_prev < t`` over respaced timesteps.

        With :math:`\beta' = 1 - \bar\alpha_t / \bar\alpha_{t'}` (the respaced step's beta), sample the
        posterior :math:`q(x_{t'} | x_t, \hat x_0)`: mean
        :math:`\frac{\sqrt{\bar\alpha_{t'}}\beta'}{1-\bar\alpha_t}\hat x_0
        + \frac{\sqrt{1-\beta'}(1-\bar\alpha_{t'})}{1-\bar\alpha_t} x_t`, variance
        :math:`\beta' \frac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}`. The last step (``t_prev = -1``) returns
        the mean, without noise.
        """
        abar, abar_prev = self._abars(t, t_prev, x_t)
        beta = 1 - abar / abar_prev
        x0 = self._x0(x_t, eps, abar)
        mean = (abar_prev**0.5 * beta / (1 - abar)) * x0 + (
            (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)
        ) * x_t
        if t_prev < 0:
            return mean
        if noise is None:
            raise ValueError("ddpm_step needs noise before the last step")
        variance = beta * (1 - abar_prev) / (1 - abar)
        return mean + variance**0.5 * noise

    def reverse_step(
        self,
        x_t: Tensor,
        eps: Tensor,
        t: int,
        t_prev: int,
        *,
        method: str = "ddim",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One reverse step by ``method`` (``"ddim"`` or ``"ddpm"``), drawing its noise from ``generator`` on
        the CPU when it needs any (DDPM, or DDIM with ``eta > 0``, before the last step)."""
        needs_noise = t_prev >= 0 and (method == "ddpm" or eta > 0)
        noise = to_device(torch.randn(x_t.shape, generator=generator), x_t.device) if needs_noise else None
        if method == "ddim":
            return self.ddim_step(x_t, eps, t, t_prev, eta=eta, noise=noise)
        return self.ddpm_step(x_t, eps, t, t_prev, noise=noise)

    @torch.no_grad()
    def reverse_loop(
        self,
        eps_at: Callable[[Tensor, int, int], Tensor],
        x: Tensor,
        timesteps: list[int],
        *,
        method: str = "ddim",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        callback: Callable[[int, int, Tensor, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """The sampling loop, the one every sampler of the example runs: for each timestep ``t`` (descending)
        ``eps = eps_at(x, i, t)`` and one :meth:`reverse_step` to the next timestep (``-1`` after the last).

        ``callback(i, t, x_t, eps, x_next)`` runs after each step.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            eps = eps_at(x, i, t)
            x_next = self.reverse_step(x, eps, t, t_prev, method=method, eta=eta, generator=generator)
            if callback is not None:
                callback(i, t, x, eps, x_next)
            x = x_next
        return x

    @torch.no_grad()
    def sample(
        self,
        eps_fn: Callable[[Tensor, Tensor], Tensor],
        shape: tuple[int, ...],
        num_steps: int,
        *,
        method: str = "ddim",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        callback: Callable[[int, int, Tensor], None] | None = None,
    ) -> Tensor:
        """Sample by ``num_steps`` reverse steps over :meth:`respace` (:meth:`reverse_loop`).

        ``eps_fn(x, t)`` gets the batch and timesteps ``(B,)`` and returns the predicted noise (wrap a
        model with :func:`fpdm.reverse.model_eps` for guidance). Noise is drawn on the CPU from ``generator``.
        ``callback(i, t, x)`` runs after each step with the new sample.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        x = to_device(torch.randn(shape, generator=generator), torch.device(device))

        def eps_at(x: Tensor, i: int, t: int) -> Tensor:
            return eps_fn(x, torch.full((shape[0],), t, device=device, dtype=torch.long))

        def after(i: int, t: int, x_t: Tensor, eps: Tensor, x_next: Tensor) -> None:
            if callback is not None:
                callback(i, t, x_next)

        timesteps = self.respace(num_steps)
        return self.reverse_loop(
            eps_at, x, timesteps, method=method, eta=eta, generator=generator, callback=after
        )
