"""A sampling run on disk: one shard file per finished batch, the run's settings, and the final merge.

A run of ``N`` samples in batches of ``B`` has ``ceil(N / B)`` batches; batch ``b`` holds the sample indices
``b B .. min(N, (b + 1) B) - 1``. Under ``torchrun``, rank ``r`` of ``W`` samples the batches
``b = r, r + W, r + 2W, ...``. Each finished batch is written at once, atomically, to
``shards/batch-<b>.npz``; ``shards/run.json`` holds the settings of the run. A rerun with the same settings
samples only the batches that have no shard (a sample depends on ``(seed, index)`` alone, so the result is
the one an uninterrupted run writes); a rerun with other settings is refused, or starts again with
``--overwrite``. :func:`merge_shards` streams the shards into one ``samples.npz`` (memory: one shard).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fpdm.cli import UsageError, flag
from fpdm.files import NpzMember, save_npz_atomically, write_npz_streamed

__all__ = ["MANIFEST_NAME", "PER_BATCH", "SHARDS_NAME", "ShardPlan", "merge_shards", "open_shards"]

SHARDS_NAME = "shards"
MANIFEST_NAME = "run.json"
#: The arrays of a shard that hold one row per batch (the costs of each timestep); the others hold one row
#: per sample.
PER_BATCH = ("timesteps", "spent", "iterations", "residuals")
_SHARD = re.compile(r"batch-(\d+)\.npz")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """The batches of a run of ``num_samples`` samples in batches of ``batch_size``, kept in ``folder``."""

    folder: Path
    num_samples: int
    batch_size: int

    @property
    def num_batches(self) -> int:
        """``ceil(num_samples / batch_size)``."""
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self, batch: int) -> tuple[int, int]:
        """The sample indices ``(start, stop)`` of ``batch``."""
        start = batch * self.batch_size
        return start, min(self.num_samples, start + self.batch_size)

    def path(self, batch: int) -> Path:
        """The shard file of ``batch``."""
        return self.folder / f"batch-{batch:06d}.npz"

    def finished(self) -> set[int]:
        """The batches whose shard is on disk (a listing of the folder: what was done, not the whole run)."""
        if not self.folder.is_dir():
            return set()
        found = (_SHARD.fullmatch(p.name) for p in self.folder.iterdir())
        return {int(m[1]) for m in found if m and int(m[1]) < self.num_batches}

    def batches_for(self, rank: int, world_size: int, done: set[int]) -> Iterator[int]:
        """The batches of ``rank`` (``b = rank mod world_size``) that are not in ``done``, lazily."""
        return (b for b in range(rank, self.num_batches, world_size) if b not in done)

    def write(self, batch: int, arrays: dict[str, np.ndarray]) -> Path:
        """Write the shard of ``batch`` atomically."""
        return save_npz_atomically(self.path(batch), **arrays)

    def summaries(self) -> Iterator[dict[str, Any]]:
        """Each shard's summary (the sampler's ``summary()`` of its batch), in batch order."""
        for batch in range(self.num_batches):
            with np.load(self.path(batch)) as arrays:
                yield json.loads(str(arrays["summary"]))


def _differences(saved: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(settings))
    changed = [k for k in keys if json.dumps(saved.get(k)) != json.dumps(settings.get(k))]
    return [f"{flag(k)} {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed]


def open_shards(out: Path, settings: dict[str, Any], overwrite: bool) -> tuple[ShardPlan, int]:
    """The shard folder of a run in ``out``: created with the run's ``settings``, or continued when it holds
    shards of the same settings; returns the plan and how many batches are already done.

    ``settings`` must hold ``num_samples`` and ``batch_size`` and compare as JSON. Shards of other settings
    are deleted with ``overwrite``.

    Raises
    ------
    cli.UsageError
        ``out/shards`` holds shards of other settings (each difference named) and ``overwrite`` is not set.
    """
    folder = Path(out) / SHARDS_NAME
    manifest = folder / MANIFEST_NAME
    plan = ShardPlan(folder, int(settings["num_samples"]), int(settings["batch_size"]))
    if folder.exists():
        try:
            saved = json.loads(manifest.read_text())
        except (OSError, ValueError):
            saved = {"settings": "unreadable"}
        if saved != json.loads(json.dumps(settings)):
            if not overwrite:
                changes = "; ".join(_differences(saved, settings)[:4])
                raise UsageError(
                    f"{folder} holds the shards of an interrupted run with other settings ({changes}); rerun "
                    "it with its settings to finish it, or pass --overwrite to discard it"
                )
            shutil.rmtree(folder)
    if not folder.exists():
        folder.mkdir(parents=True)
        tmp = manifest.with_name(f".{MANIFEST_NAME}.tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        tmp.replace(manifest)
    return plan, len(plan.finished())


def _rows(plan: ShardPlan, name: str) -> Iterable[np.ndarray]:
    for batch in range(plan.num_batches):
        with np.load(plan.path(batch)) as arrays:
            rows = arrays[name]
        yield rows[None] if name in PER_BATCH else rows


def merge_shards(plan: ShardPlan, path: Path, aliases: dict[str, str] | None = None) -> Path:
    """Stream every shard of a finished run into one ``.npz`` at ``path``: the per-sample arrays concatenated
    (``num_samples`` rows), the :data:`PER_BATCH` arrays stacked (one row per batch), and ``aliases``
    (``{new: existing}``) as further copies of per-sample arrays. Memory: one shard at a time.

    Raises
    ------
    ValueError
        A batch without its shard, or shards whose arrays do not agree.
    """
    missing = [b for b in range(plan.num_batches) if not plan.path(b).exists()]
    if missing:
        raise ValueError(f"{plan.folder}: no shard for batch {missing[0]} ({len(missing)} missing)")
    with np.load(plan.path(0)) as first:
        kinds = {name: (first[name].dtype, first[name].shape) for name in first.files if name != "summary"}
    members = {}
    for name, (dtype, shape) in kinds.items():
        rows = plan.num_batches if name in PER_BATCH else plan.num_samples
        row_shape = shape if name in PER_BATCH else shape[1:]
        members[name] = NpzMember((rows, *row_shape), dtype, lambda name=name: _rows(plan, name))
    for alias, name in (aliases or {}).items():
        if name in members:
            members[alias] = members[name]
    return write_npz_streamed(path, members)
