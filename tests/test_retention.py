"""Property tests of the keep.last / keep.best windows over a real folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ml_playground.checkpoint_files import best_name, last_name
from ml_playground.checkpointing import RetentionWindows

# An event is ("last", step) or ("val", step, metric value); steps only grow, as in training.
events = st.lists(
    st.tuples(
        st.sampled_from(["last", "val"]),
        st.integers(min_value=0, max_value=50),
        st.floats(min_value=0.0, max_value=10.0, allow_nan=False),
    ),
    max_size=30,
)


def write(path: Path) -> None:
    path.write_bytes(b"checkpoint")


@settings(max_examples=150, deadline=None)
@given(
    keep_last=st.integers(0, 4),
    keep_best=st.integers(0, 4),
    mode=st.sampled_from(["min", "max"]),
    sequence=events,
)
def test_folder_holds_exactly_the_expected_files(
    keep_last: int, keep_best: int, mode: str, sequence: list[tuple[str, int, float]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "notes.txt").write_text("not a checkpoint")
        (folder / "ckpt_last_final.pt").write_text("not ours either: no 8-digit step")
        windows = RetentionWindows(folder, keep_last, keep_best, "val/loss", mode)
        expected_last: list[str] = []
        expected_best: list[str] = []
        best: float | None = None
        step = 0
        for kind, increment, value in sequence:
            step += increment
            if kind == "last":
                windows.save_last(step, write)
                if keep_last:
                    name = last_name(step)
                    expected_last = [n for n in expected_last if n != name] + [name]
                    expected_last = expected_last[-keep_last:]
            else:
                better = best is None or (value < best if mode == "min" else value > best)
                windows.offer_best(step, value, write)
                if better:
                    best = value
                    if keep_best:
                        name = best_name(step, "val/loss", value)
                        expected_best = [n for n in expected_best if n != name] + [name]
                        expected_best = expected_best[-keep_best:]
            names = {p.name for p in folder.iterdir()}
            assert names == {"notes.txt", "ckpt_last_final.pt", *expected_last, *expected_best}
        assert windows.best_score == best


def test_metric_name_is_made_filename_safe() -> None:
    assert best_name(2000, "val/loss", 1.47271) == "ckpt_best_00002000_val_loss=1.4727.pt"
    assert best_name(7, "my metric:x", 2.0) == "ckpt_best_00000007_my_metric_x=2.0000.pt"


def test_lowering_keep_does_not_delete_at_start_up(tmp_path: Path) -> None:
    for step in (0, 5, 10):
        write(tmp_path / last_name(step))
    windows = RetentionWindows(tmp_path, 1, 1, "val/loss", "min")
    windows.adopt()
    assert len(list(tmp_path.glob("ckpt_last_*"))) == 3  # nothing deleted before a write
    windows.save_last(15, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == [last_name(15)]


def test_adopted_files_continue_the_window_in_step_order(tmp_path: Path) -> None:
    for step in (100, 20, 3):  # created out of order: ordering is by step, not mtime
        write(tmp_path / last_name(step))
    windows = RetentionWindows(tmp_path, 3, 1, "val/loss", "min")
    windows.adopt()
    windows.save_last(120, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        last_name(20),
        last_name(100),
        last_name(120),
    ]


def test_non_finite_metric_never_counts_as_best(tmp_path: Path) -> None:
    windows = RetentionWindows(tmp_path, 1, 2, "val/loss", "min")
    assert windows.offer_best(10, float("nan"), write) is None
    assert windows.offer_best(20, float("inf"), write) is None
    assert windows.offer_best(30, 2.5, write) is not None
    assert windows.best_score == 2.5
