"""`fit` and `validate` around the classes LightningCLI built: the project's callbacks, logger
and checkpoint I/O, the resume checks; the folder lock is in `locking.py`, what a run reports
in `console.py`."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ml_playground import console
from ml_playground.checkpoint_reading import (
    check_compatible,
    checkpoint_step,
    file_step,
    find_checkpoint,
    load_checkpoint,
    managed_files,
)
from ml_playground.checkpoint_writing import AtomicCheckpointIO
from ml_playground.configuration.schema import ExperimentConfig
from ml_playground.data import GPTDataModule
from ml_playground.errors import CheckpointError, ConfigError
from ml_playground.evaluation import HellaSwag
from ml_playground.files import fsync_dir, write_atomic
from ml_playground.hardware import cheap_cuda_probe_without_gpus
from ml_playground.interrupts import StopBetweenSteps
from ml_playground.locking import FolderLock
from ml_playground.module import GPTLightningModule
from ml_playground.optimizers import group_names
from ml_playground.random_state import RandomState
from ml_playground.tensorboard_logging import HparamsSummary, StepAlignedLogger, TextSample
from ml_playground.weights_guard import FiniteWeights

CONFIG_FILENAME = "config.toml"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class SaveResolvedConfig(SaveConfigCallback):
    """Writes the resolved experiment (TOML that `--config` reads back) into the run's log
    folder; LightningCLI adds it to every Trainer it builds and calls this on rank 0."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Rank 0 only: trainer.log_dir would wait in a collective for the other ranks.
        log_dir = getattr(trainer.logger, "log_dir", None)
        if not log_dir:
            return
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(
            folder / CONFIG_FILENAME, cast(GPTLightningModule, pl_module).extras.config_toml
        )


