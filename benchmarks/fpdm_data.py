"""Memory and speed of the FPDM example's data path: training on a latents folder, and extracting one.

    python -m benchmarks.fpdm_data                      # writes benchmarks/results/fpdm_data.json
    python -m benchmarks.fpdm_data --baseline-ref main  # and the .pt path of a git revision, side by side
    python -m benchmarks.fpdm_data --quick --out /tmp/d.json  # a smoke run (small sizes) in a minute

Three measurements, each in fresh processes:

* ``train``: ``torchrun --nproc_per_node 2`` (gloo, CPU) trains 3 steps on a latents folder of random
  float32 values, 4x32x32 per row (ImageNet-256's latent shape), at two sizes (``--rows``; by default
  16,384 and 131,072 rows: 0.25 and 2 GiB). Each rank reports its peak resident set (``VmHWM`` of
  ``/proc/self/status``, which counts the file pages it mapped and touched). With ``--baseline-ref REF``
  the same rows are saved as the ``.pt`` file that revision's ``--data latents:FILE`` loads, and that
  revision's ``train.py`` (from ``git archive``) is measured the same way, for files up to
  ``--baseline-max-gib`` (that path holds about three copies of the file in each rank: 2 GiB would take
  some 12 GB of a shared machine's memory).
* ``extract``: ``extract_latents.py`` with the tiny random VAE on two folders of random JPEGs (256 and 2,048
  images, 96x128 px, encoded at 32 px): the peak resident set of the process (``--workers 0``: every image
  is decoded in it).
* ``throughput``: images per second of the encoding loop (from the command's summary, without start-up)
  on the 2,048-image folder with ``--workers 0`` and ``--workers 2``, alternated, twice each.

The machine's load (``os.getloadavg``) and the other busy processes are recorded with the results: on a
shared machine they decide how much two workers can add.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fpdm"
ROW_SHAPE = (4, 32, 32)
NUM_CLASSES = 1000
#: The model trained: small, so that the resident set shows the data path, not the activations.
TRAIN_ARGS = ["--hidden-size", "32", "--num-heads", "2", "--batch-size", "16", "--steps", "3",
              "--ckpt-every", "3", "--no-progress", "--device", "cpu"]  # fmt: skip
GIB = 1024**3

#: Runs a command line's ``main`` and writes the process's peak resident set to $FPDM_DATA_RSS/rank<R>.json.
WRAPPER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    def peak_kb():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    module = __import__(sys.argv[1], fromlist=["main"])
    try:
        status = module.main(sys.argv[2:])
    except SystemExit as stop:
        status = stop.code
    rank = os.environ.get("RANK", "0")
    Path(os.environ["FPDM_DATA_RSS"], f"rank{rank}.json").write_text(json.dumps({"peak_kB": peak_kb()}))
    sys.exit(status)
    """
)


def machine_load() -> dict:
    """The load average and the processes that were busy (not this benchmark's)."""
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,args", "--sort=-pcpu"], capture_output=True, text=True)
    busy = []
    for line in ps.stdout.splitlines()[1:]:
        pid, cpu, rss, args = line.split(None, 3)
        if float(cpu) >= 10.0 and int(pid) != os.getpid() and not args.startswith("ps "):
            busy.append({"cpu_percent": float(cpu), "rss_MB": int(rss) // 1024, "command": _program(args)})
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_processes": busy[:8]}


def _program(args: str) -> str:
    """A command line without its folders (``/x/.venv/bin/python -m pytest`` -> ``python -m pytest``)."""
    return " ".join(Path(word).name if "/" in word else word for word in args.split()[:6])


def write_latents_folder(folder: Path, rows: int) -> int:
    """A latents folder of random float32 rows, written in chunks with numpy (the documented format)."""
    folder.mkdir(parents=True)
    array = np.lib.format.open_memmap(
        folder / "latents.npy", mode="w+", dtype=np.float32, shape=(rows, *ROW_SHAPE)
    )
    offset = array.offset
    del array  # written through windows: this process stays small too
    rng = np.random.default_rng(0)
    chunk = 8192
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        first = offset + start * 4 * int(np.prod(ROW_SHAPE))
        window = np.memmap(
            folder / "latents.npy", dtype=np.float32, mode="r+", offset=first, shape=(n, *ROW_SHAPE)
        )
        window[:] = rng.standard_normal((n, *ROW_SHAPE), dtype=np.float32)
        window.flush()
        del window
    np.save(folder / "labels.npy", rng.integers(0, NUM_CLASSES, size=rows).astype(np.int64))
    meta = {"format": "fpdm-latents/1", "count": rows, "num_classes": NUM_CLASSES,
            "class_names": [str(i) for i in range(NUM_CLASSES)], "scaling_factor": 0.18215, "vae": None,
            "image_size": 256, "latent_shape": list(ROW_SHAPE), "dtype": "float32"}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))
    return (folder / "latents.npy").stat().st_size


def write_pt(folder: Path, path: Path) -> None:
    """The same rows as the ``.pt`` file of the earlier format (loaded whole by that revision)."""
    import torch

    latents = torch.from_numpy(np.load(folder / "latents.npy", mmap_mode="r")[:].copy())
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    torch.save({"latents": latents, "labels": labels, "num_classes": torch.tensor(NUM_CLASSES),
                "scaling_factor": torch.tensor(0.18215)}, path)  # fmt: skip


