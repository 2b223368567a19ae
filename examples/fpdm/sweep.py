"""Quality against compute: FPDM and DiT trained with the same compute, sampled under a range of budgets.

::

    python examples/fpdm/sweep.py            # the full sweep, under an hour on 2 CPU cores
    python examples/fpdm/sweep.py --quick --out /tmp/sweep   # smoke test (tiny models, seconds)

1. Trains ``FPDM-Digits/2`` (hidden 64, 1 pre, 1 weight-tied implicit, 1 post block; S-JFB with 0-6 no-grad
   and 1-3 differentiable Picard iterations) and one ``DiT-Digits/2`` (hidden 64) per depth of
   ``--dit-depths`` (5 and 12) on the training split of the digits (``data="digits-train"``:
   ``evaluate.digits_split("train")``, 1,437 images), lr 1e-3, batch 128, EMA 0.995, with ``train.py``'s
   :func:`train.train`. Depth 5 costs what FPDM costs per training step (3 x 5 = 15 block passes, FPDM's
   expected number) and has a similar parameter count. Depth 12 mirrors the paper's pairing, a DiT several
   times larger than the FPDM (DiT-XL/2: 28 blocks, 675 M parameters, against FPDM-XL/2's 86 M), so at a
   small sampling budget it affords few timesteps.
2. **Same training compute**, counted in transformer-block passes, the unit of the sampling budget: a block's
   forward pass counts 1 and its backward pass 2 (the usual estimate: a backward computes the gradients with
   respect to both the input and the weights, about twice a forward's multiply-adds). FPDM's forward
   evaluations are counted exactly from its training log (``block_evals`` of every step: pre + post + every
   evaluation of the implicit block, the no-grad ones included); its backward passes are pre + post + the
   differentiable S-JFB steps, whose numbers are replayed exactly from the estimator's seeded generator. DiT
   costs ``3 * depth`` per step, so each DiT gets ``round(C_FPDM / (3 * depth))`` steps. Why not wall-clock:
   it depends on the machine and its load, and the budgets of the sampling side are block evaluations too; the
   wall-clock of both runs is reported next to it. Caveat: FPDM's implicit block also runs its fusion MLP
   (about half a DiT block's multiply-adds per token), which block counting, the paper's unit, leaves out.
3. Samples each model under every budget of ``--budgets`` (block evaluations per sample, guidance's doubled
   batch counted once, as in the paper), DDIM with trailing timesteps, guidance ``--guidance`` (1: none, the
   best FD here; guidance trades diversity for class fidelity), with ``--seeds`` sampling seeds of
   ``--num`` samples each, for these methods:

   * ``DiT-<depth>``: ``budget // depth`` timesteps; a budget below the depth buys none (an empty cell);
   * ``FPDM plain``: the number of timesteps of the first DiT (``budget // dit_depths[0]``), the rest of the
     budget as Picard iterations, every solve from the pre blocks' output (no reuse);
   * ``FPDM smoothing``: the sampler's timestep smoothing (``budget // (pre + post + 2)`` timesteps), no
     reuse;
   * ``FPDM reuse``: the DiT-like timesteps, each solve warm-started from the previous fixed point;
   * ``FPDM smoothing+reuse``; ``FPDM 1 iteration/step`` and ``FPDM 1 iteration/step+reuse``: smoothing
     taken to its end, ``budget // (pre + post + 1)`` timesteps of one iteration each, without and with
     reuse;
   * ``FPDM reuse, Anderson``: the DiT-like timesteps (3 iterations each with ``dit_depths[0] = 5``) with
     ``Anderson()`` in the sampler; ``FPDM smoothing+reuse, Anderson``: the same at 2 iterations per
     timestep (where Anderson is Picard by construction: its first two evaluations are Picard steps);
   * ``FPDM tolerance``: smoothing, reuse and the ``"tolerance"`` schedule (``--tol``).

   Every method draws its initial noise from the same seeds, so differences between methods are paired;
   ``sweep.md`` also reports the paired differences of the main comparisons, mean ± std over the seeds.

4. Scores each set of samples against the held-out ``digits-test`` split (360 images): the Fréchet distance
   and KID in the digits classifier's features (``evaluate.py``), the Fréchet distance of the raw 64 pixels,
   and the class agreement. The classifier's features have a blind spot: they map some noise images near
   digits (one-step samples, pure noise, score a better feature FD than some blurry digits do), and the
   pixel FD, which puts noise far away, is the check on it. Reports mean and standard deviation over the
   sampling seeds, and the same scores of the training split itself (real against real, the floor these
   sample sizes allow).
5. Writes ``OUT/sweep.json`` (everything), ``OUT/sweep.md`` (tables) and ``OUT/sweep.png`` (the three
   distances against the budget, error bars one standard deviation over the seeds); ``OUT`` is
   ``examples/fpdm/results`` by default. Checkpoints go to ``--work`` (``runs/sweep``);
   ``--reuse-checkpoints`` samples existing ones instead of training again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sample as sample_cli
from cli import UsageError
from diffusion import GaussianDiffusion
from evaluate import (
    class_agreement,
    digits_split,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_digits_classifier,
)
from files import read_jsonl
from models import count_parameters
from registry import make_solver
from sampling import block_cost, pick_steps, sample
from train import (
    CHECKPOINT_NAME,
    LOG_NAME,
    TrainConfig,
    compare_configs,
    load_checkpoint,
    stored_config,
    train,
)

__all__ = [
    "FPDM_METHODS",
    "METRICS",
    "Method",
    "comparisons",
    "main",
    "methods",
    "paired_differences",
    "parse_args",
    "run_sweep",
    "training_compute",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Method:
    """One sampling configuration of the sweep.

    Attributes
    ----------
    name : str
        Its label in the table and the plot.
    model : str
        ``"fpdm"`` or ``"dit<depth>"``.
    smoothing : bool
        ``True``: the sampler picks the timesteps (``steps=None``), or ``iters_per_step`` sets them;
        ``False``: the first DiT's count ``budget // dit_depths[0]``.
    iters_per_step : int or None
        With ``smoothing``: ``budget // (pre + post + iters_per_step)`` timesteps instead of the sampler's
        pick (:func:`sampling.pick_steps`, 2 iterations per timestep).
    reuse : bool
        Warm-start each solve from the previous timestep's fixed point.
    solver : str
        ``"picard"`` or ``"anderson"``.
    schedule : str
        ``"constant"`` or ``"tolerance"``.
    """

    name: str
    model: str
    smoothing: bool = True
    iters_per_step: int | None = None
    reuse: bool = False
    solver: str = "picard"
    schedule: str = "constant"


FPDM_METHODS: tuple[Method, ...] = (
    Method("FPDM plain", "fpdm", smoothing=False, reuse=False),
    Method("FPDM smoothing", "fpdm", smoothing=True, reuse=False),
    Method("FPDM reuse", "fpdm", smoothing=False, reuse=True),
    Method("FPDM smoothing+reuse", "fpdm", smoothing=True, reuse=True),
    Method("FPDM 1 iteration/step", "fpdm", smoothing=True, iters_per_step=1, reuse=False),
    Method("FPDM 1 iteration/step+reuse", "fpdm", smoothing=True, iters_per_step=1, reuse=True),
    Method("FPDM reuse, Anderson", "fpdm", smoothing=False, reuse=True, solver="anderson"),
    Method("FPDM smoothing+reuse, Anderson", "fpdm", smoothing=True, reuse=True, solver="anderson"),
    Method("FPDM tolerance", "fpdm", smoothing=True, reuse=True, schedule="tolerance"),
)


def methods(dit_depths: Sequence[int]) -> tuple[Method, ...]:
    """The sweep's methods: one ``DiT-<depth>`` per depth, then :data:`FPDM_METHODS`."""
    return tuple(Method(f"DiT-{d}", f"dit{d}") for d in dit_depths) + FPDM_METHODS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring. ``--quick`` replaces the sizes by tiny ones."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--out", default=str(RESULTS_DIR), help="where sweep.json, sweep.md and sweep.png go")
    add("--work", default="runs/sweep", help="checkpoints and training logs")
    add("--quick", action="store_true", help="tiny models, few steps and samples: a smoke test")
    add("--fpdm-steps", type=int, default=3000, help="FPDM training steps (DiT's follow from the compute)")
    add("--hidden-size", type=int, default=64)
    add("--num-heads", type=int, default=4)
    add(
        "--dit-depths",
        type=int,
        nargs="+",
        default=[5, 12],
        help="one DiT per depth; the first (3 * 5 = 15 = FPDM's passes per step) sets FPDM plain's steps",
    )
    add("--sjfb-no-grad", type=int, nargs=2, default=[0, 6], metavar=("MIN", "MAX"))
    add("--sjfb-grad", type=int, nargs=2, default=[1, 3], metavar=("MIN", "MAX"))
    add("--lr", type=float, default=1e-3)
    add("--batch-size", type=int, default=128)
    add("--ema-decay", type=float, default=0.995)
    add("--budgets", type=int, nargs="+", default=[10, 15, 20, 30, 40, 80, 160])
    add("--seeds", type=int, default=4, help="sampling seeds per point")
    add("--num", type=int, default=1000, help="samples per seed and point (one per label, cycling 0-9)")
    add("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    add("--tol", type=float, default=0.1, help="the tolerance schedule's relative residual")
    add("--kid-subsets", type=int, default=50)
    add("--threads", type=int, default=2)
    add("--seed", type=int, default=0, help="training seed")
    add("--reuse-checkpoints", action="store_true", help="sample existing checkpoints in --work")
    add("--overwrite", action="store_true", help="train again the runs in --work that cannot be reused")
    add("--progress", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args(argv)
    if args.quick:
        args.fpdm_steps, args.hidden_size, args.num_heads, args.dit_depths = 4, 16, 2, [5, 6]
        args.batch_size, args.budgets, args.seeds, args.num, args.kid_subsets = 32, [5, 12], 2, 20, 5
    if min(args.budgets) < args.dit_depths[0]:
        parser.error(
            f"the smallest budget must pay for one timestep of the first DiT ({args.dit_depths[0]} blocks)"
        )
    if len(set(args.dit_depths)) != len(args.dit_depths) or min(args.dit_depths) < 1:
        parser.error(f"--dit-depths must be distinct positive depths, got {args.dit_depths}")
    return args


def training_compute(log_path: Path, cfg: TrainConfig, pre_post: int) -> dict[str, Any]:
    """Block passes of an FPDM training run: forward evaluations from its log, backward ones replayed.

    Parameters
    ----------
    log_path : Path
        ``log.jsonl`` of a run trained with ``log_every=1`` (one record with ``block_evals`` per step).
    cfg : TrainConfig
        Its configuration (S-JFB ranges and seed, steps).
    pre_post : int
        Explicit blocks per forward (pre + post).

    Returns
    -------
    dict
        ``forward`` and ``backward`` block passes in all, ``passes = forward + 2 * backward``, per step.

    Raises
    ------
    ValueError
        If the log does not have one record per step, or the replayed draws disagree with it.
    """
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    records = [r for r in records if "block_evals" in r]
    if [r["step"] for r in records] != list(range(1, cfg.steps + 1)):
        raise ValueError(f"{log_path} needs one record with block_evals per step (train with log_every=1)")
    # The S-JFB estimator draws (no-grad, grad) once per training forward from a generator seeded by cfg.seed.
    generator = torch.Generator().manual_seed(cfg.seed)
    forward = backward = 0
    for record in records:
        n_nograd = int(torch.randint(cfg.sjfb_no_grad[0], cfg.sjfb_no_grad[1] + 1, (1,), generator=generator))
        n_grad = int(torch.randint(cfg.sjfb_grad[0], cfg.sjfb_grad[1] + 1, (1,), generator=generator))
        implicit = int(record["block_evals"]) - pre_post
        if not n_grad <= implicit <= n_grad + min(n_nograd, cfg.max_iter):
            raise ValueError(
                f"step {record['step']}: {implicit} implicit evaluations, drawn {n_nograd}+{n_grad}"
            )
        forward += int(record["block_evals"])
        backward += pre_post + n_grad
    return {
        "forward": forward,
        "backward": backward,
        "passes": forward + 2 * backward,
        "passes_per_step": (forward + 2 * backward) / cfg.steps,
    }


def _train_config(args: argparse.Namespace, name: str, steps: int, work: Path) -> TrainConfig:
    common = {
        "hidden_size": args.hidden_size,
        "num_heads": args.num_heads,
        "data": "digits-train",
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "seed": args.seed,
        "steps": steps,
        "ckpt_every": max(steps, 1),
        "log_every": 1,
        "device": "cpu",
        "progress": args.progress,
    }
    if name == "fpdm":
        return TrainConfig(out=str(work / "fpdm"), model="FPDM-Digits/2", pre_depth=1, post_depth=1,
                           grad="sjfb", solver="picard", sjfb_no_grad=tuple(args.sjfb_no_grad),
                           sjfb_grad=tuple(args.sjfb_grad), **common)  # fmt: skip
    depth = int(name.removeprefix("dit"))
    return TrainConfig(out=str(work / name), model="DiT-Digits/2", depth=depth, **common)


def _train_or_reuse(
    cfg: TrainConfig, reuse: bool, overwrite: bool = False
) -> tuple[float, dict[str, Any], bool]:
    """Train (or, with ``reuse`` and a finished checkpoint of the same configuration, skip).

    A folder that holds another run is trained again only with ``overwrite``. Returns the training
    wall-clock (of the run that wrote the checkpoint), the last log record, and whether the checkpoint was
    reused.

    Raises
    ------
    cli.UsageError
        A folder holding a run of another configuration (or, without ``reuse``, any run) and no
        ``overwrite``.
    """
    out = Path(cfg.out)
    wall_path = out / "train_wall_s.json"
    if reuse and (out / CHECKPOINT_NAME).exists() and wall_path.exists():
        refused, applied = compare_configs(stored_config(load_checkpoint(out / CHECKPOINT_NAME)), cfg)
        records, _ = read_jsonl(out / LOG_NAME)
        if not refused and not applied and records and records[-1].get("step") == cfg.steps:
            return float(json.loads(wall_path.read_text())["wall_s"]), records[-1], True
        changes = "; ".join(refused + applied) or "the run did not finish"
        if not overwrite:
            raise UsageError(
                f"{out}: the checkpoint is of another configuration ({changes}); pass --overwrite"
            )
        print(
            f"[sweep] {out}: the checkpoint is of another configuration ({changes}); training again",
            flush=True,
        )
    start = time.perf_counter()
    summary = train(dataclasses.replace(cfg, overwrite=overwrite))
    wall_s = time.perf_counter() - start
    wall_path.write_text(json.dumps({"wall_s": wall_s}) + "\n")
    return wall_s, summary, False


def _sample_options(
    method: Method, budget: int, dit_depth: int, fixed: int, args: argparse.Namespace
) -> dict[str, Any]:
    if method.model.startswith("dit"):
        return {"budget": budget, "schedule": "constant"}
    if not method.smoothing:
        steps = max(1, budget // dit_depth)
    elif method.iters_per_step is not None:
        steps = pick_steps(budget, fixed, True, method.iters_per_step)
    else:
        steps = None
    return {
        "budget": budget,
        "steps": steps,
        "schedule": method.schedule,
        "solver": make_solver(method.solver),
        "reuse": method.reuse,
        "tol": args.tol,
    }


#: The scores of each set of samples (see :func:`run_sweep`), each reported as ``<name>_mean`` and ``_std``.
METRICS = ("fd", "kid", "fd_pixels", "agreement")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_sweep(args: argparse.Namespace) -> tuple[dict[str, Any], dict[tuple[str, int], torch.Tensor]]:
    """Train the models, sample every method under every budget and seed, score.

    Returns the report and, per ``(method, budget)``, the first 20 images of seed 0 (for the grids).
    """
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    work = Path(args.work)

    # 1. Training with the same compute.
    fpdm_cfg = _train_config(args, "fpdm", args.fpdm_steps, work)
    fpdm_wall, fpdm_last, fpdm_reused = _train_or_reuse(fpdm_cfg, args.reuse_checkpoints, args.overwrite)
    fpdm_compute = training_compute(Path(fpdm_cfg.out) / LOG_NAME, fpdm_cfg, pre_post=2)
    models: dict[str, nn.Module] = {"fpdm": sample_cli.load_model(Path(fpdm_cfg.out) / CHECKPOINT_NAME)}
    training: dict[str, dict[str, Any]] = {
        "fpdm": {
            "model": fpdm_cfg.model, "parameters": count_parameters(models["fpdm"]), "steps": fpdm_cfg.steps,
            "sjfb_no_grad": list(fpdm_cfg.sjfb_no_grad), "sjfb_grad": list(fpdm_cfg.sjfb_grad),
            "forward_block_passes": fpdm_compute["forward"],
            "backward_block_passes": fpdm_compute["backward"],
            "block_passes": fpdm_compute["passes"], "wall_s": fpdm_wall, "final_loss": fpdm_last.get("loss"),
            "reused_checkpoint": fpdm_reused,
        },
    }  # fmt: skip
    for depth in args.dit_depths:
        name = f"dit{depth}"
        steps = max(1, round(fpdm_compute["passes"] / (3 * depth)))
        cfg = _train_config(args, name, steps, work)
        wall, last, reused = _train_or_reuse(cfg, args.reuse_checkpoints, args.overwrite)
        models[name] = sample_cli.load_model(Path(cfg.out) / CHECKPOINT_NAME)
        training[name] = {
            "model": cfg.model, "parameters": count_parameters(models[name]), "steps": steps, "depth": depth,
            "forward_block_passes": depth * steps, "backward_block_passes": depth * steps,
            "block_passes": 3 * depth * steps, "wall_s": wall, "final_loss": last.get("loss"),
            "reused_checkpoint": reused,
        }  # fmt: skip
    print(f"[sweep] trained in {time.perf_counter() - start:.0f} s: {json.dumps(training)}", flush=True)

    # 2. The reference: real training images against the held-out test split.
    classifier = load_digits_classifier()
    test = digits_split("test")
    reference = extract_features(classifier.features, test.images)
    reference_pixels = test.images.flatten(1).double()
    kid_size = 1000

    def score(images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, float]:
        features = extract_features(classifier.features, images)
        kid, _ = kernel_inception_distance(
            features, reference, num_subsets=args.kid_subsets, subset_size=kid_size, seed=seed
        )
        return {
            "fd": frechet_distance(features, reference),
            "kid": kid,
            "fd_pixels": frechet_distance(images.flatten(1).double(), reference_pixels),
            "agreement": class_agreement(classifier, images, labels),
        }

    train_split = digits_split("train")
    real = score(train_split.images, train_split.labels, 0)
    real = {**real, "num_images": len(train_split)}

    # 3. Sampling.
    diffusion = GaussianDiffusion()
    labels = torch.arange(args.num) % 10
    rows: list[dict[str, Any]] = []
    firsts: dict[tuple[str, int], torch.Tensor] = {}
    for method in methods(args.dit_depths):
        model = models[method.model]
        fixed, implicit = block_cost(model)
        for budget in args.budgets:
            row: dict[str, Any] = {**dataclasses.asdict(method), "budget": budget, "fixed_per_step": fixed}
            if budget < fixed + implicit:
                # Not one timestep fits: reported as such, not sampled.
                rows.append({**row, "affordable": False, "steps": 0, "per_seed": []})
                print(f"[sweep] {method.name:32s} budget {budget:4d}: not one timestep fits", flush=True)
                continue
            options = _sample_options(method, budget, args.dit_depths[0], fixed, args)
            per_seed: list[dict[str, Any]] = []
            for seed in range(args.seeds):
                generator = torch.Generator().manual_seed(10_000 + seed)
                result = sample(
                    model, diffusion, labels, guidance=args.guidance, generator=generator, **options
                )
                if result.spent_total > budget:
                    raise RuntimeError(f"{method.name}: spent {result.spent_total} > budget {budget}")
                if seed == 0:
                    firsts[(method.name, budget)] = result.images[:20].clamp(-1, 1).cpu()
                per_seed.append(
                    {
                        "seed": seed,
                        **score(result.images.clamp(-1, 1), labels, seed),
                        "spent": result.spent_total,
                        "steps": len(result.timesteps),
                        "iterations": sum(result.iterations),
                        "wall_s": result.wall_s,
                    }
                )
            row.update(
                affordable=True,
                steps=per_seed[0]["steps"],
                spent_max=max(s["spent"] for s in per_seed),
                spent_mean=statistics.fmean(s["spent"] for s in per_seed),
                wall_s_mean=statistics.fmean(s["wall_s"] for s in per_seed),
            )
            for metric in METRICS:
                row[metric + "_mean"], row[metric + "_std"] = _mean_std([s[metric] for s in per_seed])
            row["per_seed"] = per_seed
            rows.append(row)
            print(
                f"[sweep] {method.name:32s} budget {budget:4d}: steps {row['steps']:3d}, spent <= "
                f"{row['spent_max']:4d}, FD {row['fd_mean']:.3f} ± {row['fd_std']:.3f}, KID "
                f"{row['kid_mean']:.4f} ± {row['kid_std']:.4f}, pixel FD {row['fd_pixels_mean']:.2f} ± "
                f"{row['fd_pixels_std']:.2f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "compute_unit": (
            "transformer-block passes: a block forward counts 1, a block backward 2; FPDM's forward "
            "evaluations from its training log, its backward passes (pre + post + S-JFB's differentiable "
            "steps) replayed from the estimator's seeded generator; DiT: 3 * depth per step"
        ),
        "budget_unit": "block evaluations per sample; guidance's doubled batch counted once",
        "reference_metric": (
            "FD and KID in the digits classifier's features, and FD of the raw pixels, against digits-test "
            "(360 images); agreement: the fraction the classifier labels as asked"
        ),
        "training": training,
        "real_train_vs_test": real,
        "results": rows,
        "wall_s": time.perf_counter() - start,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    return report, firsts


def comparisons(dit_depths: Sequence[int]) -> tuple[tuple[str, str, str], ...]:
    """The paired comparisons ``(label, method, baseline)`` that ``sweep.md`` reports."""
    return (
        ("smoothing", "FPDM smoothing", "FPDM plain"),
        ("reuse", "FPDM reuse", "FPDM plain"),
        ("smoothing + reuse", "FPDM smoothing+reuse", "FPDM plain"),
        ("reuse at 1 iteration/step", "FPDM 1 iteration/step+reuse", "FPDM 1 iteration/step"),
        ("1 iteration/step (vs 2), with reuse", "FPDM 1 iteration/step+reuse", "FPDM smoothing+reuse"),
        ("Anderson, 3 iterations/step", "FPDM reuse, Anderson", "FPDM reuse"),
        ("Anderson, 2 iterations/step", "FPDM smoothing+reuse, Anderson", "FPDM smoothing+reuse"),
        ("tolerance schedule", "FPDM tolerance", "FPDM smoothing+reuse"),
        *((f"FPDM smoothing+reuse vs DiT-{d}", "FPDM smoothing+reuse", f"DiT-{d}") for d in dit_depths),
        *(
            (f"FPDM 1 iteration/step+reuse vs DiT-{d}", "FPDM 1 iteration/step+reuse", f"DiT-{d}")
            for d in dit_depths
        ),
    )


def paired_differences(report: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """Per comparison and budget: ``metric`` of the method minus the baseline's, seed by seed (same noise).

    Returns one dict per comparison with ``label``, ``method``, ``baseline`` and ``cells``: per budget
    ``(mean, std)`` of the differences over the seeds, or ``None`` where either side is not affordable.
    Negative means the method scores lower (better) than its baseline.
    """
    rows = {(r["name"], r["budget"]): r for r in report["results"]}
    out = []
    for label, method, baseline in comparisons(report["config"]["dit_depths"]):
        cells: dict[int, tuple[float, float] | None] = {}
        for budget in report["config"]["budgets"]:
            a, b = rows[(method, budget)], rows[(baseline, budget)]
            if not (a["affordable"] and b["affordable"]):
                cells[budget] = None
                continue
            seeds_b = {s["seed"]: s[metric] for s in b["per_seed"]}
            cells[budget] = _mean_std([s[metric] - seeds_b[s["seed"]] for s in a["per_seed"]])
        out.append({"label": label, "method": method, "baseline": baseline, "cells": cells})
    return out


def _cell(row: dict[str, Any], metric: str, digits: int) -> str:
    if not row["affordable"]:
        return "—"
    return f"{row[metric + '_mean']:.{digits}f} ± {row[metric + '_std']:.{digits}f}"


def write_markdown(report: dict[str, Any], path: Path) -> Path:
    """The tables of the report: training, then each score (mean ± std over seeds) per method and budget."""
    cfg, training, real = report["config"], report["training"], report["real_train_vs_test"]
    budgets = cfg["budgets"]
    fpdm = training["fpdm"]
    lines = [
        f"Models trained on `digits-train` (1,437 images) at hidden {cfg['hidden_size']}, lr {cfg['lr']}, "
        f"batch {cfg['batch_size']}, EMA {cfg['ema_decay']}, with the same training compute in block passes "
        "(forward 1, backward 2):",
        "",
        "| model | parameters | training steps | block passes (fwd / bwd) | compute | train wall |",
        "|---|---|---|---|---|---|",
        f"| FPDM-Digits/2 (1 pre + 1 implicit + 1 post; S-JFB {fpdm['sjfb_no_grad'][0]}-"
        f"{fpdm['sjfb_no_grad'][1]} no-grad, {fpdm['sjfb_grad'][0]}-{fpdm['sjfb_grad'][1]} grad) | "
        f"{fpdm['parameters'] / 1e6:.3f} M | {fpdm['steps']} | {fpdm['forward_block_passes']:,} / "
        f"{fpdm['backward_block_passes']:,} | {fpdm['block_passes']:,} | {fpdm['wall_s']:.0f} s |",
    ]
    for name, dit in training.items():
        if name != "fpdm":
            lines.append(
                f"| DiT-Digits/2 (depth {dit['depth']}) | {dit['parameters'] / 1e6:.3f} M | {dit['steps']} | "
                f"{dit['forward_block_passes']:,} / {dit['backward_block_passes']:,} | "
                f"{dit['block_passes']:,} | {dit['wall_s']:.0f} s |"
            )
    lines += [
        "",
        f"Sampling: DDIM over trailing timesteps, guidance {cfg['guidance']}, {cfg['num']} samples per seed, "
        f"{cfg['seeds']} seeds per point; budget = block evaluations per sample (guidance's doubled batch "
        "counted once); cells are mean ± standard deviation over the seeds; — : the budget does not pay for "
        "one timestep. Reference: the real training split scores "
        f"FD {real['fd']:.3f}, KID {real['kid']:.4f}, pixel FD {real['fd_pixels']:.3f}, agreement "
        f"{real['agreement']:.3f} against `digits-test`.",
        "",
    ]
    names = list(dict.fromkeys(r["name"] for r in report["results"]))
    by = {(r["name"], r["budget"]): r for r in report["results"]}
    header = ["| method | " + " | ".join(f"B = {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    tables = (
        ("fd", "Fréchet distance in the digits classifier's features (lower is better)", 3),
        ("kid", "KID in the classifier's features (lower is better)", 4),
        ("fd_pixels", "Fréchet distance of the raw pixels (lower is better)", 3),
        ("agreement", "Class agreement: the fraction the classifier labels as asked", 3),
    )
    for metric, label, digits in tables:
        lines += [f"**{label}**", "", *header]
        for name in names:
            lines.append(
                f"| {name} | " + " | ".join(_cell(by[(name, b)], metric, digits) for b in budgets) + " |"
            )
        lines.append("")
    for metric, label, digits in tables[::2]:
        lines += [
            f"**Paired differences, {label.split(' (')[0]}: method minus baseline, seed by seed (the same "
            "initial noise), mean ± std over the seeds; negative: the method is better**",
            "",
            "| comparison (method - baseline) | " + " | ".join(f"B = {b}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for item in paired_differences(report, metric):
            cells = [
                "—" if item["cells"][b] is None
                else f"{item['cells'][b][0]:+.{digits}f} ± {item['cells'][b][1]:.{digits}f}"
                for b in budgets
            ]  # fmt: skip
            lines.append(f"| {item['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Timesteps (block evaluations spent, max over seeds)**", "", *header]
    for name in names:
        spent = [by[(name, b)] for b in budgets]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r['steps']} ({r['spent_max']})" if r["affordable"] else "—" for r in spent)
            + " |"
        )
    reused = [name for name, t in training.items() if t["reused_checkpoint"]]
    note = (
        f" (the checkpoints of {', '.join(reused)} were reused; their training walls are in the first table)"
        if reused else " (training included)"
    )  # fmt: skip
    lines += ["", f"Whole sweep: {report['wall_s']:.0f} s on {report['environment']['threads']} CPU threads "
              f"(torch {report['environment']['torch']}){note}.", ""]  # fmt: skip
    path.write_text("\n".join(lines))
    return path


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (imported here: only the outputs need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(report: dict[str, Any], path: Path) -> Path:
    """The three distances against the budget (log scales), one line per method, error bars one std."""
    plt = _pyplot()

    panels = (("fd", "Fréchet distance, classifier features"), ("kid", "KID, classifier features"),
              ("fd_pixels", "Fréchet distance, pixels"))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 5))
    names = list(dict.fromkeys(r["name"] for r in report["results"]))
    real = report["real_train_vs_test"]
    colors = [*plt.get_cmap("tab10").colors, "black", "gold", "navy"]
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for k, name in enumerate(names):
            rows = [r for r in report["results"] if r["name"] == name and r["affordable"]]
            dit = name.startswith("DiT")
            ax.errorbar(
                [r["budget"] * (1 + 0.015 * (k - len(names) / 2)) for r in rows],  # offsets: bars visible
                [r[metric + "_mean"] for r in rows],
                yerr=[r[metric + "_std"] for r in rows],
                marker="o" if dit else ".",
                linestyle="--" if dit else "-",
                linewidth=2 if dit else 1.2,
                color=colors[k % len(colors)],
                capsize=3,
                label=name,
            )
        ax.axhline(real[metric], color="gray", linewidth=0.8, linestyle=":", label="real train split")
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["config"]["budgets"], [str(b) for b in report["config"]["budgets"]])
        if metric == "kid":
            ax.set_yscale("symlog", linthresh=1e-2)  # unbiased: near-perfect sets score slightly below 0
        else:
            ax.set_yscale("log")
        ax.set_xlabel("budget: block evaluations per sample")
        ax.set_title(f"{label} (lower is better)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(
        "FPDM vs DiT on 8x8 digits, same training compute, against digits-test; "
        f"mean ± std over {report['config']['seeds']} sampling seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_budgets(budgets: Sequence[int]) -> list[int]:
    """At most four budgets for the grids: the smallest, the largest and two between."""
    b = sorted(budgets)
    return sorted({b[0], b[len(b) // 3], b[2 * len(b) // 3], b[-1]})


def write_grids(report: dict[str, Any], firsts: dict[tuple[str, int], torch.Tensor], path: Path) -> Path:
    """Sample grids: a row per DiT, FPDM plain, FPDM smoothing+reuse and 1 iteration/step, a column per
    budget of :func:`grid_budgets`; each panel the first 20 samples of seed 0 (labels 0-9 twice)."""
    plt = _pyplot()

    wanted = ("FPDM plain", "FPDM smoothing+reuse", "FPDM 1 iteration/step+reuse")
    names = [
        n for n in dict.fromkeys(r["name"] for r in report["results"]) if n.startswith("DiT") or n in wanted
    ]
    budgets = grid_budgets(report["config"]["budgets"])
    fig, axes = plt.subplots(len(names), len(budgets), figsize=(3.2 * len(budgets), 0.9 * len(names) + 0.6),
                             squeeze=False)  # fmt: skip
    for i, name in enumerate(names):
        for j, budget in enumerate(budgets):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            images = firsts.get((name, budget))
            if images is None:
                ax.text(0.5, 0.5, "no timestep fits", ha="center", va="center", fontsize=8, color="gray")
            else:
                tiles = images[:, 0] if images.shape[1] == 1 else images.mean(1)  # (n, h, w)
                tiles = torch.nn.functional.pad(tiles, (0, 1, 0, 1), value=0.0)  # gray lines between digits
                n, h, w = tiles.shape
                rows = tiles.reshape(2, n // 2, h, w).permute(0, 2, 1, 3).reshape(2 * h, n // 2 * w)
                ax.imshow(rows.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            if i == 0:
                ax.set_title(f"budget {budget}", fontsize=9)
            if j == 0:
                ax.set_ylabel(
                    name.replace("FPDM ", "FPDM\n"), fontsize=7, rotation=0, ha="right", va="center"
                )
    fig.suptitle("First 20 samples of seed 0 (labels 0-9, twice) per method and budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep and write ``sweep.json``, ``sweep.md`` and ``sweep.png``; print their paths."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, firsts = run_sweep(args)
    report["paired_differences"] = {m: paired_differences(report, m) for m in ("fd", "fd_pixels")}
    (out / "sweep.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    write_markdown(report, out / "sweep.md")
    write_plot(report, out / "sweep.png")
    write_grids(report, firsts, out / "grids.png")
    for name in ("sweep.json", "sweep.md", "sweep.png", "grids.png"):
        print(f"[sweep] wrote {out / name}")
    if not all(math.isfinite(r["fd_mean"]) for r in report["results"] if r["affordable"]):
        print("[sweep] warning: a non-finite Fréchet distance", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
