"""Peak training memory of FPDM-XL/2 against DiT-XL/2 (with and without gradient checkpointing).

The paper (Bai & Melas-Kyriazi 2024) reports that FPDM uses 60% less memory than DiT in training. This
script measures it on the CPU, at the same batch, on 256 px ImageNet-shaped latents (32x32x4, 256 tokens):

    python -m benchmarks.fpdm_memory --batch 2
    python -m benchmarks.fpdm_memory --quick      # DiT and FPDM at the digits presets, in seconds

Method. Each configuration runs in a fresh process (:func:`benchmarks.harness.run_module`) so that no
allocator cache carries over. Peak memory is the process's resident-set high-water mark, reset just before
the measured step (:func:`benchmarks.harness.peak_rss_growth`), with glibc serving every allocation of
64 KiB or more by ``mmap`` and trimming freed memory at once, so freed tensors leave the resident set and
the high-water mark tracks the live tensors, as ``torch.cuda.max_memory_allocated`` does on a GPU. The
numbers per configuration (GB = 1e9 bytes):

* ``weights``: resident-set growth when the fp32 model is built;
* ``activations``: resident-set growth from the start of the step to the end of the forward pass, i.e. what
  the autograd graph keeps for backward (grows with the batch; gradient checkpointing and S-JFB cut it);
* ``fwd_bwd``: peak growth during one forward and backward pass of the diffusion loss (activations kept for
  backward, the gradients, transients), measured after a warm-up step so one-off buffers are excluded;
* ``adamw_states``: AdamW's two fp32 moments, 8 bytes per parameter, computed, not run (running DiT-XL/2's
  optimizer would need 5.4 GB more on a shared machine, and its size is exact by construction);
* ``total = weights + fwd_bwd + adamw_states``: the peak of a training step;
* ``param_grads``: the parameter gradients, 4 bytes per fp32 parameter (computed).

What sets the peak. In the backward pass the activations are freed block by block while the parameter
gradients are allocated block by block, so for a stack of similar blocks the memory in use moves linearly
from ``activations`` (start of backward) to ``param_grads`` (end), and the peak is about
``max(activations, param_grads)`` plus transients. ``peak_set_by`` says which term it is. For DiT-XL/2 at
batch 2 the gradients (675 M x 4 B = 2.70 GB) outweigh the activations (1.33 GB), so ``fwd_bwd`` is the
gradients with and without checkpointing (2.70 GB both, 0.006 GB of transients) although checkpointing
cuts the activations from 1.33 to 0.07 GB (at batch 1, ``results/fpdm_memory_batch1.json``, the
activations halve to 0.67 GB and ``fwd_bwd`` stays at 2.70 GB); activations set the peak from batch 5 on,
and on a GPU at training batches (tens of samples per device) they dominate, which is where checkpointing
halves the peak. ``activation_saving`` reports the saving the total cannot show at a small batch.
``--rederive FILE`` recomputes these fields and the table from a saved report without running anything.

FPDM runs S-JFB at its most expensive draw (6 no-grad and 3 differentiable iterations of the implicit block)
and at its cheapest differentiable draw (1, i.e. JFB). Writes ``benchmarks/results/fpdm_memory.json``;
``results/fpdm_memory_batch1.json`` holds DiT-XL/2 alone at batch 1 (``--batch 1 --only DiT-XL/2 --out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness, tables

#: name -> (preset, options)
CONFIGS: dict[str, tuple[str, dict]] = {
    "DiT-XL/2": ("DiT-XL/2", {"gradient_checkpointing": False}),
    "DiT-XL/2 + grad. checkpointing": ("DiT-XL/2", {"gradient_checkpointing": True}),
    "FPDM-XL/2, S-JFB 6 no-grad + 3 grad": ("FPDM-XL/2", {"no_grad": 6, "grad": 3}),
    "FPDM-XL/2, S-JFB 6 no-grad + 1 grad": ("FPDM-XL/2", {"no_grad": 6, "grad": 1}),
}


def child(name: str, batch: int, threads: int, quick: bool) -> dict:
    """Measure one configuration in this (fresh) process."""
    import torch
    from fpdm.diffusion import GaussianDiffusion
    from fpdm.models import count_parameters, create_model

    from implicitdiff import SJFB, Picard

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset, options = CONFIGS[name]
    preset = preset.replace("XL", "Digits") if quick else preset
    rss0 = harness.rss_bytes()
    if preset.startswith("FPDM"):
        grad = SJFB(no_grad_iters=(options["no_grad"],) * 2, grad_iters=(options["grad"],) * 2, seed=0)
        model = create_model(preset, solver=Picard(), grad=grad)
    else:
        model = create_model(preset, **options)
    model.train()
    weights = harness.rss_bytes() - rss0
    params = count_parameters(model)
    diffusion = GaussianDiffusion()
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size)
    y = torch.randint(0, model.num_classes, (batch,))
    seen: dict[str, Any] = {}

    def step() -> None:
        start = time.perf_counter()
        loss, state = diffusion.training_loss(model, x, y)
        seen["after_forward"] = harness.rss_bytes()  # the graph holds the activations saved for backward
        loss.backward()
        seen.update(seconds=time.perf_counter() - start, block_evals=state.block_evals)

    step()  # warm-up: allocates the gradients and one-off buffers
    model.zero_grad(set_to_none=True)
    base = harness.rss_bytes()
    fwd_bwd = harness.peak_rss_growth(step)
    result = {
        "preset": preset,
        "options": options,
        "batch": batch,
        "params_M": params / 1e6,
        "weights_GB": weights / 1e9,
        "fwd_bwd_GB": fwd_bwd / 1e9,
        "saved_activations_GB": (seen["after_forward"] - base) / 1e9,
        "adamw_states_GB": 8 * params / 1e9,
        "step_seconds": seen["seconds"],
    }
    if preset.startswith("FPDM"):
        result["block_evals"] = seen["block_evals"]
    result["total_GB"] = result["weights_GB"] + result["fwd_bwd_GB"] + result["adamw_states_GB"]
    return result


def derive(report: dict) -> dict:
    """Add the derived fields to every row: gradients, which term sets the peak, the activation saving."""
    rows = report["results"]
    for row in rows.values():
        row["param_grads_GB"] = 4 * row["params_M"] * 1e6 / 1e9
        activations, grads = row["saved_activations_GB"], row["param_grads_GB"]
        row["peak_set_by"] = "parameter gradients" if grads >= activations else "activations"
        # What the peak holds beyond max(activations, gradients): transients and the overlap of the two.
        row["fwd_bwd_beyond_max_GB"] = row["fwd_bwd_GB"] - max(activations, grads)
    dit = rows.get("DiT-XL/2")
    for row in rows.values():
        if dit is not None:
            row["total_vs_dit"] = row["total_GB"] / dit["total_GB"]
            row["fwd_bwd_vs_dit"] = row["fwd_bwd_GB"] / dit["fwd_bwd_GB"]
            row["activations_vs_dit"] = row["saved_activations_GB"] / dit["saved_activations_GB"]
    checkpointed = rows.get("DiT-XL/2 + grad. checkpointing")
    if dit is not None and checkpointed is not None:
        per_sample = dit["saved_activations_GB"] / report["batch"]
        report["activation_saving"] = {
            "dit_activations_GB": dit["saved_activations_GB"],
            "checkpointed_activations_GB": checkpointed["saved_activations_GB"],
            "saved_GB": dit["saved_activations_GB"] - checkpointed["saved_activations_GB"],
            "dit_activations_per_sample_GB": per_sample,
            "batch_from_which_activations_set_the_peak": int(dit["param_grads_GB"] // per_sample) + 1,
        }
    return report


def run_all(batch: int, threads: int, only: list[str] | None, quick: bool) -> dict:
    rows = {}
    if quick and not only:  # one configuration of each model: the smoke run spawns two processes, not four
        only = ["DiT-XL/2", "FPDM-XL/2, S-JFB 6 no-grad + 3 grad"]
    for name in CONFIGS:
        if only and name not in only:
            continue
        args = ["--child", name, "--batch", str(batch), "--threads", str(threads)] + ["--quick"] * quick
        rows[name] = harness.run_module("benchmarks.fpdm_memory", args, threads=threads)
        print(f"  measured {name}: total {rows[name]['total_GB']:.2f} GB", file=sys.stderr)
    report = {
        "method": "peak RSS (VmHWM) growth in a fresh process per configuration; glibc mmap threshold "
        "64 KiB; AdamW states computed as 8 bytes/parameter",
        "batch": batch,
        "input": "8x8x1 digits (quick)" if quick else "32x32x4 latents (256 px images), 256 tokens",
        "results": rows,
    }
    return derive(report)


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "fpdm_memory.json")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rederive", default=None, help="recompute the derived fields of a saved report")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch, args.threads, args.quick)))
        return 0
    if args.rederive is not None:
        report = derive(json.loads(Path(args.rederive).read_text()))
        meta = report.pop("meta", {})
        Path(args.rederive).write_text(json.dumps({"meta": meta, **report}, indent=1) + "\n")
        print(tables.render("fpdm_memory.json", report))
        return 0
    started = harness.start()
    report = run_all(args.batch, args.threads, args.only, args.quick)
    return harness.finish(args, "fpdm_memory.json", report, started)


if __name__ == "__main__":
    sys.exit(main())
