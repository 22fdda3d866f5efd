"""Checkpoint names, lookup, safe loading, compatibility checks, atomic writes and rotation.

The rotation tests drive a real (tiny) `fit` in-process through the command line's
`PlaygroundCLI`, with the tiny experiment file and dotted flags.
"""

from __future__ import annotations

import gc
import inspect
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ml_playground.checkpoint_reading import (
    FORMAT_VERSION,
    SECTION,
    check_compatible,
    find_checkpoint,
    load_checkpoint,
)
from ml_playground.checkpoint_writing import GPTCheckpoint
from ml_playground.cli import PlaygroundCLI
from ml_playground.console import RunResult
from ml_playground.errors import CheckpointError
from ml_playground.hardware import NVML_CHECK

MAX_STEPS = 11
EVERY_N_STEPS = 4  # last at 0, 4, 8 and (end of training) 11
VAL_CHECK_INTERVAL = 3  # validations (best candidates) at 3, 6, 9
LAST_RE = re.compile(r"ckpt_last_(\d{8})\.pt")
BEST_RE = re.compile(r"ckpt_best_(\d{8})_val_loss=(\d+\.\d{4})\.pt")


def last_name(step: int) -> str:
    return f"ckpt_last_{step:08d}.pt"


def best_name(step: int, value: float) -> str:
    return f"ckpt_best_{step:08d}_val_loss={value:.4f}.pt"


def names(folder: Path, kind: str) -> list[str]:
    """The `last` or `best` checkpoints in `folder`, oldest step first (names sort by step)."""
    pattern = LAST_RE if kind == "last" else BEST_RE
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if pattern.fullmatch(p.name))


# --------------------------------------------------------------------------- fixtures


@dataclass
class Prepared:
    folder: Path
    config: Path

    def load(self, run_dir: Path, **overrides: object) -> list[str]:
        """The tiny experiment, writing into `run_dir`, with dotted overrides (a__b = a.b)."""
        flags = {
            "checkpointing.dirpath": str(run_dir / "ckpt"),
            "log_dir": str(run_dir / "logs"),
            "trainer.max_steps": MAX_STEPS,
            "trainer.val_check_interval": VAL_CHECK_INTERVAL,
            "trainer.enable_model_summary": False,
            "checkpointing.every_n_steps": EVERY_N_STEPS,
        }
        flags.update({key.replace("__", "."): value for key, value in overrides.items()})
        return ["--config", str(self.config)] + [
            f"--{key}={_flag_text(value)}" for key, value in flags.items()
        ]


def fit(argv: list[str], ckpt_path: str | None = None) -> RunResult:
    """`ml-playground fit ARGV [--ckpt_path ...]`, in this process."""
    resume = ["--ckpt_path", ckpt_path] if ckpt_path else []
    cli = PlaygroundCLI(["fit", *argv, *resume], env_vars=())
    assert cli.result is not None
    return cli.result


def _flag_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@pytest.fixture(scope="module")
def prepared(prepared_experiment: Path) -> Prepared:
    return Prepared(prepared_experiment.parent, prepared_experiment)


@dataclass
class Reference:
    """A run that keeps every checkpoint: what was written, in order."""

    ckpt: Path
    last: list[str]
    best: list[str]


@pytest.fixture(scope="module")
def reference(prepared: Prepared, tmp_path_factory) -> Reference:
    run_dir = tmp_path_factory.mktemp("reference")
    fit(prepared.load(run_dir, checkpointing__keep__last=100, checkpointing__keep__best=100))
    ckpt = run_dir / "ckpt"
    return Reference(ckpt, names(ckpt, "last"), names(ckpt, "best"))


# --------------------------------------------------------------------------- names and lookup


def test_find_checkpoint_picks_highest_step(tmp_path: Path) -> None:
    for name in (
        last_name(9),
        last_name(100),
        last_name(10),
        best_name(5, 2.0),
        best_name(40, 1.5),
        best_name(7, 1.9),
        "ckpt_last_latest.pt",  # not one of ours
        "ckpt_last_999999999.pt",
        "notes.txt",
    ):
        (tmp_path / name).write_bytes(b"")
    assert find_checkpoint(tmp_path, "last") == tmp_path / last_name(100)
    assert find_checkpoint(tmp_path, "best") == tmp_path / best_name(40, 1.5)
    given = tmp_path / last_name(9)
    assert find_checkpoint(tmp_path, str(given)) == given


def test_find_checkpoint_errors_name_the_folder(tmp_path: Path) -> None:
    for which in ("last", "best"):
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path))):
            find_checkpoint(tmp_path, which)
    with pytest.raises(CheckpointError, match="not found"):
        find_checkpoint(tmp_path, str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError):
        find_checkpoint(tmp_path / "no_such_folder", "last")


# --------------------------------------------------------------------------- loading


