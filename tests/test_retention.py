"""Property tests of GPTCheckpoint's names and keep.last / keep.best windows over a real folder.

The callback runs through its Lightning hooks; the trainer is a stand-in holding only what the
callback reads (step, metrics, state) and writing real files. Real fits are in
test_checkpointing.py.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.trainer.states import TrainerFn

from ml_playground.checkpoint_writing import GPTCheckpoint
from ml_playground.errors import ConfigError


class StandInTrainer:
    """What GPTCheckpoint reads from a Trainer, on one process; checkpoints are real files."""

    fast_dev_run = False
    sanity_checking = False
    is_global_zero = True
    current_epoch = 0
    loggers: ClassVar[list] = []
    ckpt_path: str | None = None

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        self.global_step = 0
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.lightning_module = module
        self.state = SimpleNamespace(fn=TrainerFn.FITTING)
        self.strategy = SimpleNamespace(
            broadcast=lambda obj, src=0: obj,
            remove_checkpoint=lambda path: Path(path).unlink(),
        )

    def save_checkpoint(self, path: str, weights_only: bool = False) -> None:
        Path(path).write_bytes(b"checkpoint")

    def train(self, callback: GPTCheckpoint, steps: int) -> None:
        for _ in range(steps):
            callback.on_train_batch_start(self, None, None, 0)  # type: ignore[arg-type]
            self.global_step += 1
            callback.on_train_batch_end(self, None, None, None, 0)  # type: ignore[arg-type]

    def validate(self, callback: GPTCheckpoint, metrics: dict[str, float]) -> None:
        self.callback_metrics = {k: torch.tensor(v) for k, v in metrics.items()}
        callback.on_validation_end(self, None)  # type: ignore[arg-type]


def make_callback(folder: Path, keep_last: int, keep_best: int, every: int = 1, **kw: str):
    settings = {"metric": "val/loss", "mode": "min", **kw}
    return GPTCheckpoint(
        dirpath=folder, every_n_steps=every, patience=0,
        keep={"last": keep_last, "best": keep_best}, **settings,
    )  # fmt: skip


def start(callback: GPTCheckpoint, trainer: StandInTrainer) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*both 0")
        callback.setup(trainer, None, "fit")  # type: ignore[arg-type]
    callback.on_train_start(trainer, None)  # type: ignore[arg-type]


# An event: train 1-5 steps, then maybe validate with that value; every step is a `last` step.
events = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=5),
        st.none() | st.floats(min_value=0.0, max_value=10.0, allow_nan=False),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(
    keep_last=st.integers(0, 4),
    keep_best=st.integers(0, 4),
    mode=st.sampled_from(["min", "max"]),
    sequence=events,
)
def test_folder_holds_exactly_the_expected_files(
    keep_last: int, keep_best: int, mode: str, sequence: list[tuple[int, float | None]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        foreign = {"notes.txt", "ckpt_last_final.pt", "ckpt_best.pt"}
        for name in foreign:
            (folder / name).write_text("not ours")
        callback = make_callback(folder, keep_last, keep_best, mode=mode)
        trainer = StandInTrainer()
        start(callback, trainer)
        written_last = ["ckpt_last_00000000.pt"]
        written_best: list[tuple[str, float]] = []
        for steps, value in sequence:
            before = trainer.global_step
            trainer.train(callback, steps)
            step = trainer.global_step
            # A step's `last` is written after its validation, or when the next step starts.
            written_last += [f"ckpt_last_{s:08d}.pt" for s in range(before, step)]
            if value is not None:
                value = float(torch.tensor(value))  # logged metrics are float32
                trainer.validate(callback, {"val/loss": value, "train/loss": 1.0})
                best = written_best[-1][1] if written_best else None
                if best is None or (value < best if mode == "min" else value > best):
                    written_best.append((f"ckpt_best_{step:08d}_val_loss={value:.4f}.pt", value))
                written_last.append(f"ckpt_last_{step:08d}.pt")
            kept_last = list(dict.fromkeys(written_last))[-keep_last:] if keep_last else []
            kept_best = [name for name, _ in written_best][-keep_best:] if keep_best else []
            on_disk = {p.name for p in folder.iterdir()}
            assert on_disk == foreign | set(kept_last) | set(kept_best)
            # Lightning's public view of the same files.
            assert sorted(Path(p).name for p in callback.best_k_models) == sorted(kept_best)
            if kept_best:
                assert Path(callback.best_model_path).name == kept_best[-1]
                if len(kept_best) == keep_best:  # Lightning sets it once the k are there
                    assert Path(callback.kth_best_model_path).name == kept_best[0]
                assert float(callback.best_model_score) == pytest.approx(written_best[-1][1])
            if kept_last:
                assert Path(callback.last_model_path).name == kept_last[-1]


def test_best_name_carries_a_filename_safe_metric(tmp_path: Path) -> None:
    for metric, shown in [
        ("val/loss", "val_loss"),
        ("a:b\\c*d?e", "a_b_c_d_e"),
        ("../../x", ".._.._x"),
    ]:
        callback = make_callback(tmp_path, 1, 1, metric=metric)
        trainer = StandInTrainer()
        start(callback, trainer)
        trainer.train(callback, 7)
        trainer.validate(callback, {metric: 1.47271})
        name = f"ckpt_best_00000007_{shown}=1.4727.pt"
        assert re.fullmatch(r"[A-Za-z0-9_.=-]+", name)
        assert Path(callback.best_model_path) == tmp_path / name
        assert (tmp_path / name).is_file()
        for path in tmp_path.iterdir():
            path.unlink()


def test_lowering_keep_does_not_delete_at_start_up(tmp_path: Path) -> None:
    first = make_callback(tmp_path, 3, 3)
    trainer = StandInTrainer()
    start(first, trainer)
    for value in (3.0, 2.0, 1.0):
        trainer.train(first, 5)
        trainer.validate(first, {"val/loss": value})
    state = first.state_dict()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert len(before) == 6

    resumed = make_callback(tmp_path, 1, 1)
    resumed.load_state_dict(state)
    start(resumed, trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing deleted yet
    trainer.train(resumed, 5)
    trainer.validate(resumed, {"val/loss": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_best_00000020_val_loss=0.5000.pt",
        "ckpt_last_00000020.pt",
    ]


def test_state_of_another_metric_is_ignored_and_its_files_stay(tmp_path: Path) -> None:
    first = make_callback(tmp_path, 1, 1)
    trainer = StandInTrainer()
    start(first, trainer)
    trainer.train(first, 5)
    trainer.validate(first, {"val/loss": 0.1})
    other = make_callback(tmp_path, 1, 1, metric="train/loss")
    other.load_state_dict(first.state_dict())
    assert other.best_model_score is None and not other.best_k_models
    trainer.train(other, 5)
    trainer.validate(other, {"val/loss": 0.1, "train/loss": 2.0})
    assert (tmp_path / "ckpt_best_00000005_val_loss=0.1000.pt").is_file()
    assert (tmp_path / "ckpt_best_00000010_train_loss=2.0000.pt").is_file()


def test_non_finite_metric_never_counts_as_best(tmp_path: Path) -> None:
    callback = make_callback(tmp_path, 1, 2)
    trainer = StandInTrainer()
    start(callback, trainer)
    for value in (float("nan"), float("inf"), 2.5):
        trainer.train(callback, 1)
        trainer.validate(callback, {"val/loss": value})
    assert float(callback.best_model_score) == 2.5
    assert [Path(p).name for p in callback.best_k_models] == [
        "ckpt_best_00000003_val_loss=2.5000.pt"
    ]


def test_a_metric_never_logged_is_named(tmp_path: Path) -> None:
    callback = make_callback(tmp_path, 1, 1, metric="val/acc")
    trainer = StandInTrainer()
    start(callback, trainer)
    trainer.train(callback, 1)
    with pytest.raises(ConfigError, match=r"'val/acc' was not logged; choose one of val/loss"):
        trainer.validate(callback, {"val/loss": 1.0})


def test_files_a_kill_left_outside_the_windows_rotate_out_when_the_line_goes_on(
    tmp_path: Path,
) -> None:
    """A kill between writing a file and deleting the one it replaced leaves that one outside
    the saved windows. Resumed from the newest `last`, the cut-short rotation of `best` files
    is finished at once (the window the state knew keeps its size); a `last` rotates out with
    the next write."""
    first = make_callback(tmp_path, 2, 1)
    trainer = StandInTrainer()
    start(first, trainer)
    trainer.train(first, 5)
    trainer.validate(first, {"val/loss": 2.0})
    state = first.state_dict()
    (tmp_path / "ckpt_last_00000001.pt").write_bytes(b"left behind")
    (tmp_path / "ckpt_best_00000002_val_loss=3.0000.pt").write_bytes(b"left behind")
    (tmp_path / "ckpt_best_00000001_train_loss=0.5000.pt").write_bytes(b"another metric's")

    resumed = make_callback(tmp_path, 2, 1)
    resumed.load_state_dict(state)
    trainer.ckpt_path = str(tmp_path / "ckpt_last_00000005.pt")
    start(resumed, trainer)
    assert resumed.best_model_path == str(tmp_path / "ckpt_best_00000005_val_loss=2.0000.pt")
    assert not (tmp_path / "ckpt_best_00000002_val_loss=3.0000.pt").exists()
    trainer.train(resumed, 1)
    trainer.validate(resumed, {"val/loss": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_best_00000001_train_loss=0.5000.pt",
        "ckpt_best_00000006_val_loss=1.0000.pt",
        "ckpt_last_00000005.pt",
        "ckpt_last_00000006.pt",
    ]


def test_a_best_a_kill_left_after_the_newest_last_is_kept_when_better(tmp_path: Path) -> None:
    """Killed after writing a new best at step 7 and before deleting the old one (and before
    the next `last`): the run goes on from step 6 with the step-7 file as its best."""
    first = make_callback(tmp_path, 1, 1, every=2)
    trainer = StandInTrainer()
    start(first, trainer)
    trainer.train(first, 5)
    trainer.validate(first, {"val/loss": 2.0})
    trainer.train(first, 2)  # the `last` of step 6 is written as step 7 starts
    state = first.state_dict()
    (tmp_path / "ckpt_best_00000007_val_loss=1.5000.pt").write_bytes(b"written before the kill")

    resumed = make_callback(tmp_path, 1, 1, every=2)
    resumed.load_state_dict(state)
    trainer.ckpt_path, trainer.global_step = str(tmp_path / "ckpt_last_00000006.pt"), 6
    start(resumed, trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_best_00000007_val_loss=1.5000.pt",
        "ckpt_last_00000006.pt",
    ]
    assert resumed.best_model_score == pytest.approx(1.5)
    trainer.train(resumed, 3)
    trainer.validate(resumed, {"val/loss": 1.7})  # no improvement on 1.5: nothing written
    assert [p.name for p in tmp_path.glob("ckpt_best_*")] == [
        "ckpt_best_00000007_val_loss=1.5000.pt"
    ]
