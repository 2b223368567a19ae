"""train.py: exact resume, atomic checkpoints, a clear stop on NaN, and two-process DDP (gloo)."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fpdm.diffusion import GaussianDiffusion
from fpdm.training import (
    CHECKPOINT_NAME,
    LOG_NAME,
    NonFiniteLossError,
    TrainConfig,
    ema_multi_avg_fn,
    load_checkpoint,
    parse_args,
    train,
)

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "fpdm"
REPO = EXAMPLE_DIR.parents[1]

TINY = ["--hidden-size", "32", "--num-heads", "2", "--batch-size", "16", "--lr", "3e-3", "--no-progress"]


def tiny_config(out: Path, **changes) -> TrainConfig:
    cfg = parse_args(["--out", str(out), *TINY, "--steps", "6", "--ckpt-every", "3", "--log-every", "1"])
    return replace(cfg, **changes)


def flat_state(state: dict) -> dict:
    """Every tensor of a (nested) state dict, by path."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        else:
            out[prefix] = value

    walk("", state)
    return out


def assert_states_equal(a: dict, b: dict) -> None:
    fa, fb = flat_state(a), flat_state(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        if isinstance(fa[key], torch.Tensor):
            assert torch.equal(fa[key], fb[key]), key
        else:
            assert fa[key] == fb[key], key


@pytest.mark.parametrize("ema_warmup", [False, True])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, ema_warmup):
    # S-JFB (the default) draws its iteration counts from its own generator: that must resume too, and so
    # must the EMA's warm-up schedule (it follows the averaged model's saved update count).
    train(tiny_config(tmp_path / "straight", ema_warmup=ema_warmup))
    train(tiny_config(tmp_path / "split", steps=3, ema_warmup=ema_warmup))
    first_half = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert first_half["step"] == 3
    train(tiny_config(tmp_path / "split", resume=True, ema_warmup=ema_warmup))

    straight = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    resumed = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert straight["step"] == resumed["step"] == 6
    assert not torch.equal(first_half["model"]["injection.weight"], straight["model"]["injection.weight"])
    for part in ("model", "ema", "optimizer", "rng", "estimator"):
        assert_states_equal(straight[part], resumed[part])
    logs = [(tmp_path / run / LOG_NAME).read_text().splitlines() for run in ("straight", "split")]
    losses = [[json.loads(line)["loss"] for line in log] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 6


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from fpdm import training as train

    real_save = torch.save
    saves = []

    def save_then_die(obj, handle, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint: write part of it, then die like kill -9
            handle.write(b"PK\\x03\\x04 partial checkpoint")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, handle, *args, **kwargs)

    train.torch.save = save_then_die
    train.main(sys.argv[1:])
    """
)


def test_a_run_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    args = ["--out", str(out), *TINY, "--steps", "4", "--ckpt-every", "2", "--grad", "jfb"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLE_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, timeout=120, env=env)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert list(out.glob(f".{CHECKPOINT_NAME}.*.tmp"))  # the partial write
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["step"] == 2
    # Resuming finishes the run from step 2.
    summary = train(replace(parse_args(args), resume=True))
    assert summary["step"] == 4 and load_checkpoint(out / CHECKPOINT_NAME)["step"] == 4


def test_nan_loss_stops_training_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    cfg = tiny_config(tmp_path / "run", grad="jfb", steps=4, ckpt_every=2)
    real_loss = GaussianDiffusion.training_loss
    calls = []

    def loss_that_goes_nan(self, *args, **kwargs):
        calls.append(1)
        loss, state = real_loss(self, *args, **kwargs)  # train.py asks for the model's state
        return (loss * float("nan") if len(calls) == 3 else loss), state

    monkeypatch.setattr(GaussianDiffusion, "training_loss", loss_that_goes_nan)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 3") as error:
        train(cfg)
    assert "last good checkpoint" in str(error.value) and "(step 2)" in str(error.value)
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert ckpt["step"] == 2
    # Tensors only: the implicit layer's extra state (its estimator's generator) is a dict.
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if isinstance(v, torch.Tensor))
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / LOG_NAME).read_text().splitlines()] == [
        1,
        2,
    ]


def test_command_line_exits_with_status_1_and_the_message_on_nan(tmp_path, capsys, monkeypatch):
    from fpdm import training as train_module

    monkeypatch.setattr(
        GaussianDiffusion, "training_loss", lambda self, *a, **k: (torch.tensor(float("inf")), None)
    )
    status = train_module.main(["--out", str(tmp_path / "run"), *TINY, "--steps", "2", "--grad", "jfb"])
    assert status == 1
    assert "non-finite training loss (inf) at step 1" in capsys.readouterr().err


@pytest.mark.parametrize("attempt", range(3))
def test_two_process_torchrun_exits_cleanly_with_identical_parameters_on_every_rank(tmp_path, attempt):
    # Run three times: a process that exits with its process group (or DDP's reducer) alive hangs or aborts
    # in some runs only. Each must end, well within the timeout, with status 0.
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(EXAMPLE_DIR / "train.py"), "--out", str(out), *TINY, "--steps", "3", "--log-every", "1",
           "--ckpt-every", "3", "--seed", str(attempt)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    # Each rank leaves the process group before it exits: no abort from the collective library's threads.
    assert b"terminate called" not in proc.stderr and b"SIGABRT" not in proc.stderr, proc.stderr.decode()[
        -3000:
    ]
    records = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    final = records[-1]
    assert final["world_size"] == 2 and final["rank_param_max_abs_diff"] == 0.0
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2
    # The ranks drew different noise (their data shards and RNG streams differ) ...
    assert not torch.equal(ckpt["rng"][0]["noise"], ckpt["rng"][1]["noise"])
    # ... and training moved the weights away from the zero-initialised final layer.
    assert ckpt["model"]["final_layer.linear.weight"].abs().max() > 0


def test_ema_warmup_follows_min_decay_and_1_plus_n_over_10_plus_n():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.75, warmup=True))
    expected = [p.detach().double().clone() for p in model.parameters()]
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        if n == 0:  # the first update copies the weights
            expected = [p.detach().double().clone() for p in model.parameters()]
            continue
        # n updates were averaged before this one; from n = 26 on the fixed decay applies.
        decay = min(0.75, (1 + n) / (10 + n))
        expected = [
            decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, model.parameters())
        ]
    for e, p in zip(expected, ema.module.parameters(), strict=True):
        torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-6)


def test_ema_options_are_checked_and_parsed():
    for bad in (1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="ema_decay"):
            ema_multi_avg_fn(bad)
    assert parse_args(["--ema-warmup"]).ema_warmup is True
    assert parse_args([]).ema_warmup is False


def test_compile_flag_compiles_the_blocks_and_trains_like_eager(tmp_path, monkeypatch):
    from fpdm import training as train_module

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = train_module.compile_blocks
    monkeypatch.setattr(train_module, "compile_blocks", lambda model: real(model, backend=counting_backend))
    torch._dynamo.reset()
    try:
        train(tiny_config(tmp_path / "compiled", steps=3, ckpt_every=3, compile=True))
    finally:
        torch._dynamo.reset()
    train(tiny_config(tmp_path / "eager", steps=3, ckpt_every=3))
    assert graphs, "--compile compiled nothing"
    logs = [
        [json.loads(line) for line in (tmp_path / name / LOG_NAME).read_text().splitlines()]
        for name in ("compiled", "eager")
    ]
    # The same losses and counts, step by step; the log carries the estimator's evaluations.
    for compiled, eager in zip(*logs, strict=True):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
        assert compiled["block_evals"] == eager["block_evals"] == 2 + compiled["nfe"] + compiled["grad_evals"]
    assert len({(r["nfe"], r["grad_evals"]) for r in logs[0]}) > 1  # S-JFB draws vary from step to step
    # The checkpoint of a compiled run has the eager model's keys: an eager run resumes it.
    compiled_ckpt = load_checkpoint(tmp_path / "compiled" / CHECKPOINT_NAME)
    assert (
        compiled_ckpt["model"].keys() == load_checkpoint(tmp_path / "eager" / CHECKPOINT_NAME)["model"].keys()
    )
    summary = train(tiny_config(tmp_path / "compiled", steps=4, ckpt_every=4, resume=True))
    assert summary["step"] == 4