def test_real_checkpoint_loads(reference: Reference) -> None:
    path = reference.ckpt / reference.last[-1]
    checkpoint = load_checkpoint(path)
    assert checkpoint["global_step"] == MAX_STEPS
    section = checkpoint[SECTION]
    assert section["format_version"] == FORMAT_VERSION
    assert section["model_args"]["n_layer"] == 1
    assert section["meta"]["vocab_size"] == section["model_args"]["vocab_size"]
    assert "[model]" in section["config_toml"]
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]


def test_last_checkpoint_carries_the_best_score_of_its_step(reference: Reference) -> None:
    """A best file of step N is written before the last file of step N, so resuming from
    that last file knows the best score reached at step N."""
    checkpoint = load_checkpoint(reference.ckpt / reference.last[-1])
    state = checkpoint["callbacks"]["GPTCheckpoint"]
    best_value = float(BEST_RE.fullmatch(reference.best[-1]).group(2))
    assert float(state["best_model_score"]) == pytest.approx(best_value, abs=5e-5)
    assert Path(state["best_model_path"]).name == reference.best[-1]
    assert [Path(p).name for p in state["last_k_models"]] == reference.last  # keep.last 100


def test_truncated_checkpoint_is_a_checkpoint_error(reference: Reference, tmp_path: Path) -> None:
    data = (reference.ckpt / reference.last[-1]).read_bytes()
    path = tmp_path / last_name(MAX_STEPS)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_random_bytes_are_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint\n", encoding="utf-8")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)


