"""FPDM-XL/2 and DiT-XL/2 on a GPU: training steps (eager, compiled), memory, FLOP utilisation, sampling.

The ``fpdm`` section of :mod:`benchmarks.gpu` (run that script; this module holds the measurements):

* **Training step** at batch 128 under bf16 autocast with fused AdamW, for FPDM-XL/2 with S-JFB fixed at its
  most expensive draw (6 no-grad and 3 differentiable iterations of the implicit block) and DiT-XL/2 (also
  with gradient checkpointing). Compiled FPDM compiles its blocks (``models.compile_blocks``), so the solver
  loop runs eagerly over compiled blocks and varying S-JFB draws cannot recompile; compiled DiT compiles the
  whole model. Per row: median step time, peak memory (``torch.cuda.max_memory_allocated``), the first
  step's time (compilation included), graphs compiled during warm-up and after it, and the model FLOP
  utilisation: FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` over the step
  time, against the H100's measured dense bf16 peak (about 790 TFLOP/s on a large matrix product here).
* **Sampler against a hand-written loop** of the same block evaluations (FPDM-XL/2 with random weights,
  DDIM, 10 timesteps, 2 Picard iterations each, reuse), at batch 32 in bf16 and batch 128 in fp32, and the
  host syncs per timestep counted with :class:`implicitdiff.diagnostics.SyncCounter`.

Quick mode runs the digits presets on the CPU in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.models import FPDM, create_model
from torch import Tensor, nn

from benchmarks import harness
from implicitdiff import SJFB, Picard
from implicitdiff.diagnostics import SyncCounter

#: Dense bf16 matrix-product rate measured on this workplace's H100 (8192^3, random data).
H100_BF16_PEAK = 790e12


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compile(model: nn.Module, name: str, quick: bool) -> nn.Module:
    backend = "eager" if quick else "inductor"
    if isinstance(model, FPDM):
        from fpdm import models

        compile_blocks = getattr(models, "compile_blocks", None)
        if compile_blocks is not None:
            return compile_blocks(model, backend=backend)
    return torch.compile(model, backend=backend)


def training_rows(device: torch.device, quick: bool, budget_s: float = 150.0) -> list[dict[str, Any]]:
    """Step time, memory, compile time, graphs and FLOP utilisation of each training configuration."""
    if quick:
        fpdm, dit, batch, steps = "FPDM-Digits/2", "DiT-Digits/2", 4, 2
    else:
        fpdm, dit, batch, steps = "FPDM-XL/2", "DiT-XL/2", 128, 10
    # Most wanted first: a row that would start past the time budget is skipped and says so.
    configs: list[tuple[str, str, dict[str, Any], bool]] = [
        ("FPDM eager", fpdm, {"grad": SJFB(no_grad_iters=(6, 6), grad_iters=(3, 3))}, False),
        ("FPDM compiled", fpdm, {"grad": SJFB(no_grad_iters=(6, 6), grad_iters=(3, 3))}, True),
        ("DiT eager", dit, {}, False),
        ("DiT checkpointing", dit, {"gradient_checkpointing": True}, False),
        ("DiT compiled", dit, {}, True),
    ]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for label, preset, overrides, compiled in configs:
        if time.perf_counter() - start > budget_s:
            rows.append({"config": label, "skipped": f"past the section's time budget of {budget_s:.0f} s"})
        else:
            rows.append(_training_row(label, preset, overrides, compiled, device, batch, steps, quick))
        print(f"  {label}: {rows[-1]}", file=sys.stderr)
    return rows


def _training_row(
    label: str, preset: str, overrides: dict[str, Any], compiled: bool, device: torch.device,
    batch: int, steps: int, quick: bool,
) -> dict[str, Any]:  # fmt: skip
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous row's model and optimizer are gone
    torch.manual_seed(0)
    model = create_model(preset, **overrides).to(device).train()
    net = _compile(model, label, quick) if compiled else model
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    diffusion = GaussianDiffusion()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = diffusion.training_loss(net, x, y, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    graphs_before = _graph_count()
    harness.sync(device)
    start = time.perf_counter()
    step()
    harness.sync(device)
    first = time.perf_counter() - start
    step()  # the second call may still compile (grad-mode variants)
    graphs_warm = _graph_count()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        harness.sync(device)
        start = time.perf_counter()
        step()
        harness.sync(device)
        times.append(time.perf_counter() - start)
    graphs_after = _graph_count()
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    flops = _step_flops(step) if not compiled else None
    median = statistics.median(times)
    row = {
        "config": label,
        "preset": preset,
        "batch": batch,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_ms": 1e3 * median,
        "first_step_s": first,
        "graphs_warmup": graphs_warm - graphs_before,
        "graphs_after_warmup": graphs_after - graphs_warm,
        "peak_GB": peak,
    }
    if flops is not None:
        row.update(step_tflop=flops / 1e12, mfu=flops / median / H100_BF16_PEAK)
    return row


def _step_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def sampler_rows(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """The budgeted sampler against a hand-written loop of the same block evaluations, and its host syncs."""
    preset = "FPDM-Digits/2" if quick else "FPDM-XL/2"
    cases = [(4, torch.float32)] if quick else [(32, torch.bfloat16), (128, torch.float32)]
    rows = []
    for batch, dtype in cases:
        torch.manual_seed(0)
        model = create_model(preset).to(device).eval()
        rows.append(_sampler_row(model, batch, dtype, device, reps=2 if quick else 7))
        print(f"  sampler: {rows[-1]}", file=sys.stderr)
    return rows


def _sampler_row(model: nn.Module, batch: int, dtype: torch.dtype, device: torch.device, reps: int) -> dict:
    from fpdm.sampling import sample

    steps, iters = 10, 2
    diffusion = GaussianDiffusion()
    labels = torch.arange(batch, device=device) % model.num_classes
    budget = steps * (model.pre_depth + model.post_depth + iters)
    autocast = dtype != torch.float32
    shape = (batch, model.in_channels, model.input_size, model.input_size)

    def ours() -> Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return sample(model, diffusion, labels, budget=budget, steps=steps, solver=Picard(),
                          generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    def hand() -> Tensor:
        timesteps = diffusion.respace(steps)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        z = None
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            for i, t in enumerate(timesteps):
                t_batch = torch.full((batch,), t, device=device, dtype=torch.long)
                eps, state = model(x, t_batch, labels, max_iter=iters, tol=None, z0=z)
                z = state.z
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                x = diffusion.ddim_step(x, eps, t, t_prev)
        return x

    timings = harness.interleaved({"ours": ours, "hand": hand}, reps, device=device)
    with SyncCounter() as syncs:
        ours()
    median = {key: timing.wall for key, timing in timings.items()}
    return {
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "timesteps": steps,
        "iterations_per_step": iters,
        "sampler_ms": 1e3 * median["ours"],
        "hand_loop_ms": 1e3 * median["hand"],
        "sampler_vs_hand": median["ours"] / median["hand"],
        "syncs_per_timestep": syncs.count / steps,
    }


def fpdm_section(device: str, quick: bool) -> dict[str, Any]:
    """The ``fpdm`` section of :mod:`benchmarks.gpu`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sampler = sampler_rows(dev, quick)
    return {"sampler": sampler, "training": training_rows(dev, quick)}