def run_measured(module: str, args: list[str], work: Path, package: Path, nproc: int) -> dict:
    """Run ``module.main(args)`` (under torchrun when ``nproc > 1``); each process's peak RSS and the
    summary line it printed."""
    rss = Path(tempfile.mkdtemp(dir=work, prefix="rss-"))
    wrapper = work / "measured.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), str(ROOT)]), "FPDM_DATA_RSS": str(rss)}
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    proc = subprocess.run(
        [*launch, str(wrapper), module, *args], capture_output=True, text=True, env=env, cwd=work
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peaks = {
        p.stem: json.loads(p.read_text())["peak_kB"] * 1024 / GIB for p in sorted(rss.glob("rank*.json"))
    }
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"peak_GiB": peaks, "summary": json.loads(lines[-1]) if lines else None}


def measure_training(
    work: Path, sizes: list[int], baseline: Path | None, baseline_max_gib: float
) -> list[dict]:
    rows_out = []
    for rows in sizes:
        folder = work / f"latents-{rows}"
        size = write_latents_folder(folder, rows)
        run = work / f"run-{rows}"
        args = ["--data", f"latents:{folder}", "--out", str(run), *TRAIN_ARGS]
        new = run_measured("fpdm.training", args, work, EXAMPLE, nproc=2)
        row = {
            "rows": rows,
            "file_GiB": size / GIB,
            "folder_peak_GiB": new["peak_GiB"],
            "load": machine_load(),
        }
        if baseline is not None:
            if size > baseline_max_gib * GIB:
                row["pt_peak_GiB"] = f"not measured: files above {baseline_max_gib} GiB (--baseline-max-gib)"
            else:
                pt = work / f"latents-{rows}.pt"
                write_pt(folder, pt)
                args = ["--data", f"latents:{pt}", "--out", str(work / f"run-pt-{rows}"), *TRAIN_ARGS]
                row["pt_peak_GiB"] = run_measured("fpdm.training", args, work, baseline, nproc=2)["peak_GiB"]
                pt.unlink()
        _remove_tree(folder)
        rows_out.append(row)
        print(f"  train: {rows} rows ({size / GIB:.2f} GiB) measured", file=sys.stderr)
    return rows_out


def write_images(folder: Path, count: int) -> None:
    """``count`` random 96x128 JPEGs in 4 classes."""
    from PIL import Image

    rng = np.random.default_rng(count)
    for i in range(count):
        klass = folder / f"class{i % 4}"
        klass.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(klass / f"{i:05d}.jpg", quality=90)


def extract_args(images: Path, out: Path, workers: int) -> list[str]:
    return ["--data", f"folder:{images}", "--out", str(out), "--random-tiny-vae", "--image-size", "32",
            "--batch-size", "32", "--workers", str(workers), "--device", "cpu", "--no-progress",
            "--json"]  # fmt: skip


def measure_extraction(work: Path, counts: list[int], repeats: int) -> tuple[list[dict], list[dict]]:
    memory, speed = [], []
    for count in counts:
        images = work / f"images-{count}"
        write_images(images, count)
        out = work / f"extract-{count}"
        result = run_measured("fpdm.latents", extract_args(images, out, 0), work, EXAMPLE, nproc=1)
        memory.append({"images": count, "peak_GiB": result["peak_GiB"]["rank0"], "load": machine_load()})
        print(f"  extract: {count} images measured", file=sys.stderr)
    largest = work / f"images-{max(counts)}"
    for repeat in range(repeats):
        for workers in (0, 2):
            out = work / f"speed-{repeat}-{workers}"
            summary = run_measured("fpdm.latents", extract_args(largest, out, workers), work, EXAMPLE, 1)[
                "summary"
            ]
            speed.append({"workers": workers, "repeat": repeat, "images": max(counts),
                          "images_per_second": summary["images_per_second"], "seconds": summary["seconds"],
                          "load": machine_load()})  # fmt: skip
            _remove_tree(out)
    return memory, speed


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def baseline_package(work: Path, ref: str) -> Path:
    """The example package of git revision ``ref``, extracted with ``git archive``."""
    target = work / "baseline"
    target.mkdir()
    archive = subprocess.run(
        ["git", "archive", ref, "examples/fpdm"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "examples" / "fpdm"


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "fpdm_data.json")
    parser.add_argument("--rows", type=int, nargs="+", default=[16_384, 131_072], help="latents folder sizes")
    parser.add_argument("--images", type=int, nargs=2, default=[256, 2048], help="two image folder sizes")
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per worker count")
    parser.add_argument("--baseline-ref", default=None, help="git revision whose .pt path to measure too")
    parser.add_argument("--baseline-max-gib", type=float, default=0.5, help="largest file for the baseline")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "extract"], help="parts to skip")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.images, args.repeats = [256], [8, 16], 1
    started = harness.start()
    report: dict = {"train_args": TRAIN_ARGS, "load_at_start": machine_load()}
    with tempfile.TemporaryDirectory(prefix="fpdm-data-") as tmp:
        work = Path(tmp)
        baseline = baseline_package(work, args.baseline_ref) if args.baseline_ref else None
        if args.baseline_ref:
            report["baseline_ref"] = args.baseline_ref
        if "train" not in args.skip:
            report["train"] = measure_training(work, args.rows, baseline, args.baseline_max_gib)
        if "extract" not in args.skip:
            report["extract"], report["throughput"] = measure_extraction(work, args.images, args.repeats)
    return harness.finish(args, "fpdm_data.json", report, started)


if __name__ == "__main__":
    sys.exit(main())