def test_foreign_torch_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 3}, path)
    with pytest.raises(CheckpointError, match=SECTION):
        load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not an ml-playground checkpoint"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(reference: Reference, tmp_path: Path) -> None:
    checkpoint = torch.load(reference.ckpt / reference.last[-1], weights_only=True)
    checkpoint[SECTION]["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_check_compatible(reference: Reference) -> None:
    path = reference.ckpt / reference.last[-1]
    checkpoint = load_checkpoint(path)
    args = dict(checkpoint[SECTION]["model_args"])
    vocab = args["vocab_size"]
    check_compatible(path, checkpoint, args)  # the same shape: fine
    with pytest.raises(CheckpointError, match="n_layer"):
        check_compatible(path, checkpoint, {**args, "n_layer": 2})
    with pytest.raises(CheckpointError, match="n_embd"):
        check_compatible(path, checkpoint, {**args, "n_embd": 32})
    with pytest.raises(CheckpointError, match=r"vocabulary of \d+ tokens.*dataset"):
        check_compatible(path, checkpoint, {**args, "vocab_size": vocab + 1}, vocab + 1)
    # Same dataset, another padding: the message names model.vocab_multiple_of.
    with pytest.raises(CheckpointError, match=r"model\.vocab_multiple_of"):
        check_compatible(path, checkpoint, {**args, "vocab_size": 64}, vocab)


# --------------------------------------------------------------------------- rotation


def test_reference_run_writes_step_zero_every_n_and_final(reference: Reference) -> None:
    assert reference.last == [last_name(s) for s in (0, 4, 8, MAX_STEPS)]
    assert reference.best, "at least the first validation is an improvement"
    steps = [int(BEST_RE.fullmatch(name).group(1)) for name in reference.best]
    values = [float(BEST_RE.fullmatch(name).group(2)) for name in reference.best]
    assert steps[0] == VAL_CHECK_INTERVAL
    assert set(steps) <= {3, 6, 9}
    assert values == sorted(values, reverse=True)  # each one improves on the one before


def test_a_fit_in_this_process_leaves_nothing_frozen(reference: Reference) -> None:
    """`fit` hides what exists before training from the collector (`gc.freeze`, so no full
    collection scans it mid-run) and gives it back when it returns: a caller that runs `fit`
    in its own process keeps its garbage collectable."""
    assert reference.last and gc.get_freeze_count() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the probe stays")
def test_a_fit_without_a_gpu_drops_lightnings_nvml_probe(reference: Reference) -> None:
    """`fit` calls `hardware.cheap_cuda_probe_without_gpus` (which Lightning's import undid)."""
    assert reference.last and os.environ.get(NVML_CHECK) != "1"


@pytest.mark.parametrize(("keep_last", "keep_best"), [(0, 0), (2, 1)])
def test_rotation_keeps_exactly_the_newest(
    keep_last: int,
    keep_best: int,
    prepared: Prepared,
    reference: Reference,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two real runs; tests/test_retention.py checks every keep / metric sequence."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    foreign = ["notes.txt", "ckpt_last_final.pt", "ckpt_best.pt", "model.pt"]
    for name in foreign:
        (ckpt / name).write_text(name, encoding="utf-8")
    cfg = prepared.load(
        tmp_path, checkpointing__keep__last=keep_last, checkpointing__keep__best=keep_best
    )
    result = fit(cfg)
    said = capsys.readouterr().err
    assert ("note: checkpointing.keep.last and keep.best are both 0" in said) == (
        keep_last == keep_best == 0
    )

    last = names(ckpt, "last")
    best = names(ckpt, "best")
    assert last == (reference.last[-keep_last:] if keep_last else [])
    assert best == (reference.best[-keep_best:] if keep_best else [])
    assert result.last_checkpoint == (ckpt / last_name(MAX_STEPS) if keep_last else None)
    # Rotation touched nothing it does not manage, and left no temporary files.
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(foreign + last + best)
    for name in foreign:
        assert (ckpt / name).read_text(encoding="utf-8") == name


def test_lightning_contract_after_a_real_fit(
    prepared: Prepared, reference: Reference, tmp_path: Path
) -> None:
    """ModelCheckpoint's public attributes describe exactly the files kept, and Lightning's
    own `ckpt_path="best"` resolution evaluates the best file."""
    cli = PlaygroundCLI(
        ["fit", *prepared.load(tmp_path, checkpointing__keep__last=2, checkpointing__keep__best=2)],
        env_vars=(),
    )
    trainer = cli.trainer
    callback = trainer.checkpoint_callback
    assert isinstance(callback, ModelCheckpoint)
    ckpt = tmp_path / "ckpt"
    assert len(reference.best) >= 2, "the reference run improves at least twice"
    kept_best = [str(ckpt / name) for name in reference.best[-2:]]
    assert sorted(callback.best_k_models) == sorted(kept_best)
    assert sorted(str(p) for p in ckpt.glob("ckpt_best_*")) == sorted(kept_best)
    assert callback.best_model_path == kept_best[-1]  # improvements only: the newest is best
    assert callback.kth_best_model_path == kept_best[0]
    value = float(BEST_RE.fullmatch(reference.best[-1]).group(2))
    assert float(callback.best_model_score) == pytest.approx(value, abs=5e-5)
    assert float(callback.best_k_models[kept_best[0]]) > float(callback.best_model_score)
    assert callback.last_model_path == str(ckpt / last_name(MAX_STEPS))
    assert sorted(p.name for p in ckpt.glob("ckpt_last_*")) == reference.last[-2:]

    metrics = trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    assert trainer.ckpt_path == callback.best_model_path
    # The fixed validation windows give the best step's score again.
    assert metrics[0]["val/loss"] == pytest.approx(float(callback.best_model_score), abs=1e-4)


def test_resumed_run_continues_the_windows_of_existing_files(
    prepared: Prepared, reference: Reference, tmp_path: Path
) -> None:
    """Files already in the folder count towards the windows once the resumed run writes."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference.ckpt, ckpt)
    cfg = prepared.load(
        tmp_path,
        checkpointing__keep__last=1,
        checkpointing__keep__best=100,
        trainer__max_steps=MAX_STEPS + 1,
    )
    fit(cfg, "last")
    assert names(ckpt, "last") == [last_name(MAX_STEPS + 1)]
    assert names(ckpt, "best")[: len(reference.best)] == reference.best


# The private ModelCheckpoint members GPTCheckpoint overrides or calls, as Lightning 2.6 has
# them. An upgrade that renames one or changes its arguments fails here, not at a user's.
PINNED_PRIVATE_MEMBERS = {
    "_find_last_checkpoints": "(self, trainer: 'pl.Trainer') -> set[str]",
    "_monitor_candidates": "(self, trainer: 'pl.Trainer') -> dict[str, torch.Tensor]",
    "_remove_checkpoint": "(self, trainer: 'pl.Trainer', filepath: str) -> None",
    "_save_checkpoint": "(self, trainer: 'pl.Trainer', filepath: str) -> None",
    "_save_last_checkpoint": "(self, trainer: 'pl.Trainer', monitor_candidates: "
    "dict[str, torch.Tensor]) -> None",
    "_save_topk_checkpoint": "(self, trainer: 'pl.Trainer', monitor_candidates: "
    "dict[str, torch.Tensor]) -> None",
    "_should_remove_checkpoint": "(self, trainer: 'pl.Trainer', previous: str, current: str) "
    "-> bool",
    "_should_skip_saving_checkpoint": "(self, trainer: 'pl.Trainer') -> bool",
    "_every_n_train_steps": "attribute",
}


def test_private_model_checkpoint_members_keep_their_signatures() -> None:
    source = inspect.getsource(GPTCheckpoint)
    used = set(re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)", source))
    used |= set(re.findall(r"def (_[a-z]\w*)", source))
    base = ModelCheckpoint()
    theirs = {name for name in used if hasattr(base, name)}
    assert theirs == set(PINNED_PRIVATE_MEMBERS), "pin every private member used, and only those"
    for name, signature in PINNED_PRIVATE_MEMBERS.items():
        member = getattr(ModelCheckpoint, name, None)
        if signature == "attribute":
            assert member is None and hasattr(base, name), name
        else:
            assert str(inspect.signature(member)) == signature, name
