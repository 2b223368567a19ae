"""Every command line of the example, given wrong inputs: one clear line, exit status 2, nothing damaged."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from fpdm import demo
from fpdm import evaluation as evaluate
from fpdm import generation as sample_cli
from fpdm import latents as extract_latents
from fpdm import sweeping as sweep
from fpdm import training as train
from fpdm.cli import UsageError
from fpdm.data import load_dataset
from fpdm.diffusion import GaussianDiffusion
from fpdm.files import FileKindError, load_tensors
from fpdm.models import create_model
from fpdm.sampling import sample
from fpdm.training import CHECKPOINT_NAME, LOG_NAME, TrainConfig, load_checkpoint

TINY = ["--hidden-size", "16", "--num-heads", "2", "--batch-size", "16", "--no-progress", "--log-every", "1"]


def exit_status(main, argv, capsys):
    """Run a command line; its exit status and what it printed on stderr."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-step training run."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert train.main(["--out", str(out), *TINY, "--steps", "2", "--grad", "jfb"]) == 0
    return out


BAD_TRAIN = [
    (["--batch-size", "0"], "--batch-size: must be an int >= 1, got 0"),
    (["--ckpt-every", "0"], "--ckpt-every: must be an int >= 1"),
    (["--log-every", "-1"], "--log-every: must be an int >= 1"),
    (["--steps", "-3"], "--steps: must be an int >= 1, got -3"),
    (["--steps", "2.5"], "--steps: must be an int >= 1, got '2.5'"),
    (["--max-iter", "0"], "--max-iter"),
    (["--hidden-size", "0"], "--hidden-size"),
    (["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
    (["--tol", "inf"], "--tol: must be a finite number > 0, got inf"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--ema-decay", "1.5"], "--ema-decay: must be a finite number >= 0 and <= 1"),
    (["--class-dropout", "1"], "--class-dropout: must be a finite number >= 0 and < 1"),
    (["--weight-decay", "-inf"], "--weight-decay"),
    (["--phantom-tau", "0"], "--phantom-tau"),
    (["--sjfb-no-grad", "-1", "2"], "--sjfb-no-grad"),
    (["--sjfb-grad", "3", "1"], "sjfb_grad must be (MIN, MAX) with MIN <= MAX"),
    (["--solver", "newton"], "--solver: invalid choice: 'newton'"),
    (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
]


@pytest.mark.parametrize("argv, message", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_train_refuses_bad_values_with_one_line_and_status_2(argv, message, tmp_path, capsys):
    status, err = exit_status(train.main, ["--out", str(tmp_path / "run"), *TINY, *argv], capsys)
    assert status == 2 and message in err
    assert not (tmp_path / "run").exists()


def test_train_config_from_python_is_checked_with_the_same_rules():
    for changes, field in [
        ({"batch_size": 0}, "batch_size"),
        ({"lr": float("nan")}, "lr"),
        ({"steps": True}, "steps"),
    ]:
        with pytest.raises(ValueError, match=field):
            train.train(TrainConfig(**changes))


def test_config_checks_accept_numpy_numbers_and_refuse_bools():
    cfg = TrainConfig(
        out=Path("runs/x"), batch_size=np.int64(16), lr=np.float32(0.5), sjfb_grad=[1, np.int8(2)]
    )
    cfg.check()
    # Stored as plain Python values: the config saves and loads with weights_only=True.
    assert (type(cfg.out), type(cfg.batch_size), type(cfg.lr), cfg.sjfb_grad) == (str, int, float, (1, 2))
    assert all(type(v) is int for v in cfg.sjfb_grad)
    for changes in ({"batch_size": np.bool_(True)}, {"lr": False}, {"steps": 2.0}, {"tol": "1e-3"}):
        with pytest.raises(ValueError, match=next(iter(changes))):
            TrainConfig(**changes).check()


def test_the_sampler_refuses_non_finite_and_negative_options():
    torch.manual_seed(0)
    fpdm = create_model("FPDM-Digits/2", hidden_size=16, num_heads=2).eval()
    nan, inf = float("nan"), float("inf")
    for bad in ({"eta": -0.1}, {"eta": nan}, {"guidance": inf}, {"tol": nan}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sample(fpdm, GaussianDiffusion(), torch.arange(2), budget=8, **bad)


def test_a_run_folder_is_not_touched_without_resume_or_overwrite(run_dir, capsys):
    before = {name: (run_dir / name).read_bytes() for name in (CHECKPOINT_NAME, LOG_NAME)}
    status, err = exit_status(
        train.main, ["--out", str(run_dir), *TINY, "--steps", "3", "--grad", "jfb"], capsys
    )
    assert status == 2
    assert f"{run_dir} already holds a run (checkpoint.pt, log.jsonl); pass --resume" in err
    assert before == {name: (run_dir / name).read_bytes() for name in before}


def test_overwrite_starts_the_run_again(run_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    (out / LOG_NAME).write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert train.main(["--out", str(out), *TINY, "--steps", "1", "--grad", "jfb", "--overwrite"]) == 0
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 1
    assert [json.loads(line)["step"] for line in (out / LOG_NAME).read_text().splitlines()] == [1]


@pytest.mark.parametrize(
    "change, named",
    [
        (["--hidden-size", "32"], "--hidden-size 16 -> 32"),
        (["--num-heads", "4"], "--num-heads 2 -> 4"),
        (["--model", "DiT-Digits/2"], "--model 'FPDM-Digits/2' -> 'DiT-Digits/2'"),
        (["--grad", "sjfb"], "--grad 'jfb' -> 'sjfb'"),
        (["--seed", "1", "--hidden-size", "32"], "--hidden-size 16 -> 32; --seed 0 -> 1"),
    ],
)
def test_resume_refuses_another_model_and_names_each_field(run_dir, change, named, capsys):
    before = (run_dir / CHECKPOINT_NAME).read_bytes()
    # A DiT has no estimator: --grad jfb with it would be refused as doing nothing, before the resume rules.
    grad = [] if "--model" in change else ["--grad", "jfb"]
    argv = ["--out", str(run_dir), *TINY, "--steps", "3", *grad, "--resume", *change]
    status, err = exit_status(train.main, argv, capsys)
    assert status == 2 and named in err and err.count("\n") == 1  # one line, no size-mismatch listing
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == before


def test_resume_applies_a_new_learning_rate_with_a_notice(run_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    argv = ["--out", str(out), *TINY, "--steps", "3", "--grad", "jfb", "--resume", "--lr", "5e-4"]
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "--lr 0.001 -> 0.0005" in err and "--steps 2 -> 3" in err
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["step"] == 3 and ckpt["config"]["lr"] == 5e-4
    assert all(group["lr"] == 5e-4 for group in ckpt["optimizer"]["param_groups"])


def test_a_damaged_log_does_not_stop_a_resume(run_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    with open(out / LOG_NAME, "a") as log:
        log.write('{"step": 2, "loss": 0.\x00\x00 cut\nnot json at all\n{"step": 3, "lo')
    argv = ["--out", str(out), *TINY, "--steps", "3", "--grad", "jfb", "--resume"]
    assert train.main(argv) == 0
    assert "skipped 3 damaged line(s)" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (out / LOG_NAME).read_text().splitlines()] == [1, 2, 3]


def write_pickled_code(path: Path) -> None:
    torch.save({"model": Fraction(1, 2), "config": {}, "step": 1}, path)  # a class weights_only refuses


@pytest.mark.parametrize("kind", ["text", "truncated", "pickled code", "a list"])
def test_a_file_that_is_not_a_checkpoint_gets_one_line_naming_it(run_dir, tmp_path, kind, capsys):
    path = tmp_path / "checkpoint.pt"
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "truncated":
        path.write_bytes((run_dir / CHECKPOINT_NAME).read_bytes()[:2000])
    elif kind == "pickled code":
        write_pickled_code(path)
    else:
        torch.save([1, 2], path)
    status, err = exit_status(
        sample_cli.main, [str(path), "--budget", "8", "--out", str(tmp_path / "s")], capsys
    )
    assert status == 2 and err.count("\n") == 1
    assert str(path) in err and "expected a checkpoint written by train.py" in err
    assert "weights_only" not in err


def test_files_load_refuses_pickled_code_without_suggesting_to_run_it(tmp_path):
    path = tmp_path / "x.pt"
    write_pickled_code(path)
    with pytest.raises(FileKindError, match="pickled objects other than tensors") as error:
        load_tensors(path, "a test file")
    assert "weights_only" not in str(error.value)
    with pytest.raises(FileKindError, match="no such file"):
        load_tensors(tmp_path / "missing.pt", "a test file")


def latents_payload(labels):
    return {
        "latents": torch.randn(len(labels), 4, 4, 4),
        "labels": torch.tensor(labels),
        "num_classes": torch.tensor(3),
    }


@pytest.mark.parametrize(
    "content, message",
    [
        ("text", "not a torch.save file"),
        (latents_payload([0, 1, 3]), "labels range over 0..3, outside the 3 classes"),
        (latents_payload([-1, 1, 2]), "labels range over -1..2"),
        ({"latents": torch.randn(2, 4, 4, 4), "labels": torch.tensor([0, 1])}, "has no 'num_classes'"),
    ],
    ids=["text", "label-too-large", "label-negative", "missing-key"],
)
def test_a_bad_old_latents_file_is_one_line_when_converted(tmp_path, content, message, capsys):
    path = tmp_path / "latents.pt"
    path.write_text(content) if isinstance(content, str) else torch.save(content, path)
    status, err = exit_status(
        extract_latents.main, ["--convert", str(path), "--out", str(tmp_path / "out")], capsys
    )
    assert status == 2 and message in err and err.count("\n") == 1
    assert str(path) in err and not (tmp_path / "out").exists()


def test_non_finite_latents_are_refused_with_status_1_and_nothing_of_them_is_written(tmp_path, capsys):
    path = tmp_path / "latents.pt"
    torch.save({**latents_payload([0, 1, 2, 0]), "latents": torch.full((4, 4, 4, 4), float("nan"))}, path)
    argv = ["--convert", str(path), "--out", str(tmp_path / "out"), "--no-progress"]
    status, err = exit_status(extract_latents.main, argv, capsys)
    (line,) = [line for line in err.splitlines() if "error:" in line]  # after the notice that it started
    assert status == 1 and "non-finite latents in rows 0..3" in line and err.endswith(line + "\n")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bad_data_specs_are_usage_errors(tmp_path, capsys):
    for spec, message in (("mnist", "unknown dataset"), (f"folder:{tmp_path / 'none'}", "does not exist")):
        status, err = exit_status(train.main, ["--out", str(tmp_path / "run"), *TINY, "--data", spec], capsys)
        assert status == 2 and message in err and f"--data {spec!r}" in err
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")


BAD_SAMPLE = [
    (["--budget", "0"], "--budget: must be an int >= 1, got 0"),
    (["--num", "0"], "--num"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--eta", "-0.5"], "--eta: must be a finite number >= 0"),
    (["--eta", "nan"], "--eta"),
    (["--guidance", "inf"], "--guidance: must be a finite number"),
    (["--tol", "0"], "--tol"),
    (["--nrow", "0"], "--nrow"),
    (["--pixels", "-4"], "--pixels"),
    (["--threads", "0"], "--threads"),
    (["--labels", "-1"], "--labels"),
    (["--solver", "newton"], "invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD_SAMPLE, ids=[" ".join(a) for a, _ in BAD_SAMPLE])
def test_sample_refuses_bad_values(run_dir, tmp_path, argv, message, capsys):
    base = [str(run_dir / CHECKPOINT_NAME), "--budget", "8", "--out", str(tmp_path / "s"), "--no-progress"]
    status, err = exit_status(sample_cli.main, [*base, *argv], capsys)
    assert status == 2 and message in err


def test_sample_checks_labels_steps_and_its_output_folder(run_dir, tmp_path, capsys):
    base = [str(run_dir / CHECKPOINT_NAME), "--out", str(tmp_path / "s"), "--num", "2", "--no-progress"]
    status, err = exit_status(sample_cli.main, [*base, "--budget", "8", "--labels", "3", "12"], capsys)
    assert status == 2 and "--labels [12]: the model has classes 0..9" in err
    status, err = exit_status(sample_cli.main, [*base, "--budget", "5000", "--steps", "2000"], capsys)
    assert status == 2 and "steps (2000) exceeds the diffusion's 1000 timesteps" in err
    status, err = exit_status(sample_cli.main, [*base, "--budget", "3", "--steps", "2"], capsys)
    assert status == 2 and "budget 3 is too small for 2 timesteps" in err
    assert not (tmp_path / "s").exists()
    assert sample_cli.main([*base, "--budget", "8"]) == 0
    status, err = exit_status(sample_cli.main, [*base, "--budget", "8"], capsys)
    assert status == 2 and "already holds samples" in err and "--overwrite" in err
    assert sample_cli.main([*base, "--budget", "8", "--overwrite"]) == 0


def test_a_budget_beyond_every_timestep_is_spent_on_iterations_not_refused():
    diffusion = GaussianDiffusion(num_timesteps=20)
    torch.manual_seed(0)
    fpdm = create_model("FPDM-Digits/2", hidden_size=16, num_heads=2).eval()
    # Smoothing would pick 200 // (2 + 2) = 50 timesteps; the diffusion has 20: 8 iterations each.
    result = sample(fpdm, diffusion, torch.arange(2), budget=200)
    assert len(result.timesteps) == 20 and result.iterations == [8] * 20 and result.unspent == 0
    dit = create_model("DiT-Digits/2", hidden_size=16, num_heads=2, depth=2).eval()
    result = sample(dit, diffusion, torch.arange(2), budget=100)
    assert len(result.timesteps) == 20 and result.spent_total == 40 and result.unspent == 60


@pytest.mark.parametrize(
    "main, argv, message",
    [
        (demo.main, ["--train-steps", "0"], "--train-steps"),
        (demo.main, ["--budget", "-1"], "--budget"),
        (demo.main, ["--ema-decay", "nan"], "--ema-decay"),
        (sweep.main, ["--budgets", "10", "0"], "--budgets"),
        (sweep.main, ["--seeds", "0"], "--seeds"),
        (sweep.main, ["--lr", "-1"], "--lr"),
        (sweep.main, ["--sjfb-grad", "3", "1"], "--sjfb-grad must be MIN MAX with MIN <= MAX"),
        (evaluate.main, ["--samples", "x.npz", "--kid-subsets", "0"], "--kid-subsets"),
        (evaluate.main, ["--samples", "x.npz", "--kid-subset-size", "1"], "--kid-subset-size"),
        (extract_latents.main, ["--data", "folder:x", "--out", "y", "--batch-size", "0"], "--batch-size"),
        (extract_latents.main, ["--data", "folder:x", "--out", "y", "--image-size", "0"], "--image-size"),
        (extract_latents.main, ["--data", "folder:x", "--out", "y", "--workers", "-1"], "--workers"),
        (
            extract_latents.main,
            ["--data", "folder:x", "--out", "y", "--commit-every", "nan"],
            "--commit-every",
        ),
    ],
)
def test_the_other_command_lines_refuse_bad_counts(main, argv, message, capsys):
    status, err = exit_status(main, argv, capsys)
    assert status == 2 and message in err


@pytest.mark.parametrize("content", ["text", "no-images"])
def test_evaluate_names_a_samples_file_of_the_wrong_kind(tmp_path, content, capsys):
    path = tmp_path / "samples.npz"
    path.write_text("hello") if content == "text" else np.savez(path, pictures=np.zeros((2, 1, 8, 8)))
    status, err = exit_status(evaluate.main, ["--samples", str(path)], capsys)
    assert status == 2 and str(path) in err and "expected an .npz file from sample.py" in err
    assert err.count("\n") == 1


def test_extract_latents_does_not_overwrite_without_asking(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "latents"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"format": "fpdm-latents/1", "count": 1}))
    (tmp_path / "images" / "c").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "c" / "0.png")
    argv = [
        "--data",
        f"folder:{tmp_path / 'images'}",
        "--out",
        str(out),
        "--random-tiny-vae",
        "--image-size",
        "8",
    ]
    status, err = exit_status(extract_latents.main, argv, capsys)
    assert status == 2 and err.count("\n") == 1 and "latents of another job" in err and "--overwrite" in err
    assert json.loads((out / "meta.json").read_text())["count"] == 1


def test_usage_errors_are_value_errors_for_python_callers():
    assert issubclass(UsageError, ValueError) and issubclass(FileKindError, ValueError)
