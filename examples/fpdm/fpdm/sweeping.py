"""Quality against compute: FPDM and DiTs trained with the same compute, sampled under a range of budgets.

The sweep (``sweep.py``) trains ``FPDM-Digits/2`` and one ``DiT-Digits/2`` per depth of ``--dit-depths``
on ``digits-train`` with the same training compute, counted in transformer-block passes (a forward counts
1, a backward 2; FPDM's counted exactly from its training log, :func:`training_compute`), so that the
comparison is the paper's: block evaluations on both the training and the sampling side, not wall-clock,
which depends on the machine. It then samples every method of :func:`methods` under every budget with
paired seeds (every method starts from the same noise), scores the samples against ``digits-test``
(:func:`fpdm.evaluation.evaluate_images`) and writes ``sweep.json``, ``sweep.md``, ``sweep.png`` and
``grids.png``. Block counting leaves out FPDM's fusion MLP (about half a block's multiply-adds per token).
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpdm import generation as sample_cli
from fpdm.cli import OneLineParser, UsageError, bounded_float, bounded_int, run_command
from fpdm.data import digits_split
from fpdm.diffusion import GaussianDiffusion
from fpdm.digits_classifier import load_digits_classifier
from fpdm.files import read_jsonl, staged_folder
from fpdm.metrics import class_agreement, extract_features, frechet_distance, kernel_inception_distance
from fpdm.models import count_parameters
from fpdm.sampling import block_cost, pick_steps, sample
from fpdm.sweep_report import write_grids, write_markdown, write_plot
from fpdm.sweep_stats import METRICS, mean_std, paired_differences
from fpdm.training import (
    CHECKPOINT_NAME,
    LOG_NAME,
    TrainConfig,
    compare_configs,
    load_checkpoint,
    make_solver,
    stored_config,
    train,
)

__all__ = [
    "FPDM_METHODS",
    "Method",
    "build_parser",
    "main",
    "methods",
    "parse_args",
    "run_sweep",
    "training_compute",
]

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


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


def build_parser() -> argparse.ArgumentParser:
    """The sweep's command line (``sweep.py``)."""
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    positive = bounded_int(1)
    add("--out", default=str(RESULTS_DIR), help="where sweep.json, sweep.md and sweep.png go")
    add("--work", default="runs/sweep", help="checkpoints and training logs")
    add("--quick", action="store_true", help="tiny models, few steps and samples: a smoke test")
    add(
        "--fpdm-steps",
        type=positive,
        default=3000,
        help="FPDM training steps (DiT's follow from the compute)",
    )
    add("--hidden-size", type=positive, default=64)
    add("--num-heads", type=positive, default=4)
    add(
        "--dit-depths",
        type=positive,
        nargs="+",
        default=[5, 12],
        help="one DiT per depth; the first (3 * 5 = 15 = FPDM's passes per step) sets FPDM plain's steps",
    )
    add("--sjfb-no-grad", type=bounded_int(0), nargs=2, default=[0, 6], metavar=("MIN", "MAX"))
    add("--sjfb-grad", type=positive, nargs=2, default=[1, 3], metavar=("MIN", "MAX"))
    add("--lr", type=bounded_float(0.0, low_open=True), default=1e-3)
    add("--batch-size", type=positive, default=128)
    add("--ema-decay", type=bounded_float(0.0, 1.0), default=0.995)
    add("--budgets", type=positive, nargs="+", default=[10, 15, 20, 30, 40, 80, 160])
    add("--seeds", type=positive, default=4, help="sampling seeds per point")
    add("--num", type=positive, default=1000, help="samples per seed and point (one per label, cycling 0-9)")
    add("--guidance", type=bounded_float(), default=1.0, help="classifier-free guidance scale (1: none)")
    add(
        "--tol",
        type=bounded_float(0.0, low_open=True),
        default=0.1,
        help="the tolerance schedule's relative residual",
    )
    add("--kid-subsets", type=positive, default=50)
    add("--threads", type=positive, default=2)
    add("--seed", type=bounded_int(0), default=0, help="training seed")
    add("--reuse-checkpoints", action="store_true", help="sample existing checkpoints in --work")
    add(
        "--overwrite",
        action="store_true",
        help="replace the results already in --out, and train again the runs in --work that cannot be reused",
    )
    add("--progress", action=argparse.BooleanOptionalAction, default=False)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring. ``--quick`` replaces the sizes by tiny ones."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.fpdm_steps, args.hidden_size, args.num_heads, args.dit_depths = 4, 16, 2, [5, 6]
        args.batch_size, args.budgets, args.seeds, args.num, args.kid_subsets = 32, [5, 12], 2, 20, 5
    if min(args.budgets) < args.dit_depths[0]:
        parser.error(
            f"the smallest budget must pay for one timestep of the first DiT ({args.dit_depths[0]} blocks)"
        )
    if len(set(args.dit_depths)) != len(args.dit_depths):
        parser.error(f"--dit-depths must be distinct depths, got {args.dit_depths}")
    for name in ("sjfb_no_grad", "sjfb_grad"):
        low, high = getattr(args, name)
        if low > high:
            parser.error(f"--{name.replace('_', '-')} must be MIN MAX with MIN <= MAX, got {low} {high}")
    return args


