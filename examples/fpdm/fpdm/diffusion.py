r"""The Gaussian diffusion process: the training loss and the DDIM and DDPM reverse steps.

:class:`GaussianDiffusion` adds to a :class:`~fpdm.schedule.NoiseSchedule` the maths of a step; the
samplers (``sampling.py``, ``parallel.py``) decide which steps to take and what the model costs.
:meth:`GaussianDiffusion.ddim_step` takes one timestep or many at once, so the sequential and the
parallel sampler share one DDIM update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fpdm.schedule import SPACINGS, NoiseSchedule

__all__ = ["METHODS", "SPACINGS", "GaussianDiffusion", "Generators", "draw_noise", "to_device"]

#: The reverse steps: deterministic (or ``eta``-noised) DDIM, ancestral DDPM.
METHODS = ("ddim", "ddpm")


def _at_least_zero(value: Any) -> Any:
    """``max(value, 0)`` of a float or a tensor (rounding can take ``1 - abar' - sigma^2`` below 0)."""
    return value.clamp(min=0) if isinstance(value, Tensor) else max(value, 0.0)


#: Where sampling noise comes from: one CPU generator for the whole batch, one per sample (a sequence as long
#: as the batch), or ``None`` for torch's global generator.
Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(shape: tuple[int, ...], generator: Generators) -> Tensor:
    """Standard normal noise of ``shape`` on the CPU, from one generator or from one generator per sample.

    With a sequence of generators, sample ``i`` (``shape[0]`` of them) gets ``randn(shape[1:])`` from its own
    generator: its noise does not depend on the other samples of the batch, nor on the batch size.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"one generator per sample: got {len(generator)} generators for {shape[0]} samples")
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generator])


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory without making the host wait.

    A plain ``.to("cuda")`` of pageable memory waits for the copy (the host stalls until the device's
    queue reaches it); a copy from pinned memory with ``non_blocking=True`` is queued like a kernel.
    The pinned buffer is fresh and never written again, so the copy cannot see a later change.
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class GaussianDiffusion(NoiseSchedule):
    r"""Gaussian diffusion with epsilon prediction over a :class:`~fpdm.schedule.NoiseSchedule`: the
    training loss and the reverse steps.

    Parameters
    ----------
    num_timesteps, beta_start, beta_end, spacing
        The schedule's (:class:`~fpdm.schedule.NoiseSchedule`).
    clip_denoised : bool
        Clip the predicted :math:`x_0` to ``[-1, 1]`` in sampling steps (data scaled to ``[-1, 1]``; turn
        off for latents).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_denoised: bool = True,
        spacing: str = "trailing",
    ) -> None:
        super().__init__(num_timesteps, beta_start, beta_end, spacing)
        self.clip_denoised = clip_denoised

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
        generator: Generators = None,
    ) -> Tensor:
        """One reverse step by ``method`` (``"ddim"`` or ``"ddpm"``), drawing its noise from ``generator`` on
        the CPU when it needs any (DDPM, or DDIM with ``eta > 0``, before the last step); one generator per
        sample draws each sample's noise from its own (:func:`draw_noise`)."""
        needs_noise = t_prev >= 0 and (method == "ddpm" or eta > 0)
        noise = to_device(draw_noise(tuple(x_t.shape), generator), x_t.device) if needs_noise else None
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
        generator: Generators = None,
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
