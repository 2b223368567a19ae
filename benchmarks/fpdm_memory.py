"""Peak training memory of FPDM-XL/2 against DiT-XL/2 (with and without gradient checkpointing).

The paper (Bai & Melas-Kyriazi 2024) reports that FPDM uses 60% less memory than DiT in training. This
script measures it on the CPU, at the same batch, on 256 px ImageNet-shaped latents (32x32x4, 256 tokens):

    python benchmarks/fpdm_memory.py --batch 1

Method. Each configuration runs in a fresh subprocess so that no allocator cache carries over. Peak memory is
the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``), reset with
``/proc/self/clear_refs`` just before the measured step. glibc is told to serve every allocation of 64 KiB or
more by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) and to trim freed memory at once, so freed tensors leave the
resident set and the high-water mark tracks the live tensors, as ``torch.cuda.max_memory_allocated`` does
on a GPU. The numbers per configuration (GB = 1e9 bytes):

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
and at its cheapest differentiable draw (1, i.e. JFB). Writes ``benchmarks/results/fpdm_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fpdm_memory.json"

#: name -> (preset, options)
CONFIGS: dict[str, tuple[str, dict]] = {
    "DiT-XL/2": ("DiT-XL/2", {"gradient_checkpointing": False}),
    "DiT-XL/2 + grad. checkpointing": ("DiT-XL/2", {"gradient_checkpointing": True}),
    "FPDM-XL/2, S-JFB 6 no-grad + 3 grad": ("FPDM-XL/2", {"no_grad": 6, "grad": 3}),
    "FPDM-XL/2, S-JFB 6 no-grad + 1 grad": ("FPDM-XL/2", {"no_grad": 6, "grad": 1}),
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


def child(name: str, batch: int, threads: int) -> dict:
    """Measure one configuration in this (fresh) process."""
    import torch

    # The example's package (examples/fpdm/fpdm/) is not installed: this is the one path entry.
    sys.path.insert(0, str(ROOT / "examples" / "fpdm"))
    from fpdm.diffusion import GaussianDiffusion
    from fpdm.models import count_parameters, create_model

    from implicitdiff import Picard
    from implicitdiff.gradients import SJFB

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset, options = CONFIGS[name]
    rss0 = _status_kb("VmRSS")
    if preset.startswith("FPDM"):
        grad = SJFB(no_grad_iters=(options["no_grad"],) * 2, grad_iters=(options["grad"],) * 2, seed=0)
        model = create_model(preset, solver=Picard(), grad=grad)
    else:
        model = create_model(preset, **options)
    model.train()
    weights_kb = _status_kb("VmRSS") - rss0
    params = count_parameters(model)
    diffusion = GaussianDiffusion()
    x = torch.randn(batch, 4, 32, 32)
    y = torch.randint(0, 1000, (batch,))

    def step() -> tuple[float, int, int]:
        start = time.perf_counter()
        loss, state = diffusion.training_loss(model, x, y)
        after_forward = _status_kb("VmRSS")  # the graph holds the activations saved for backward
        loss.backward()
        return time.perf_counter() - start, after_forward, state.block_evals

    step()  # warm-up: allocates the gradients and one-off buffers
    model.zero_grad(set_to_none=True)
    base = _status_kb("VmRSS")
    _reset_peak()
    seconds, after_forward, block_evals = step()
    fwd_bwd_kb = _status_kb("VmHWM") - base
    gb = 1024 / 1e9
    result = {
        "preset": preset,
        "options": options,
        "batch": batch,
        "params_M": params / 1e6,
        "weights_GB": weights_kb * gb,
        "fwd_bwd_GB": fwd_bwd_kb * gb,
        "saved_activations_GB": (after_forward - base) * gb,
        "adamw_states_GB": 8 * params / 1e9,
        "step_seconds": seconds,
    }
    if preset.startswith("FPDM"):
        result["block_evals"] = block_evals
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


def run_all(batch: int, threads: int, only: list[str] | None) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    rows = {}
    for name in CONFIGS:
        if only and name not in only:
            continue
        cmd = [sys.executable, __file__, "--child", name, "--batch", str(batch), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  measured {name}: total {rows[name]['total_GB']:.2f} GB", file=sys.stderr)
    report = {
        "benchmark": "fpdm_memory",
        "method": "peak RSS (VmHWM) delta in a fresh subprocess per configuration; glibc mmap threshold "
        "64 KiB; AdamW states computed as 8 bytes/parameter",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": threads},
        "torch": __import__("torch").__version__,
        "batch": batch,
        "input": "32x32x4 latents (256 px images), 256 tokens",
        "results": rows,
    }
    return derive(report)


def print_table(report: dict) -> None:
    head = (
        f"{'configuration':<38} {'params':>8} {'weights':>8} {'activ.':>7} {'grads':>7} {'fwd+bwd':>8} "
        f"{'peak set by':>19} {'AdamW':>7} {'total':>7} {'vs DiT':>7}"
    )
    print(head)
    print("-" * len(head))
    for name, row in report["results"].items():
        print(
            f"{name:<38} {row['params_M']:>7.1f}M {row['weights_GB']:>7.2f}G "
            f"{row['saved_activations_GB']:>6.2f}G {row['param_grads_GB']:>6.2f}G {row['fwd_bwd_GB']:>7.2f}G "
            f"{row['peak_set_by']:>19} {row['adamw_states_GB']:>6.2f}G {row['total_GB']:>6.2f}G "
            f"{row.get('total_vs_dit', float('nan')):>7.2f}"
        )
    print(f"batch {report['batch']}, {report['input']}; GB = 1e9 bytes")
    saving = report.get("activation_saving")
    if saving is not None:
        print(
            f"gradient checkpointing: activations {saving['dit_activations_GB']:.2f} -> "
            f"{saving['checkpointed_activations_GB']:.2f} GB (-{saving['saved_GB']:.2f} GB); the fwd+bwd "
            "peak is max(activations, gradients) + transients, so the saving shows in it from batch "
            f"{saving['batch_from_which_activations_set_the_peak']} on"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rederive", default=None, help="recompute the derived fields of a saved report")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch, args.threads)))
        return 0
    if args.rederive is not None:
        report = derive(json.loads(Path(args.rederive).read_text()))
        Path(args.rederive).write_text(json.dumps(report, indent=2) + "\n")
        print_table(report)
        return 0
    report = run_all(args.batch, args.threads, args.only)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