def training_compute(log_path: Path, cfg: TrainConfig, pre_post: int) -> dict[str, Any]:
    """Block passes of an FPDM training run, read from its log: forward evaluations and backward ones.

    Every step's record carries its forward evaluations (``block_evals``) and, of those, the gradient
    estimator's differentiable ones (``grad_evals``: S-JFB's grad draw), which the backward pass goes
    through again with the explicit blocks; ``nfe`` is the no-grad rest.

    Parameters
    ----------
    log_path : Path
        ``log.jsonl`` of a run trained with ``log_every=1`` (one record per step).
    cfg : TrainConfig
        Its configuration (the number of steps).
    pre_post : int
        Explicit blocks per forward (pre + post).

    Returns
    -------
    dict
        ``forward`` and ``backward`` block passes in all, ``passes = forward + 2 * backward``, per step.

    Raises
    ------
    ValueError
        If the log does not have one record per step, was written before ``grad_evals`` were logged (train
        again), or a record's counts do not add up (``block_evals = pre_post + nfe + grad_evals``).
    """
    records = [r for r in read_jsonl(log_path)[0] if "block_evals" in r]
    if [r["step"] for r in records] != list(range(1, cfg.steps + 1)):
        raise ValueError(f"{log_path} needs one record with block_evals per step (train with log_every=1)")
    forward = backward = 0
    for record in records:
        if "grad_evals" not in record or "nfe" not in record:
            raise ValueError(
                f"{log_path}, step {record['step']}: no grad_evals/nfe: the log was written by an older "
                "train.py that did not record the estimator's evaluations; train the run again"
            )
        implicit = int(record["nfe"]) + int(record["grad_evals"])
        if int(record["block_evals"]) != pre_post + implicit:
            raise ValueError(
                f"step {record['step']}: block_evals {record['block_evals']} is not {pre_post} explicit + "
                f"{record['nfe']} no-grad + {record['grad_evals']} grad evaluations (implicit evaluations)"
            )
        forward += int(record["block_evals"])
        backward += pre_post + int(record["grad_evals"])
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
        saved = stored_config(load_checkpoint(out / CHECKPOINT_NAME), TrainConfig)
        refused, applied = compare_configs(saved, cfg)
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
    held = [name for name in (CHECKPOINT_NAME, LOG_NAME) if (out / name).exists()]
    if held and not overwrite:
        raise UsageError(
            f"{out} holds a run of an earlier sweep ({', '.join(held)}); pass --reuse-checkpoints to sample "
            "it, --overwrite to train it again, or another --work"
        )
    start = time.perf_counter()
    summary = train(dataclasses.replace(cfg, overwrite=overwrite))
    wall_s = time.perf_counter() - start
    wall_path.write_text(json.dumps({"wall_s": wall_s}) + "\n")
    return wall_s, summary, False


