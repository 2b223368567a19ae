"""The sweep's outputs from its report: ``sweep.md`` (tables), ``sweep.png`` (scores against the budget) and
``grids.png`` (samples per method and budget). Everything is drawn from ``sweep.json``'s content, so the
files can be rendered again from a saved report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fpdm.sweep_stats import paired_differences

__all__ = ["SCORE_TABLES", "grid_budgets", "write_grids", "write_markdown", "write_plot"]


def _cell(row: dict[str, Any], metric: str, digits: int) -> str:
    if not row["affordable"]:
        return "—"
    return f"{row[metric + '_mean']:.{digits}f} ± {row[metric + '_std']:.{digits}f}"


#: The score tables of ``sweep.md``: metric, title, decimals.
SCORE_TABLES = (
    ("fd", "Fréchet distance in the digits classifier's features (lower is better)", 3),
    ("kid", "KID in the classifier's features (lower is better)", 4),
    ("fd_pixels", "Fréchet distance of the raw pixels (lower is better)", 3),
    ("agreement", "Class agreement: the fraction the classifier labels as asked", 3),
)


def _training_table(settings: dict[str, Any], training: dict[str, Any]) -> list[str]:
    fpdm = training["fpdm"]
    lines = [
        f"Models trained on `digits-train` (1,437 images) at hidden {settings['hidden_size']}, "
        f"lr {settings['lr']}, batch {settings['batch_size']}, EMA {settings['ema_decay']}, with the same "
        "training compute in block passes (forward 1, backward 2):",
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
    return lines


def _sampling_note(settings: dict[str, Any], real: dict[str, Any]) -> list[str]:
    return [
        "",
        f"Sampling: DDIM over trailing timesteps, guidance {settings['guidance']}, {settings['num']} samples "
        f"per seed, {settings['seeds']} seeds per point; budget = block evaluations per sample (guidance's "
        "doubled batch counted once); cells are mean ± standard deviation over the seeds; — : the budget "
        "does not pay for one timestep. Reference: the real training split scores "
        f"FD {real['fd']:.3f}, KID {real['kid']:.4f}, pixel FD {real['fd_pixels']:.3f}, agreement "
        f"{real['agreement']:.3f} against `digits-test`.",
        "",
    ]


def _method_tables(report: dict[str, Any]) -> list[str]:
    """One table per score, then the timesteps: a row per method, a column per budget."""
    budgets = report["config"]["budgets"]
    names = list(dict.fromkeys(r["name"] for r in report["results"]))
    by = {(r["name"], r["budget"]): r for r in report["results"]}
    header = ["| method | " + " | ".join(f"B = {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    lines: list[str] = []
    for metric, label, digits in SCORE_TABLES:
        lines += [f"**{label}**", "", *header]
        for name in names:
            lines.append(
                f"| {name} | " + " | ".join(_cell(by[(name, b)], metric, digits) for b in budgets) + " |"
            )
        lines.append("")
    lines += _paired_tables(report)
    lines += ["**Timesteps (block evaluations spent, max over seeds)**", "", *header]
    for name in names:
        spent = [by[(name, b)] for b in budgets]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r['steps']} ({r['spent_max']})" if r["affordable"] else "—" for r in spent)
            + " |"
        )
    return lines


def _paired_tables(report: dict[str, Any]) -> list[str]:
    budgets = report["config"]["budgets"]
    lines: list[str] = []
    for metric, label, digits in SCORE_TABLES[::2]:
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
    return lines


def write_markdown(report: dict[str, Any], path: Path) -> Path:
    """The tables of the report: training, then each score (mean ± std over seeds) per method and budget,
    the paired differences, and the timesteps."""
    settings, training = report["config"], report["training"]
    lines = _training_table(settings, training) + _sampling_note(settings, report["real_train_vs_test"])
    lines += _method_tables(report)
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
