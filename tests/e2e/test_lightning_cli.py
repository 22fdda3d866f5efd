"""What LightningCLI users expect of `ml-playground`: extra callbacks and loggers by flag or TOML,
beside the project's own, and a checkpoint that never overrides the configuration."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import pytest

from e2e.harness import BEST_RE, LAST_RE, QUIET, scalars
from ml_playground.module import WarmupCosine


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, make_experiment, cli) -> Path:
    folder = tmp_path_factory.mktemp("lightning_cli").resolve()
    cli("prepare", "--config", make_experiment(folder), cwd=folder)
    return folder


def run_flags(prepared: Path, folder: Path) -> list[str]:
    """The prepared data, with checkpoints and logs in `folder`."""
    return [
        "--config", str(prepared / "exp.toml"), "--data.dataset_dir", str(prepared / "data"),
        "--checkpointing.dirpath", str(folder / "ckpt"), "--log_dir", str(folder / "logs"), *QUIET,
    ]  # fmt: skip


def test_extra_callback_by_flag_runs_beside_the_project_callbacks(prepared: Path, cli) -> None:
    folder = prepared / "lr_monitor"
    flags = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10"]
    callback = ["--trainer.callbacks+=LearningRateMonitor"]
    cli("fit", *run_flags(prepared, folder), *flags, *callback, cwd=prepared)
    logged = scalars(folder / "logs" / "tiny" / "version_0")
    # LearningRateMonitor's scalars (one per parameter group) ...
    monitored = sorted(tag for tag in logged if tag.startswith("lr-AdamW"))
    assert monitored == ["lr-AdamW/pg1", "lr-AdamW/pg2"], sorted(logged)  # decay / no decay
    assert logged["lr-AdamW/pg1"] == logged["lr-AdamW/pg2"]  # one schedule for both groups
    ours = dict(logged["lr"])
    common = [(step, value) for step, value in logged["lr-AdamW/pg1"] if step in ours]
    assert common, (logged["lr-AdamW/pg1"], logged["lr"])
    for step, value in common:  # the same schedule as our own `lr` scalar
        assert value == pytest.approx(ours[step], rel=1e-6), step
    for tag in ("lr", "train/loss", "val/loss"):  # ... next to ours
        assert logged.get(tag), (tag, sorted(logged))
    # Checkpoints are still named and rotated by GPTCheckpoint (keep.last 2, keep.best 1).
    names = sorted(p.name for p in (folder / "ckpt").iterdir())
    assert [n for n in names if LAST_RE.fullmatch(n)] == [
        "ckpt_last_00000015.pt",
        "ckpt_last_00000020.pt",
    ]
    assert len([n for n in names if BEST_RE.fullmatch(n)]) == 1
    config = tomllib.loads((folder / "logs" / "tiny" / "version_0" / "config.toml").read_text())
    callbacks = config["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == [
        "lightning.pytorch.callbacks.LearningRateMonitor"
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_csv_logger_by_flag_and_callbacks_and_logger_in_toml(prepared: Path, cli) -> None:
    steps = ["--trainer.max_steps", "10", "--trainer.val_check_interval", "5"]
    by_flag = prepared / "csv_flag"
    logger = ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(by_flag / "csv")]
    result = cli("fit", *run_flags(prepared, by_flag), *steps, *logger, cwd=prepared)
    rows = read_csv(by_flag / "csv" / "lightning_logs" / "version_0" / "metrics.csv")
    assert [row["val/loss"] for row in rows if row.get("val/loss")], rows
    assert not (by_flag / "logs").exists()  # instead of TensorBoard
    assert "tensorboard --logdir" not in result.stdout
    # The resolved config goes with the logs of the logger in use.
    assert (by_flag / "csv" / "lightning_logs" / "version_0" / "config.toml").is_file()

    in_toml = prepared / "csv_toml"
    extra = in_toml / "loggers.toml"
    in_toml.mkdir()
    extra.write_text(
        "[[trainer.logger]]\n"
        'class_path = "CSVLogger"\n'
        'init_args = { save_dir = "csv" }\n'
        "[[trainer.logger]]\n"
        'class_path = "ml_playground.tensorboard_logging.StepAlignedLogger"\n'
        'init_args = { save_dir = "tb", name = "tiny" }\n'
        "[[trainer.callbacks]]\n"
        'class_path = "LearningRateMonitor"\n',
        encoding="utf-8",
    )
    cli("fit", *run_flags(prepared, in_toml), "--config", extra, *steps, cwd=in_toml)
    rows = read_csv(in_toml / "csv" / "lightning_logs" / "version_0" / "metrics.csv")
    assert [row["val/loss"] for row in rows if row.get("val/loss")], rows
    assert any(v for row in rows for k, v in row.items() if k.startswith("lr-AdamW")), rows
    # Beside TensorBoard, when both are listed.
    assert scalars(in_toml / "tb" / "tiny" / "version_0").get("val/loss")


def test_checkpoint_file_never_overrides_the_flags(prepared: Path, cli) -> None:
    """LightningCLI would re-apply a checkpoint's hyperparameters for `--ckpt_path FILE`, and
    Lightning would restore its learning rate: the flag's value must win."""
    folder = prepared / "lr_flag"
    flags = [*run_flags(prepared, folder), "--trainer.val_check_interval", "5"]
    cli("fit", *flags, "--trainer.max_steps", "10", cwd=prepared)
    older = folder / "ckpt" / "ckpt_last_00000010.pt"
    resumed = [
        "--ckpt_path", str(older), "--trainer.max_steps", "14",
        "--model.learning_rate", "5e-3", "--model.min_lr", "1e-4",
    ]  # fmt: skip
    cli("fit", *flags, *resumed, cwd=prepared)
    run = folder / "logs" / "tiny" / "version_1"
    config = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    assert config["model"]["learning_rate"] == 5e-3
    # The tiny experiment: warmup 2, decay until step 20; `lr` is logged before step k's
    # update at k (StepAlignedLogger), from the schedule at k - 1 optimizer steps done.
    schedule = WarmupCosine(2, 20, 5e-3, 1e-4)
    logged = dict(scalars(run)["lr"])
    assert sorted(logged) == [11, 12, 13, 14], logged
    for step, value in logged.items():
        assert value == pytest.approx(5e-3 * schedule(step - 1), rel=1e-5), (step, logged)