def _quiet_lightning() -> None:
    # Hints aimed at Lightning developers, not at our users (e.g. about num_workers on CPU).
    for name in (
        "pytorch.utilities.rank_zero",
        "pytorch.trainer.connectors.signal_connector",  # "Received SIGTERM": we say it once
        "pytorch.accelerators.cuda",
        "fabric.utilities.seed",
    ):
        logging.getLogger(f"lightning.{name}").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)`.*")
    # val/loss is already averaged over ranks with all_gather before it is logged.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed.*")
    warnings.filterwarnings("ignore", message=r".*functional.all_gather is deprecated.*")
    # We override configure_model only to compile; nothing is sharded.
    warnings.filterwarnings(
        "ignore", message=r".*WeightAveraging callback with a model that overrides.*"
    )


def resolve_resume(cfg: ExperimentConfig, ckpt_path: str | None) -> Path | None:
    """`last` / `best` / a file for `fit`; without one, a check that this is a fresh run."""
    dirpath = cfg.checkpointing.dirpath
    if ckpt_path is None and not cfg.dry_run:
        existing = managed_files(dirpath, "last") + managed_files(dirpath, "best")
        if any(file_step(path) > 0 for path in existing):  # step 0 alone: nothing trained yet
            which = "last" if managed_files(dirpath, "last") else "best"
            raise ConfigError(
                f"{dirpath} already holds checkpoints of an earlier run ({existing[-1].name}); "
                f"resume it with --ckpt_path {which}, or start afresh with another "
                "experiment name / checkpointing.dirpath, or delete that folder"
            )
        return None
    return None if ckpt_path is None else find_checkpoint(dirpath, ckpt_path)


def set_aside_later_steps(dirpath: Path, resume: Path) -> Path | None:
    """Resuming from step N (not the newest `last`) while the folder holds later steps starts
    a new branch: the later `last` / `best` files (the branch left behind) move to
    `dirpath/branch_after_N/`, with a hard link to the file resumed from, so `last` and the
    keep windows follow the new branch and nothing is lost. Returns that folder.

    From the newest `last` the run goes on along the same line: a best written just before a
    kill stays, in the callback's best window (GPTCheckpoint.on_train_start)."""
    lasts = managed_files(dirpath, "last")
    if lasts and lasts[-1].resolve() == resume.resolve():
        return None
    step = checkpoint_step(resume)
    later = [
        path
        for kind in ("last", "best")
        for path in managed_files(dirpath, kind)
        if file_step(path) > step
    ]
    if not later:
        return None
    aside = dirpath / f"branch_after_{step:08d}"
    for n in range(2, 1000):
        if not aside.exists():
            break
        aside = dirpath / f"branch_after_{step:08d}_{n}"
    aside.mkdir()
    for path in later:
        path.rename(aside / path.name)
    if resume.parent.resolve() == dirpath.resolve():  # the branch point, for that branch too
        os.link(resume, aside / resume.name)
    fsync_dir(dirpath)
    print(
        f"note: resuming from step {step} starts a new branch; the {len(later)} checkpoint(s) "
        f"of later steps were moved to {aside}",
        file=sys.stderr,
    )
    return aside


MONITORED = ("val/loss", "val/ppl", "train/loss")  # what GPTLightningModule logs to rank by


def refuse_before_work(trainer: pl.Trainer, cfg: ExperimentConfig) -> None:
    """Settings Lightning or torch would trip over only once training runs, refused before
    anything is written (Lightning checks the others when the Trainer is built)."""
    for key in ("val_check_interval", "accumulate_grad_batches", "log_every_n_steps"):
        value = getattr(trainer, key)  # a fraction of an endless epoch: Lightning refuses it
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"trainer.{key} = {value}: it must be at least 1")
    for key in ("max_steps", "limit_train_batches"):
        if getattr(trainer, key) == 0:
            raise ConfigError(
                f"fit would train nothing: trainer.{key} is 0; set it to the number of "
                "steps (batches) to train"
            )
    metric = cfg.checkpointing.metric
    if metric not in MONITORED:
        raise ConfigError(
            f"checkpointing.metric = {metric!r} is never logged; choose one of "
            f"{', '.join(MONITORED)}"
        )
    every, logged = trainer.val_check_interval, getattr(trainer, "log_every_n_steps", 50)
    if metric == "train/loss" and isinstance(every, int) and every % logged:
        raise ConfigError(
            f"checkpointing.metric = 'train/loss' is logged every {logged} steps "
            f"(trainer.log_every_n_steps) but validation runs every {every}: make "
            "trainer.val_check_interval a multiple of it, or rank by val/loss"
        )


@contextmanager
def refused_trainer_values() -> Iterator[None]:
    """Lightning's verdict on the [trainer] values while it builds the Trainer, as one line."""
    try:
        yield
    except (MisconfigurationException, ValueError, TypeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"Lightning refused the [trainer] settings: {text}; fix them in the config or on "
            "the command line (`ml-playground fit --help` lists them)"
        ) from None


def check_resume(path: Path, module: GPTLightningModule, datamodule: GPTDataModule) -> None:
    """The checkpoint fits this model and dataset, checked before any work."""
    checkpoint = load_checkpoint(path, mmap=True)  # Lightning reads it again to resume
    check_compatible(path, checkpoint, module.model_args, datamodule.vocab_size, datamodule.meta)
    wanted = module.config.optimizer
    for state in checkpoint.get("optimizer_states", []):
        trained = "muon" if "muon" in group_names(state) else "adamw"
        if trained != wanted:
            raise CheckpointError(
                f'{path}: trained with model.optimizer = "{trained}", but this config sets '
                f'"{wanted}": resume with "{trained}", or start a new run from its weights with '
                f"model.init_from = {str(path)!r}"
            )


def default_logger(cfg: ExperimentConfig) -> Logger:
    """TensorBoard under log_dir/<experiment>/version_N, steps as in checkpoint names."""
    return StepAlignedLogger(
        save_dir=str(cfg.log_dir), name=cfg.experiment, default_hp_metric=False
    )


def project_callbacks(
    cfg: ExperimentConfig, datamodule: GPTDataModule, progress_bar: bool
) -> list[pl.Callback]:
    """The callbacks every run has, beside the checkpoint policy and the user's own."""
    ckpt = cfg.checkpointing
    report = console.ReportValidation()
    callbacks: list[pl.Callback] = [
        StopBetweenSteps(),
        RandomState(),
        FiniteWeights(),
        report,
        TextSample(datamodule.meta),
        HparamsSummary(cfg.model_dump(mode="json"), ckpt.metric),
    ]
    if cfg.evaluate.every_n_steps > 0:
        callbacks.append(HellaSwag(cfg.evaluate, datamodule.meta, report.add_scores))
    if ckpt.patience > 0:
        callbacks.append(
            EarlyStopping(monitor=ckpt.metric, mode=ckpt.mode, patience=ckpt.patience, strict=True)
        )
    if cfg.model.ema_decay > 0:
        # Lightning's EMA: validation runs on the averaged weights and checkpoints store them
        # as the state_dict (the raw weights under current_model_state, for resuming).
        callbacks.insert(0, EMAWeightAveraging(decay=cfg.model.ema_decay))
    if progress_bar:
        callbacks.append(console.ProgressBar(refresh_rate=10))
    return callbacks


def project_plugins() -> list[Any]:
    return [AtomicCheckpointIO()]


def prepare_runtime() -> None:
    """Process-wide settings before the classes are built."""
    _quiet_lightning()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32 parts on Ampere+


def is_launching_process() -> bool:
    """Rank 0 before any launcher: the one process that writes (and locks) the folder."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def stop_started_ranks(trainer: pl.Trainer, exc: BaseException) -> None:
    """After the launching process failed, end the ranks it started itself.

    Lightning stops them when one of *them* fails, or on Ctrl-C, but not when the launching
    process fails alone (a checkpoint write on rank 0, say): they would wait in their next
    collective for a peer that is gone, under NCCL until the process-group timeout. Only rank 0
    writes, so they have nothing to save; after SIGTERM they get a moment to finish their part
    of the interrupt checkpoint first.
    """
    started = getattr(trainer.strategy.launcher, "procs", None)
    if not isinstance(started, list):
        return
    procs = [p for p in started if p.poll() is None]
    # Lightning's child-process observer watches this same list and, seeing a rank that ended
    # with an error, SIGKILLs this process too (exit -9 instead of our line and code 1): the
    # ranks ended here are ended on purpose, so they leave its watch first.
    started.clear()
    if not procs:
        return
    grace = 30.0 if isinstance(exc, SIGTERMException) else 0.0
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # still running: TimeoutExpired
            proc.kill()
            proc.wait()


def fit(
    trainer: pl.Trainer,
    module: GPTLightningModule,
    datamodule: GPTDataModule,
    cfg: ExperimentConfig,
    resume: Path | None,
    lock: FolderLock,
) -> console.RunResult:
    """Train (or resume training) with the classes LightningCLI built; `lock` is released."""
    try:
        refuse_before_work(trainer, cfg)
        if resume is None:  # before the lock creates the folder: a broken source leaves none
            module.load_init_from()
        if is_launching_process() and not lock.held and not cfg.dry_run:
            lock.acquire()
        if resume is not None and is_launching_process() and not cfg.dry_run:
            set_aside_later_steps(cfg.checkpointing.dirpath, resume)
        cheap_cuda_probe_without_gpus()
        # What exists now (modules, the parser, the model) lives through training: kept out of
        # the collector's sight, it is not scanned by the full collection that the first few
        # hundred steps trigger (~160 ms on a CPU). Unfrozen when fit returns.
        gc.freeze()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except BaseException as exc:
        # Ctrl-C: Lightning saves through the callbacks, then calls sys.exit(1); SIGTERM: its
        # SIGTERMException (a SystemExit too). Further signals are ignored from here to exit.
        stop_started_ranks(trainer, exc)
        sigterm = isinstance(exc, SIGTERMException)
        ctrl_c = isinstance(exc, KeyboardInterrupt) or (
            type(exc) is SystemExit and trainer.interrupted
        )
        if sigterm or ctrl_c:
            for number in (signal.SIGINT, signal.SIGTERM):
                signal.signal(number, signal.SIG_IGN)
            raise console.interrupted(trainer, sigterm) from None
        raise
    finally:
        gc.unfreeze()
        lock.release()
    return console.run_result(trainer, cfg)


def validate(
    trainer: pl.Trainer, module: GPTLightningModule, datamodule: GPTDataModule,
    cfg: ExperimentConfig, path: Path,
) -> console.RunResult:  # fmt: skip
    """Evaluate a checkpoint on the fixed validation windows."""
    try:
        trainer.validate(module, datamodule=datamodule, ckpt_path=path, weights_only=True)
    except BaseException as exc:
        stop_started_ranks(trainer, exc)
        raise
    return console.run_result(trainer, cfg)


def end_distributed() -> None:
    """Close a DDP process group while Python can still join its threads: left to interpreter
    shutdown, gloo's threads abort the process ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
