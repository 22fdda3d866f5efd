"""Settings Lightning or torch would trip over late, refused by `ml-playground fit` before any
work: one line, the documented exit code, nothing written (issue "Failures a real user
meets", class 3). In-process through `cli.main`; tests/e2e/test_reliability.py runs some of
the same rows through the console script."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_playground import cli
from ml_playground.configuration.loading import load_experiment_toml
from ml_playground.prepare import run_prepare

CASES = {
    "gpu_without_one": (["--trainer.accelerator", "gpu"], "No supported gpu backend"),
    "unknown_strategy": (["--trainer.strategy", "nonsense"], "strategy='nonsense'"),
    "zero_devices": (["--trainer.devices", "0"], "devices='0'"),
    "negative_devices": (["--trainer.devices", "-3"], "devices"),
    "fractional_devices": (["--trainer.devices", "1.5"], "devices"),
    "zero_nodes": (["--trainer.num_nodes", "0"], "num_nodes"),
    "zero_val_check_interval": (["--trainer.val_check_interval", "0"], "val_check_interval = 0"),
    "fractional_val_check": (["--trainer.val_check_interval", "0.5"], "val_check_interval"),
    "zero_accumulation": (["--trainer.accumulate_grad_batches", "0"], "accumulate_grad_batches"),
    "metric_never_logged": (["--checkpointing.metric", "val/acc"], "'val/acc' is never logged"),
    "metric_never_logged_with_patience": (
        ["--checkpointing.metric", "val/acc", "--checkpointing.patience", "2"],
        "'val/acc' is never logged",
    ),
    "train_loss_between_log_steps": (
        ["--checkpointing.metric", "train/loss", "--trainer.log_every_n_steps", "3"],
        "trainer.log_every_n_steps",
    ),
    "seed_too_large": (["--seed_everything", "99999999999"], "seed_everything"),
    "negative_seed": (["--seed_everything", "-1"], "seed_everything"),
    "sample_seed_negative": (["--sample.seed", "-1"], "sample.seed"),
    "infinite_learning_rate": (["--model.learning_rate", "inf"], "model.learning_rate"),
    "nan_dropout": (["--model.dropout", "nan"], "model.dropout"),
    "max_steps_zero": (["--trainer.max_steps", "0"], "fit would train nothing: trainer.max_steps"),
    "no_train_batches": (["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches"),
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, make_experiment) -> Path:
    folder = tmp_path_factory.mktemp("refusals")
    config = make_experiment(folder)
    cfg = load_experiment_toml(config)
    run_prepare(cfg.prepare, cfg.data.dataset_dir, seed=cfg.seed_everything)
    return config


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_before_any_work(
    name: str, experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, named = CASES[name]
    run = tmp_path / "run"
    code = cli.main(["fit", "--config", str(experiment), *flags,
                     "--checkpointing.dirpath", str(run / "ckpt"), "--log_dir", str(run / "logs")])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ml-playground: error: "), err
    assert named in lines[0], err
    assert not run.exists()  # nothing written: a corrected rerun starts clean
