"""The demo (``demo.py``, ``make demo``): a small FPDM trained on the digits on a CPU, then sampled.

It trains ``FPDM-Digits/2`` at hidden size 64 with :func:`fpdm.training.train` (S-JFB, EMA), samples 100
digits (ten per class) from the EMA weights under ``--budget`` block evaluations per sample with timestep
smoothing, solution reuse and guidance, and writes the grid, the arrays and ``summary.json``. Run again,
it continues its own run (``--resume``) instead of training from scratch. ``--threads 0`` uses one thread
on a busy machine, where torch's two threads would wait on each other.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fpdm import generation as sample_cli
from fpdm.cli import OneLineParser, bounded_float, bounded_int, run_command
from fpdm.training import CHECKPOINT_NAME, TrainConfig, train

__all__ = ["main", "parse_args", "pick_threads"]


def pick_threads(requested: int) -> int:
    """``requested`` if positive; else 2 threads (at most the cores) when the machine is idle, 1 when busy."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * cores
    return 1 if busy else min(2, cores)


def build_parser() -> argparse.ArgumentParser:
    """The command line; see the module docstring."""
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    positive = bounded_int(1)
    add("--out", default="runs/demo", help="run folder")
    add("--train-steps", type=positive, default=3000, help="training steps")
    add("--hidden-size", type=positive, default=64, help="width of the blocks")
    add("--num-heads", type=positive, default=4, help="attention heads")
    add(
        "--ema-decay",
        type=bounded_float(0.0, 1.0),
        default=0.995,
        help="short enough for a few thousand steps",
    )
    add("--budget", type=positive, default=40, help="block evaluations per sample")
    add("--guidance", type=bounded_float(), default=3.0, help="classifier-free guidance scale")
    add("--num", type=positive, default=100, help="digits to sample")
    add("--seed", type=bounded_int(0), default=0, help="seed of training and sampling")
    add(
        "--threads",
        type=bounded_int(0),
        default=0,
        help="torch CPU threads (0: 2 if the machine is idle, else 1)",
    )
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring (a bad value exits with status 2)."""
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, sample, write the grid and the summary, print where they are; exit status 2 on a usage error."""
    args = parse_args(argv)
    return run_command(build_parser(), lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)
    out = Path(args.out)
    start = time.perf_counter()
    print(f"[demo] training FPDM-Digits/2 for {args.train_steps} steps on {threads} CPU thread(s)")
    cfg = TrainConfig(
        out=str(out / "train"),
        model="FPDM-Digits/2",
        hidden_size=args.hidden_size,
        num_heads=args.num_heads,
        pre_depth=1,
        post_depth=1,
        data="digits",
        batch_size=128,
        steps=args.train_steps,
        lr=1e-3,
        ema_decay=args.ema_decay,
        grad="sjfb",
        solver="picard",
        sjfb_no_grad=(0, 4),
        sjfb_grad=(1, 2),
        seed=args.seed,
        ckpt_every=max(args.train_steps, 1),
        log_every=50,
        device="cpu",
        # Continue a finished or interrupted demo run; a folder with no checkpoint has nothing to keep.
        resume=(out / "train" / CHECKPOINT_NAME).exists(),
        overwrite=not (out / "train" / CHECKPOINT_NAME).exists(),
        progress=args.progress,
    )
    train_summary = train(cfg)
    train_s = time.perf_counter() - start

    print(f"[demo] sampling {args.num} digits under a budget of {args.budget} block evaluations per sample")
    sample_args = sample_cli.parse_args(
        [
            str(out / "train" / CHECKPOINT_NAME),
            "--out", str(out / "samples"),
            "--num", str(args.num),
            "--budget", str(args.budget),
            "--guidance", str(args.guidance),
            "--seed", str(args.seed),
            "--threads", str(threads),
            "--overwrite",
            "--progress" if args.progress else "--no-progress",
        ]
    )  # fmt: skip
    paths = sample_cli.run(sample_args)
    sampling = json.loads(paths["summary"].read_text())
    wall_s = time.perf_counter() - start

    summary: dict[str, Any] = {
        "wall_s": wall_s,
        "train_s": train_s,
        "threads": threads,
        "train": {"steps": args.train_steps, "last_log": train_summary, "config": vars(args)},
        "sampling": sampling,
        "files": {name: str(path) for name, path in paths.items()},
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    steps = sampling["steps"]
    print(
        f"[demo] done in {wall_s:.0f} s (training {train_s:.0f} s). Spent {sampling['spent_total']} of "
        f"{sampling['budget']} block evaluations per sample over {steps} timesteps "
        f"({sampling['guided_evals']} counting guidance's unconditional half)."
    )
    print(f"[demo] grid:    {paths.get('grid', '(no grid: not an image model)')}")
    print(f"[demo] samples: {paths['npz']}")
    print(f"[demo] summary: {summary_path}")
    return 0
