"""`fit` and `validate` around the classes LightningCLI built: the project's callbacks, logger
and checkpoint I/O, the resume checks, the folder lock, and what a run leaves behind."""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from ml_playground.checkpoint_files import (
    check_compatible,
    find_checkpoint,
    load_checkpoint,
    managed_files,
)
from ml_playground.checkpointing import AtomicCheckpointIO, GPTCheckpoint
from ml_playground.configuration.schema import ExperimentConfig
from ml_playground.data import GPTDataModule
from ml_playground.errors import CheckpointError, ConfigError
from ml_playground.files import write_atomic
from ml_playground.model.module import GPTLightningModule
from ml_playground.monitoring import HparamsSummary, ProgressBar, StepAlignedLogger, TextSample

CONFIG_FILENAME = "config.toml"
LOCK_FILENAME = "fit.lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class SaveResolvedConfig(SaveConfigCallback):
    """Writes the resolved experiment (TOML that `--config` reads back) into the run's log
    folder; LightningCLI adds it to every Trainer it builds and calls this on rank 0."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        checkpoint = next(c for c in trainer.callbacks if isinstance(c, GPTCheckpoint))  # type: ignore[attr-defined]
        # Rank 0 only: trainer.log_dir would wait in a collective for the other ranks.
        log_dir = getattr(trainer.logger, "log_dir", None)
        if not log_dir:
            return
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / CONFIG_FILENAME, checkpoint.extras.config_toml)


class ReportValidation(pl.Callback):
    """One line per validation, as nanoGPT prints them, kept in the terminal's history."""

    def __init__(self) -> None:
        self._since: tuple[int, float] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = (trainer.global_step, time.perf_counter())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._since is None:
            return
        metrics = trainer.callback_metrics
        parts = [f"step {trainer.global_step}:"]
        parts += [
            f"{name} {float(metrics[name]):.4f}"
            for name in ("train/loss", "val/loss")
            if name in metrics
        ]
        step0, t0 = self._since
        if trainer.global_step > step0:
            ms = 1000 * (time.perf_counter() - t0) / (trainer.global_step - step0)
            parts.append(f"({ms:.1f} ms/step)")
        bar = trainer.progress_bar_callback
        line = " ".join(parts)
        if bar is not None and hasattr(bar, "print"):
            bar.print(line)
        else:
            print(line, flush=True)
        self._since = (trainer.global_step, time.perf_counter())


class PlaygroundTrainer(pl.Trainer):
    """Lightning's Trainer. LightningCLI takes each command's options and help from the Trainer
    method of that name; `prepare`, `sample` and `loop` are carried out by the CLI
    (`cli.PlaygroundCLI`), which has the configuration they need."""

    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | Path | None = None,
        weights_only: bool | None = None,
    ) -> None:
        """Train a GPT; resume with --ckpt_path.

        Args:
            ckpt_path: checkpoint to resume from: last, best or a checkpoint file
        """
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)

    train = fit

    def validate(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | Path | None = None,
        verbose: bool = True,
        datamodule: pl.LightningDataModule | None = None,
        weights_only: bool | None = None,
    ) -> Any:
        """Evaluate a checkpoint on the fixed validation windows.

        Args:
            ckpt_path: the checkpoint to evaluate: best (the default), last or a checkpoint file
        """
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def prepare_command(self, force: bool = False) -> None:
        """Download or read the corpus and write train.bin, val.bin and meta.pkl.

        Args:
            force: prepare again even if the artifacts exist
        """
        raise NotImplementedError("run `ml-playground prepare`")

    def sample_command(self) -> None:
        """Generate text from the checkpoint named by sample.ckpt."""
        raise NotImplementedError("run `ml-playground sample`")

    def loop_command(self, ckpt_path: str | None = None, force: bool = False) -> None:
        """Prepare (skipped when done), fit, then sample.

        Args:
            ckpt_path: checkpoint to resume from: last, best or a file
            force: prepare again even if the artifacts exist
        """
        raise NotImplementedError("run `ml-playground loop`")

    # jsonargparse names a method's group after its __name__: "prepare" and "sample" would
    # collide with the [prepare] and [sample] sections.
    prepare, sample, loop = prepare_command, sample_command, loop_command


@dataclass
class RunResult:
    """What a `fit` or `validate` run leaves behind, for the closing report."""

    log_dir: Path | None
    tensorboard_dir: Path | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_score: float | None
    metric: str
    metrics: dict[str, float]
    is_global_zero: bool
    stopped_early: bool = False


def _quiet_lightning() -> None:
    # Hints aimed at Lightning developers, not at our users (e.g. about num_workers on CPU).
    for name in (
        "pytorch.utilities.rank_zero",
        "pytorch.accelerators.cuda",
        "fabric.utilities.seed",
    ):
        logging.getLogger(f"lightning.{name}").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings(
        "ignore", message=r".*Checkpoint directory .* exists and is not empty.*"
    )
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
    if ckpt_path is None:
        existing = managed_files(dirpath, "last") + managed_files(dirpath, "best")
        if existing:
            raise ConfigError(
                f"{dirpath} already holds checkpoints of an earlier run ({existing[-1].name}); "
                "resume it with --ckpt_path last, or start afresh with another "
                "experiment name / checkpointing.dirpath, or delete that folder"
            )
        return None
    return find_checkpoint(dirpath, ckpt_path)


