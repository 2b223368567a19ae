"""Issue 23: an option that would do nothing is refused with one line, before anything is written, so that
the corrected command runs as if the first had never been typed."""

import json

import pytest
from fpdm import generation as sample_cli
from fpdm import training as train
from fpdm.training import CHECKPOINT_NAME, TrainConfig, load_checkpoint

EXIT_USAGE = 2  # the README's exit status of a usage error
TINY = ["--hidden-size", "16", "--num-heads", "2", "--batch-size", "16", "--no-progress", "--log-every", "1"]


def exit_status(main, argv, capsys):
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


DIT = ["--model", "DiT-Digits/2"]
UNUSED_TRAIN = [
    ([*DIT, "--pre-depth", "2"], "--pre-depth 2 does nothing with --model DiT-Digits/2"),
    ([*DIT, "--post-depth", "0"], "--post-depth 0 does nothing with --model DiT-Digits/2"),
    ([*DIT, "--solver", "anderson"], "--solver anderson does nothing with --model DiT-Digits/2"),
    ([*DIT, "--grad", "ift"], "--grad ift does nothing with --model DiT-Digits/2"),
    ([*DIT, "--max-iter", "20"], "--max-iter 20 does nothing with --model DiT-Digits/2"),
    ([*DIT, "--tol", "0.01"], "--tol 0.01 does nothing with --model DiT-Digits/2"),
    ([*DIT, "--sjfb-grad", "1", "2"], "--sjfb-grad 1 2 does nothing with --model DiT-Digits/2"),
    ([*DIT, "--phantom-k", "3"], "--phantom-k 3 does nothing with --model DiT-Digits/2"),
    (["--depth", "6"], "--depth 6 does nothing with --model FPDM-Digits/2"),
    (["--grad", "jfb", "--sjfb-no-grad", "0", "2"], "--sjfb-no-grad 0 2 does nothing with --grad jfb"),
    (["--phantom-tau", "0.3"], "--phantom-tau 0.3 does nothing with --grad sjfb: it is for --grad phantom"),
    (["--image-size", "16"], "--image-size 16 does nothing with --data digits"),
    (
        ["--data", "digits-train", "--image-size", "64"],
        "--image-size 64 does nothing with --data digits-train",
    ),
]


@pytest.mark.parametrize("argv, message", UNUSED_TRAIN, ids=[" ".join(a) for a, _ in UNUSED_TRAIN])
def test_train_refuses_options_that_would_do_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    status, err = exit_status(train.main, ["--out", str(out), *TINY, "--steps", "1", *argv], capsys)
    assert status == EXIT_USAGE and message in err and err.count("\n") == 1
    assert not out.exists()
    with pytest.raises(ValueError, match=message.split(" does")[0]):  # the same rule from Python
        TrainConfig(**train_fields(argv)).check()


def train_fields(argv):
    """The TrainConfig fields an argv sets (parsed without the checks)."""
    args = train.build_parser().parse_args(argv)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}


def test_the_corrected_command_runs_after_a_refusal_and_stores_only_what_was_used(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--out", str(out), *TINY, "--steps", "1", *DIT, "--depth", "2"]
    status, _ = exit_status(train.main, [*argv, "--solver", "anderson"], capsys)
    assert status == EXIT_USAGE
    assert train.main(argv) == 0
    config = load_checkpoint(out / CHECKPOINT_NAME)["config"]
    assert config["solver"] == TrainConfig().solver and config["depth"] == 2


def test_options_that_matter_are_still_taken(tmp_path):
    for argv in (["--grad", "phantom", "--phantom-k", "3"], ["--grad", "sjfb", "--sjfb-grad", "1", "2"]):
        train.parse_args(["--out", str(tmp_path), *argv])
    train.parse_args(["--data", f"folder:{tmp_path}", "--image-size", "16"])
    train.parse_args([*DIT, "--depth", "3"])
    train.parse_args(["--pre-depth", "2", "--solver", "anderson", "--max-iter", "3", "--tol", "0.1"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    for name, extra in (("fpdm", ["--grad", "jfb"]), ("dit", [*DIT, "--depth", "2"])):
        assert train.main(["--out", str(root / name), *TINY, "--steps", "1", *extra]) == 0
    return {name: root / name / CHECKPOINT_NAME for name in ("fpdm", "dit")}


UNUSED_SAMPLE = [
    ("dit", ["--schedule", "tolerance"], "--schedule tolerance does nothing with"),
    ("dit", ["--solver", "anderson"], "--solver anderson does nothing with"),
    ("dit", ["--tol", "0.01"], "--tol 0.01 does nothing with"),
    ("dit", ["--no-reuse"], "--no-reuse does nothing with"),
    (
        "fpdm",
        ["--chain-rule", "anderson"],
        "--chain-rule anderson does nothing here: it is for --parallel",
    ),
    ("fpdm", ["--chain-tol", "0.001"], "--chain-tol 0.001 does nothing here: it is for --parallel"),
    ("fpdm", ["--window", "3"], "--window 3 does nothing here: it is for --parallel"),
    ("fpdm", ["--chain-tau", "0.01"], "--chain-tau 0.01 does nothing here: it is for --parallel"),
    ("fpdm", ["--max-batch", "4"], "--max-batch 4 does nothing here: it is for --parallel"),
    ("fpdm", ["--max-evals", "40"], "--max-evals 40 does nothing here: it is for --parallel"),
    ("fpdm", ["--form", "cumulative"], "--form cumulative does nothing here: it is for --parallel"),
    (
        "fpdm",
        ["--parallel", "--schedule", "decreasing"],
        "--schedule decreasing does nothing here: --parallel",
    ),
    ("fpdm", ["--parallel", "--tol", "0.01"], "--tol 0.01 does nothing here: --parallel"),
]


@pytest.mark.parametrize(
    "model, argv, message", UNUSED_SAMPLE, ids=[f"{m} {' '.join(a)}" for m, a, _ in UNUSED_SAMPLE]
)
def test_sample_refuses_options_that_would_do_nothing(checkpoints, model, argv, message, tmp_path, capsys):
    out = tmp_path / "samples"
    base = [str(checkpoints[model]), "--budget", "8", "--num", "2", "--no-progress", "--out", str(out)]
    status, err = exit_status(sample_cli.main, [*base, *argv], capsys)
    assert status == EXIT_USAGE and message in err and err.count("\n") == 1
    assert not out.exists()
    assert sample_cli.main(base) == 0  # the corrected command
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 2


def test_sample_takes_the_options_that_matter(checkpoints, tmp_path):
    for model, argv in (
        ("fpdm", ["--schedule", "tolerance", "--tol", "0.1", "--solver", "anderson"]),
        ("fpdm", ["--parallel", "--chain-tol", "1e-3", "--window", "2", "--solver", "picard"]),
        ("dit", ["--parallel", "--chain-rule", "anderson", "--chain-tau", "1e-2", "--max-batch", "none"]),
    ):
        out = tmp_path / f"{model}-{len(argv)}"
        base = [str(checkpoints[model]), "--budget", "8", "--num", "2", "--no-progress", "--out", str(out)]
        assert sample_cli.main([*base, *argv]) == 0
    summary = json.loads((tmp_path / "fpdm-6" / "summary.json").read_text())
    assert summary["schedule"] == "tolerance" and summary["tol"] == 0.1
