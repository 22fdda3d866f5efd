"""Resume is exact, and killed or interrupted runs leave resumable, intact checkpoints."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from e2e.harness import Trained, last_steps, leftovers, start_fit, wait_for, wait_for_step
from ml_playground.data import GPTDataModule, RandomWindows
from ml_playground.prepare import load_tokens

RESUME_FLAGS = (
    "--model.dropout", "0.1",  # exercises the restored RNG state too
    "--model.lr_decay_steps", "40",
    "--checkpointing.keep.last", "1",
)  # fmt: skip


def train_losses(log_dir: Path) -> dict[int, float]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def apart(trained: Trained, tmp_path: Path, *names: str) -> list[tuple[str, ...]]:
    """Flags for runs on the session's dataset, each with its own checkpoint and log folders."""
    return [trained.fit_flags(tmp_path / name) for name in names]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(tmp_path: Path, trained: Trained, cli, optimizer: str) -> None:
    straight, split = apart(trained, tmp_path, "straight", "split")
    flags = (*RESUME_FLAGS, "--model.optimizer", optimizer)
    cli("fit", *straight, *flags, "--trainer.max_steps", "40", cwd=tmp_path)
    cli("fit", *split, *flags, "--trainer.max_steps", "20", cwd=tmp_path)
    cli("fit", *split, *flags, "--trainer.max_steps", "40", "--ckpt_path", "last",
        cwd=tmp_path)  # fmt: skip
    resumed_from = torch.load(tmp_path / "split" / "ckpt" / "ckpt_last_00000040.pt",
                              map_location="cpu", weights_only=True)  # fmt: skip
    state = resumed_from["optimizer_states"][0]
    buffers = {key for values in state["state"].values() for key in values}
    if optimizer == "muon":  # Muon's momentum buffers travel with AdamW's moments
        assert buffers == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
        assert [g["optimizer"] for g in state["param_groups"]] == ["muon", "adamw", "adamw"]
    else:
        assert buffers == {"step", "exp_avg", "exp_avg_sq"}

    a = weights(tmp_path / "straight" / "ckpt" / "ckpt_last_00000040.pt")
    b = weights(tmp_path / "split" / "ckpt" / "ckpt_last_00000040.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)

    # Steps 21..40 match one for one.
    full = train_losses(tmp_path / "straight" / "logs" / "tiny" / "version_0")
    resumed = train_losses(tmp_path / "split" / "logs" / "tiny" / "version_1")
    assert sorted(resumed) == list(range(21, 41))
    for step in range(21, 41):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


@pytest.mark.cold
@pytest.mark.parametrize("delay", [0.0, 0.37])
def test_sigkill_mid_run_then_resume(tmp_path: Path, make_experiment, cli, delay: float) -> None:
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    ckpt = tmp_path / "ckpt"
    flags = ("--trainer.max_steps", "100000", "--checkpointing.every_n_steps", "2")
    process = start_fit(cli, config, *flags)
    try:
        wait_for_step(ckpt, 6, process)
        time.sleep(delay)  # somewhere between two writes, or in the middle of one
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed_at = max(last_steps(ckpt))
    final = killed_at + 6
    cli(
        "fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps", str(final),
        "--checkpointing.every_n_steps", "2", cwd=tmp_path,
    )  # fmt: skip
    assert leftovers(ckpt) == []
    assert last_steps(ckpt) == [final - 2, final]  # keep.last = 2, every 2 steps
    for path in ckpt.glob("ckpt_*.pt"):
        torch.load(path, map_location="cpu", weights_only=True)  # every file is whole


@pytest.mark.cold
@pytest.mark.parametrize(
    ("sig", "times", "keep_last"),
    [(signal.SIGINT, 1, 2), (signal.SIGINT, 2, 2), (signal.SIGTERM, 1, 2), (signal.SIGINT, 1, 0)],
    ids=["ctrl-c", "ctrl-c-twice", "sigterm", "ctrl-c-keep-last-0"],
)
def test_interrupt_says_what_holds_the_run_and_resumes(
    tmp_path: Path, trained: Trained, cli, sig: signal.Signals, times: int, keep_last: int
) -> None:
    """The signal goes to the fit process itself. It ends with the documented code and one
    line naming the checkpoint of the current step (or, with keep.last 0, the best one)."""
    ckpt = tmp_path / "ckpt"
    run = (*trained.fit_flags(tmp_path)[2:], "--trainer.val_check_interval", "3",
           "--checkpointing.keep.last", str(keep_last),
           "--checkpointing.every_n_steps", "100000")  # fmt: skip
    process = start_fit(cli, trained.config, *run, "--trainer.max_steps", "100000", cwd=tmp_path)
    try:
        wait_for(lambda: any(ckpt.glob("ckpt_best_*.pt")), process)
        time.sleep(0.5)
        for _ in range(times):
            process.send_signal(sig)
            time.sleep(0.05)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == (143 if sig == signal.SIGTERM else 130), stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, stderr
    how = "stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted (Ctrl-C)"
    step = int(re.match(rf"ml-playground: {re.escape(how)} at step (\d+); ", lines[0]).group(1))
    assert step > 3 and leftovers(ckpt) == []
    best = sorted(ckpt.glob("ckpt_best_*.pt"))
    assert len(best) == 1  # the best checkpoint survived
    if keep_last == 0:
        assert last_steps(ckpt) == [] and "--ckpt_path last" not in lines[0]
        assert f"{best[0]}: resume from it with --ckpt_path best" in lines[0]
        return
    assert last_steps(ckpt)[-1] == step
    last = ckpt / f"ckpt_last_{step:08d}.pt"
    assert f"{last} holds step {step}; resume with --ckpt_path last" in lines[0]
    cli("fit", "--config", trained.config, *run, "--ckpt_path", "last",
        "--trainer.max_steps", str(step + 2), cwd=tmp_path)  # fmt: skip
    assert last_steps(ckpt)[-1] == step + 2


SIX_VAL_BATCHES = ("--data.val_batches", "6")  # Lightning checks SIGTERM after each one


@pytest.fixture(scope="module")
def uninterrupted(trained: Trained, cli, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The checkpoint files of the session's run, with six validation batches."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    cli("fit", *trained.fit_flags(folder), *SIX_VAL_BATCHES, cwd=folder)
    return sorted(p.name for p in (folder / "ckpt").glob("ckpt_*.pt"))


@pytest.mark.cold
@pytest.mark.parametrize("moment", ["validation", "before_validation"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_at_a_validation_loses_nothing(
    tmp_path: Path, trained: Trained, cli, uninterrupted: list[str], sig: str, moment: str
) -> None:
    """Ctrl-C or SIGTERM while step 20's validation runs, or after step 20 is trained and before
    its validation starts: the run stops after that validation and its checkpoints, so the
    resumed run ends with the files of the uninterrupted run (the session's `trained`), the
    best file's name and score included. A callback added by flag, as a user adds one, sends
    the signal at that moment (tests/e2e/interrupt_callback.py)."""
    ckpt = tmp_path / "ckpt"
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    at = ("--trainer.callbacks+=interrupt_callback.SignalAt", "--trainer.callbacks.step=20",
          f"--trainer.callbacks.signal_name={sig}", f"--trainer.callbacks.moment={moment}")  # fmt: skip
    stopped = cli("fit", *trained.fit_flags(tmp_path), *at, *SIX_VAL_BATCHES,
                  "--trainer.max_steps", "30", env=env, cwd=tmp_path, check=False)  # fmt: skip
    assert stopped.returncode == (143 if sig == "SIGTERM" else 130), stopped.stderr
    assert "at step 20;" in stopped.stderr and "Traceback" not in stopped.stderr
    cli("fit", *trained.fit_flags(tmp_path), *SIX_VAL_BATCHES, "--ckpt_path", "last", cwd=tmp_path)
    assert sorted(p.name for p in ckpt.glob("ckpt_*.pt")) == uninterrupted


def test_sample_from_a_nanogpt_checkpoint(tmp_path: Path, make_experiment, cli) -> None:
    """nanoGPT's ckpt.pt (keys model, optimizer, model_args, iter_num, best_val_loss, config)."""
    from ml_playground.model.gpt import GPT, GPTConfig
    from ml_playground.prepare import read_meta

    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    meta = read_meta(tmp_path / "data" / "meta.pkl")
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=False,
                vocab_size=meta["vocab_size"], dropout=0.0)  # fmt: skip
    model = GPT(GPTConfig(**args))
    optimizer = torch.optim.AdamW(model.parameters())
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # saved compiled
    nanogpt = {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "model_args": args,
        "iter_num": 100,
        "best_val_loss": torch.tensor(1.5),
        "config": {"dataset": "tiny", "batch_size": 4},
    }
    path = tmp_path / "out" / "ckpt.pt"
    path.parent.mkdir()
    torch.save(nanogpt, path)
    result = cli("sample", "--config", config, "--sample.ckpt", path, cwd=tmp_path)
    assert result.stdout.count("-" * 40) == 2
    assert re.search(r"the ", result.stdout)
    # fit cannot resume it, and says so in one line.
    bad = cli("fit", "--config", config, "--ckpt_path", path, cwd=tmp_path, check=False)
    assert bad.returncode == 1
    assert "nanoGPT checkpoint" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_training_matches_eager_and_checkpoints_alike(
    tmp_path: Path, make_experiment, cli, scope: str
) -> None:
    """torch.compile (on this CPU) trains like eager mode, its checkpoints carry the eager
    parameter names (no `_orig_mod.`), and a compiled run resumes from them."""
    eager = make_experiment(tmp_path / "eager")
    compiled = make_experiment(tmp_path / "compiled")
    for config in (eager, compiled):
        cli("prepare", "--config", config, cwd=config.parent)
    cli("fit", "--config", eager, "--trainer.max_steps", "10", cwd=tmp_path)
    flags = ("--model.compile", "true", "--model.compile_scope", scope)
    cli("fit", "--config", compiled, *flags, "--trainer.max_steps", "10", cwd=tmp_path)

    a = weights(eager.parent / "ckpt" / "ckpt_last_00000010.pt")
    b = weights(compiled.parent / "ckpt" / "ckpt_last_00000010.pt")
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)
    losses_a = train_losses(eager.parent / "logs" / "tiny" / "version_0")
    losses_b = train_losses(compiled.parent / "logs" / "tiny" / "version_0")
    for step in losses_a:
        assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-3), step

    if scope == "blocks":  # resuming compiles again: once is enough for the suite's time
        cli("fit", "--config", compiled, *flags, "--ckpt_path", "last", cwd=tmp_path)
        assert (compiled.parent / "ckpt" / "ckpt_last_00000020.pt").is_file()


EMA = ("--model.ema_decay", "0.9", "--checkpointing.every_n_steps", "5")


def test_ema_checkpoints_keep_raw_weights_and_resume_exactly(
    tmp_path: Path, trained: Trained, cli
) -> None:
    """With EMA, every `last` holds the averaged weights as state_dict and the raw ones as
    current_model_state, the final one too (max_steps 7 is not a multiple of every_n_steps 5),
    and resuming goes on from the raw weights exactly."""
    straight, split = apart(trained, tmp_path, "straight", "split")
    cli("fit", *straight, *EMA, "--trainer.max_steps", "10", cwd=tmp_path)
    cli("fit", *split, *EMA, "--trainer.max_steps", "7", cwd=tmp_path)
    final = torch.load(tmp_path / "split" / "ckpt" / "ckpt_last_00000007.pt", weights_only=True)
    raw, averaged = final["current_model_state"], final["state_dict"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)
    cli("fit", *split, *EMA, "--trainer.max_steps", "10", "--ckpt_path", "last", cwd=tmp_path)

    a = torch.load(tmp_path / "straight" / "ckpt" / "ckpt_last_00000010.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt" / "ckpt_last_00000010.pt", weights_only=True)
    for part in ("current_model_state", "state_dict"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=1e-6, msg=key)


def test_ema_checkpoint_resumed_without_ema_goes_on_from_the_raw_weights(
    tmp_path: Path, trained: Trained, cli
) -> None:
    """EMA does not change the raw weights' path: resumed with EMA off, training must follow
    the same raw weights as a resume with EMA on (not restart from the average)."""
    with_ema, without = apart(trained, tmp_path, "with_ema", "without")
    for flags in (with_ema, without):
        cli("fit", *flags, *EMA, "--trainer.max_steps", "5", cwd=tmp_path)
    resume = ("--trainer.max_steps", "8", "--ckpt_path", "last")
    cli("fit", *with_ema, *EMA, *resume, cwd=tmp_path)
    cli("fit", *without, "--checkpointing.every_n_steps", "5", *resume, cwd=tmp_path)
    a = torch.load(tmp_path / "with_ema" / "ckpt" / "ckpt_last_00000008.pt", weights_only=True)
    b = weights(tmp_path / "without" / "ckpt" / "ckpt_last_00000008.pt")
    for key in b:
        torch.testing.assert_close(b[key], a["current_model_state"][key], rtol=0, atol=1e-6)


def test_resume_with_another_accumulation_neither_replays_nor_skips_data(
    tmp_path: Path, make_experiment, cli, batch_trace
) -> None:
    """4 steps x 2 micro-batches draw batches 0-7; resumed with accumulation 1, steps 5 and 6
    must train on batches 8 and 9 (not 4 and 5 again), and the next checkpoint says 10."""
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    trace = tmp_path / "trace"
    flags, env = batch_trace(trace)
    every = ("--checkpointing.every_n_steps", "2", "--trainer.val_check_interval", "20", *flags)
    cli("fit", "--config", config, *every, "--trainer.accumulate_grad_batches", "2",
        "--trainer.max_steps", "4", cwd=tmp_path, env=env)  # fmt: skip
    cli("fit", "--config", config, *every, "--trainer.max_steps", "6", "--ckpt_path", "last",
        cwd=tmp_path, env=env)  # fmt: skip
    sums = [int(line.split()[1]) for line in (trace / "batches-rank0.txt").read_text().splitlines()]
    assert len(sums) == 10

    stream = GPTDataModule(
        dataset_dir=tmp_path / "data",
        batch_size=4,
        block_size=16,
        val_batches=2,
        seed=7,
        num_workers=0,
        pin_memory=False,
    )  # the tiny experiment's settings
    windows = RandomWindows(tmp_path / "data" / "train.bin", stream.dtype, 4, 16, 7, 0)
    tokens = load_tokens(tmp_path / "data" / "train.bin", stream.dtype)
    assert sums == [int(windows.batch(k, tokens)[0].sum()) for k in range(10)]
    state = torch.load(tmp_path / "ckpt" / "ckpt_last_00000006.pt", weights_only=True)
    assert state["GPTDataModule"]["batches_drawn"] == 10


def test_resume_from_an_older_step_starts_a_branch_and_last_follows_it(
    tmp_path: Path, trained: Trained, cli
) -> None:
    """fit to 20, resume from step 15 (the later files move aside), then `--ckpt_path last`
    continues the new branch; every file of the branch left behind is still on disk."""
    ckpt = tmp_path / "ckpt"
    run = (*trained.fit_flags(tmp_path), "--trainer.val_check_interval", "5",
           "--checkpointing.keep.best", "2")  # fmt: skip
    cli("fit", *run, "--trainer.max_steps", "20", cwd=tmp_path)
    first = {p.name: p.read_bytes() for p in ckpt.glob("ckpt_*.pt")}
    assert last_steps(ckpt) == [15, 20]
    later = sorted(name for name in first if int(name.split("_")[2][:8]) > 15)

    branch = cli("fit", *run, "--ckpt_path", str(ckpt / "ckpt_last_00000015.pt"),
                 "--trainer.max_steps", "25", cwd=tmp_path)  # fmt: skip
    aside = ckpt / "branch_after_00000015"
    assert f"moved to {aside}" in branch.stderr
    assert sorted(p.name for p in aside.iterdir()) == sorted([*later, "ckpt_last_00000015.pt"])
    for name in [*later, "ckpt_last_00000015.pt"]:
        assert (aside / name).read_bytes() == first[name]  # the abandoned branch, untouched
    assert last_steps(ckpt) == [20, 25]
    assert torch.load(ckpt / "ckpt_last_00000020.pt", weights_only=True)["global_step"] == 20
    for line in branch.stdout.splitlines():  # every path the report names exists
        for word in line.split():
            if word.startswith(str(ckpt)):
                assert Path(word).is_file(), line

    cli("fit", *run, "--ckpt_path", "last", "--trainer.max_steps", "30", cwd=tmp_path)
    assert last_steps(ckpt) == [25, 30]  # the new branch went on
    state = torch.load(ckpt / "ckpt_last_00000030.pt", weights_only=True)["callbacks"]
    for path in state["GPTCheckpoint"]["best_k_models"]:
        assert Path(path).parent == ckpt and Path(path).is_file()
    assert sorted(p.name for p in aside.iterdir()) == sorted([*later, "ckpt_last_00000015.pt"])