def _sample_options(
    method: Method, budget: int, dit_depth: int, explicit: int, args: argparse.Namespace
) -> dict[str, Any]:
    if method.model.startswith("dit"):
        return {"budget": budget, "schedule": "constant"}
    if not method.smoothing:
        steps = max(1, budget // dit_depth)
    elif method.iters_per_step is not None:
        steps = pick_steps(budget, explicit, True, method.iters_per_step)
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
def _train_all(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Train FPDM, then each DiT with FPDM's training compute; the models (EMA weights) and their records."""
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
    return models, training


Scorer = Callable[[torch.Tensor, torch.Tensor, int], dict[str, float]]


def _scorer(kid_subsets: int) -> Scorer:
    """Scores of a set of images against ``digits-test``: FD and KID in the classifier's features, FD of the
    pixels, class agreement (:data:`sweep_stats.METRICS`)."""
    classifier = load_digits_classifier()
    test = digits_split("test")
    reference = extract_features(classifier.features, test.images)
    reference_pixels = test.images.flatten(1).double()

    def score(images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, float]:
        features = extract_features(classifier.features, images)
        kid, _ = kernel_inception_distance(
            features, reference, num_subsets=kid_subsets, subset_size=KID_SUBSET_SIZE, seed=seed
        )
        return {
            "fd": frechet_distance(features, reference),
            "kid": kid,
            "fd_pixels": frechet_distance(images.flatten(1).double(), reference_pixels),
            "agreement": class_agreement(classifier, images, labels),
        }

    return score


def _sample_seeds(
    model: nn.Module, method: Method, budget: int, args: argparse.Namespace, score: Scorer
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Sample ``method`` at ``budget`` under every seed and score; the per-seed records and seed 0's first
    20 images."""
    options = _sample_options(method, budget, args.dit_depths[0], block_cost(model)[0], args)
    labels = torch.arange(args.num) % 10
    per_seed: list[dict[str, Any]] = []
    first = torch.empty(0)
    for seed in range(args.seeds):
        generator = torch.Generator().manual_seed(10_000 + seed)
        result = sample(
            model, GaussianDiffusion(), labels, guidance=args.guidance, generator=generator, **options
        )
        if result.spent_total > budget:
            raise RuntimeError(f"{method.name}: spent {result.spent_total} > budget {budget}")
        if seed == 0:
            first = result.images[:20].clamp(-1, 1).cpu()
        record = {
            "seed": seed,
            **score(result.images.clamp(-1, 1), labels, seed),
            "spent": result.spent_total,
        }
        record.update(steps=len(result.timesteps), iterations=sum(result.iterations), wall_s=result.wall_s)
        per_seed.append(record)
    return per_seed, first


def _summarise(row: dict[str, Any], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    row.update(
        affordable=True,
        steps=per_seed[0]["steps"],
        spent_max=max(s["spent"] for s in per_seed),
        spent_mean=statistics.fmean(s["spent"] for s in per_seed),
        wall_s_mean=statistics.fmean(s["wall_s"] for s in per_seed),
    )
    for metric in METRICS:
        row[metric + "_mean"], row[metric + "_std"] = mean_std([s[metric] for s in per_seed])
    row["per_seed"] = per_seed
    return row


def _print_row(row: dict[str, Any], elapsed: float) -> None:
    print(
        f"[sweep] {row['name']:32s} budget {row['budget']:4d}: steps {row['steps']:3d}, spent <= "
        f"{row['spent_max']:4d}, FD {row['fd_mean']:.3f} ± {row['fd_std']:.3f}, KID "
        f"{row['kid_mean']:.4f} ± {row['kid_std']:.4f}, pixel FD {row['fd_pixels_mean']:.2f} ± "
        f"{row['fd_pixels_std']:.2f} ({elapsed:.0f} s)",
        flush=True,
    )


def run_sweep(args: argparse.Namespace) -> tuple[dict[str, Any], dict[tuple[str, int], torch.Tensor]]:
    """Train the models, sample every method under every budget and seed, score.

    Returns the report and, per ``(method, budget)``, the first 20 images of seed 0 (for the grids).
    """
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models, training = _train_all(args, Path(args.work))
    print(f"[sweep] trained in {time.perf_counter() - start:.0f} s: {json.dumps(training)}", flush=True)
    score = _scorer(args.kid_subsets)
    train_split = digits_split("train")  # the floor: real images against the held-out split
    real = {**score(train_split.images, train_split.labels, 0), "num_images": len(train_split)}
    rows: list[dict[str, Any]] = []
    firsts: dict[tuple[str, int], torch.Tensor] = {}
    for method in methods(args.dit_depths):
        model = models[method.model]
        explicit, implicit = block_cost(model)
        for budget in args.budgets:
            row: dict[str, Any] = {**dataclasses.asdict(method), "budget": budget, "fixed_per_step": explicit}
            if budget < explicit + implicit:  # not one timestep fits: reported as such, not sampled
                rows.append({**row, "affordable": False, "steps": 0, "per_seed": []})
                print(f"[sweep] {method.name:32s} budget {budget:4d}: not one timestep fits", flush=True)
                continue
            per_seed, firsts[(method.name, budget)] = _sample_seeds(model, method, budget, args, score)
            rows.append(_summarise(row, per_seed))
            _print_row(rows[-1], time.perf_counter() - start)
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "work")}, **REPORT_UNITS}
    report.update(
        training=training, real_train_vs_test=real, results=rows, wall_s=time.perf_counter() - start
    )
    report["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    return report, firsts


#: What the report's numbers count, written into ``sweep.json``.
REPORT_UNITS = {
    "compute_unit": (
        "transformer-block passes: a block forward counts 1, a block backward 2; FPDM's forward "
        "evaluations from its training log, its backward passes (pre + post + S-JFB's differentiable "
        "steps, logged per step as grad_evals); DiT: 3 * depth per step"
    ),
    "budget_unit": "block evaluations per sample; guidance's doubled batch counted once",
    "reference_metric": (
        "FD and KID in the digits classifier's features, and FD of the raw pixels, against digits-test "
        "(360 images); agreement: the fraction the classifier labels as asked"
    ),
}
KID_SUBSET_SIZE = 1000


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep and write ``sweep.json``, ``sweep.md``, ``sweep.png`` and ``grids.png``; print their
    paths. Exit status 2 on a usage error (results in ``--out`` or a run in ``--work`` that would be
    replaced without ``--overwrite``)."""
    args = parse_args(argv)
    return run_command(OneLineParser(prog="sweep.py"), lambda: _write_outputs(args))


OUTPUT_NAMES = ("sweep.json", "sweep.md", "sweep.png", "grids.png")


def check_out(out: Path, overwrite: bool) -> None:
    """``--out`` must be a folder without results, unless ``overwrite`` (the default, ``results/``, holds the
    committed results of the full sweep, which a ``--quick`` smoke test must not replace by accident)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    found = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if found and not overwrite:
        raise UsageError(
            f"--out {out} already holds results ({', '.join(found)}); pass --overwrite to replace them, or "
            "another --out"
        )


def _write_outputs(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    report, firsts = run_sweep(args)
    report["paired_differences"] = {m: paired_differences(report, m) for m in ("fd", "fd_pixels")}
    with staged_folder(out) as stage:  # the earlier results stay whole until the new ones are all written
        (stage / "sweep.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        write_markdown(report, stage / "sweep.md")
        write_plot(report, stage / "sweep.png")
        write_grids(report, firsts, stage / "grids.png")
    for name in OUTPUT_NAMES:
        print(f"[sweep] wrote {out / name}")
    if not all(math.isfinite(r["fd_mean"]) for r in report["results"] if r["affordable"]):
        print("[sweep] warning: a non-finite Fréchet distance", file=sys.stderr)
    return 0
