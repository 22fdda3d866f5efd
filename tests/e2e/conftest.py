"""The session's trained run, shared by the end-to-end modules (see harness.py)."""

from __future__ import annotations

import pytest

from e2e.harness import QUIET, Trained, snapshot


@pytest.fixture(scope="session")
def trained(tmp_path_factory, make_experiment, cli) -> Trained:
    folder = tmp_path_factory.mktemp("trained").resolve()
    config = make_experiment(folder)
    prepare = cli("prepare", "--config", config, cwd=folder)
    issue = "--trainer.max_steps 20 --trainer.val_check_interval 10 --checkpointing.keep.last 2"
    fit = cli("fit", "--config", config, *issue.split(), *QUIET, cwd=folder)
    return Trained(folder, config, prepare, fit, snapshot(folder))