def check_resume(path: Path, module: GPTLightningModule, datamodule: GPTDataModule) -> None:
    """The checkpoint fits this model and dataset, checked before any work."""
    check_compatible(path, load_checkpoint(path), module.model_args, datamodule.vocab_size)


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
    callbacks: list[pl.Callback] = [
        ReportValidation(),
        TextSample(datamodule.meta),
        HparamsSummary(cfg.model_dump(mode="json"), ckpt.metric),
    ]
    if ckpt.patience > 0:
        callbacks.append(
            EarlyStopping(monitor=ckpt.metric, mode=ckpt.mode, patience=ckpt.patience, strict=True)
        )
    if cfg.model.ema_decay > 0:
        # Lightning's EMA: validation runs on the averaged weights and checkpoints store them
        # as the state_dict (the raw weights under current_model_state, for resuming).
        callbacks.insert(0, EMAWeightAveraging(decay=cfg.model.ema_decay))
    if progress_bar:
        callbacks.append(ProgressBar(refresh_rate=10))
    return callbacks


def project_plugins() -> list[Any]:
    return [AtomicCheckpointIO()]


def prepare_runtime() -> None:
    """Process-wide settings before the classes are built."""
    _quiet_lightning()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32 parts on Ampere+


class FolderLock:
    """`fit.lock` in the checkpoint folder: one `fit` at a time writes there.

    Created atomically (O_CREAT | O_EXCL) holding `pid host`, removed when the run ends. A lock
    whose process is gone (a killed run) on this host is stale and is taken over.
    """

    def __init__(self, dirpath: Path) -> None:
        self.dir = Path(dirpath)
        self.path = self.dir / LOCK_FILENAME
        self.held = False

    def acquire(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._not_writable(exc) from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._clear_if_stale():
                    raise self._busy() from None
                continue
            except OSError as exc:
                raise self._not_writable(exc) from None
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return
        raise self._busy()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> tuple[int | None, str]:
        try:
            pid, _, host = self.path.read_text(encoding="utf-8").strip().partition(" ")
            return int(pid), host
        except (OSError, ValueError):
            return None, ""

    def _clear_if_stale(self) -> bool:
        pid, host = self._holder()
        if pid is None:
            try:  # being written right now, or garbage left behind
                young = time.time() - self.path.stat().st_mtime < 10
            except FileNotFoundError:
                return True
            if young:
                return False
        elif host != socket.gethostname() or _process_alive(pid):
            return False
        self.path.unlink(missing_ok=True)
        return True

    def _busy(self) -> CheckpointError:
        pid, host = self._holder()
        who = f"process {pid} on {host}" if pid is not None else "another process"
        return CheckpointError(
            f"{self.dir} is in use by another fit ({who} holds {self.path}); wait for it to "
            "finish or use another checkpointing.dirpath; if no fit is running there, delete "
            f"{self.path}"
        )

    def _not_writable(self, exc: OSError) -> CheckpointError:
        return CheckpointError(
            f"checkpointing.dirpath {self.dir} is not writable ({exc.strerror or exc}); "
            "fix its permissions or choose another folder"
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process not yet reaped by its parent is dead too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


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
    procs = [p for p in getattr(trainer.strategy.launcher, "procs", None) or [] if p.poll() is None]
    if not procs:
        return
    grace = 30.0 if type(exc).__name__ == "SIGTERMException" else 0.0
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
) -> RunResult:
    """Train (or resume training) with the classes LightningCLI built; `lock` is released."""
    if is_launching_process() and not lock.held:
        lock.acquire()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except BaseException as exc:
        stop_started_ranks(trainer, exc)
        raise
    finally:
        lock.release()
    return _result(trainer, cfg)


def validate(
    trainer: pl.Trainer, module: GPTLightningModule, datamodule: GPTDataModule,
    cfg: ExperimentConfig, path: Path,
) -> RunResult:  # fmt: skip
    """Evaluate a checkpoint on the fixed validation windows."""
    try:
        trainer.validate(module, datamodule=datamodule, ckpt_path=path, weights_only=True)
    except BaseException as exc:
        stop_started_ranks(trainer, exc)
        raise
    return _result(trainer, cfg)


def _result(trainer: pl.Trainer, cfg: ExperimentConfig) -> RunResult:
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, GPTCheckpoint))  # type: ignore[attr-defined]
    score = checkpoint.best_model_score
    boards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    log_dir = trainer.log_dir if trainer.logger is not None else None
    return RunResult(
        log_dir=Path(log_dir) if log_dir else None,
        tensorboard_dir=Path(boards[0].log_dir).parent if boards else None,
        last_checkpoint=Path(checkpoint.last_model_path) if checkpoint.last_model_path else None,
        best_checkpoint=Path(checkpoint.best_model_path) if checkpoint.best_model_path else None,
        best_score=None if score is None else float(score),
        metric=cfg.checkpointing.metric,
        metrics={k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        is_global_zero=trainer.is_global_zero,
        stopped_early=any(
            isinstance(cb, EarlyStopping) and cb.wait_count >= cb.patience
            for cb in trainer.callbacks  # type: ignore[attr-defined]
        ),
    )


def end_distributed() -> None:
    """Close a DDP process group while Python can still join its threads: left to interpreter
    shutdown, gloo's threads abort the process ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
