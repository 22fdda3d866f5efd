"""GPTDataModule over a real prepared folder: batches, reproducibility, resume, validation."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_playground.configuration.loading import packaged_defaults
from ml_playground.data import GPTDataModule, RandomWindows
from ml_playground.errors import DataError
from ml_playground.prepare import PrepareConfig, load_tokens, run_prepare, write_bin_and_meta

BATCH, BLOCK, VAL_BATCHES = 4, 16, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus_text: str) -> Path:
    """The corpus prepared as `ml-playground prepare` does: char vocabulary, 10% validation."""
    folder = tmp_path_factory.mktemp("dataset")
    source = folder / "corpus.txt"
    source.write_text(corpus_text, encoding="utf-8")
    values = {**packaged_defaults()["prepare"], "source": str(source), "source_sha256": ""}
    run_prepare(PrepareConfig(**values), folder / "data", seed=0)
    return folder / "data"


def datamodule(folder: Path, **kwargs) -> GPTDataModule:
    args = {"batch_size": BATCH, "block_size": BLOCK, "val_batches": VAL_BATCHES, "seed": 5}
    args |= {"num_workers": 0, "pin_memory": False}
    return GPTDataModule(dataset_dir=folder, **(args | kwargs))


def take(dm: GPTDataModule, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(iter(dm.train_dataloader()), n))


def same(a: list, b: list) -> bool:
    """Equal lists of batches (tuples of tensors: inputs, targets and, for validation, indices)."""
    return len(a) == len(b) and all(
        len(p) == len(q) and all(torch.equal(u, v) for u, v in zip(p, q, strict=True))
        for p, q in zip(a, b, strict=True)
    )


def tokens(folder: Path, split: str) -> np.ndarray:
    return np.asarray(load_tokens(folder / f"{split}.bin", "uint16")).astype(np.int64)


def test_batches_are_windows_with_next_token_targets(dataset: Path, corpus_text: str) -> None:
    dm = datamodule(dataset)
    assert dm.vocab_size == len(set(corpus_text))
    train = tokens(dataset, "train")
    for x, y in take(dm, 5):
        assert x.shape == y.shape == (BATCH, BLOCK)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets: inputs shifted by one
        assert int(x.min()) >= 0 and int(x.max()) < dm.vocab_size
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            window = np.concatenate([row_x, row_y[-1:]])
            starts = np.flatnonzero(train[: len(train) - BLOCK] == window[0])
            assert any(np.array_equal(train[s : s + BLOCK + 1], window) for s in starts)


def test_stream_is_reproducible_from_seed_rank_and_index(dataset: Path) -> None:
    first, again = take(datamodule(dataset), 4), take(datamodule(dataset), 4)
    assert same(first, again)
    assert not same(first, take(datamodule(dataset, seed=6), 4))
    assert not torch.equal(first[0][0], first[1][0])  # batches within a stream differ

    dm = datamodule(dataset)
    train = load_tokens(dataset / "train.bin", dm.dtype)
    rank0 = RandomWindows(dataset / "train.bin", dm.dtype, BATCH, BLOCK, seed=5, rank=0)
    rank1 = RandomWindows(dataset / "train.bin", dm.dtype, BATCH, BLOCK, seed=5, rank=1)
    # The data module's stream is rank 0's; batch k depends on (seed, rank, k) alone.
    assert same(first, [rank0.batch(k, train) for k in range(4)])
    assert same([rank1.batch(2, train)], [rank1.batch(2, train)])
    for k in range(4):
        assert not torch.equal(rank0.batch(k, train)[0], rank1.batch(k, train)[0])


def test_start_batch_resumes_the_stream_exactly(dataset: Path) -> None:
    full = take(datamodule(dataset), 7)

    resumed = datamodule(dataset)
    resumed.load_state_dict({"batches_drawn": 3})
    assert same(take(resumed, 4), full[3:])

    dm = datamodule(dataset)
    dataset_ = RandomWindows(dataset / "train.bin", dm.dtype, BATCH, BLOCK, seed=5, rank=0)
    dataset_.start_batch = 5
    assert same(list(itertools.islice(iter(dataset_), 2)), full[5:])


def test_worker_processes_keep_the_order(dataset: Path) -> None:
    single = take(datamodule(dataset), 6)
    loader = datamodule(dataset, num_workers=2).train_dataloader()
    assert same(list(itertools.islice(iter(loader), 6)), single)


def test_validation_windows_are_fixed(dataset: Path) -> None:
    dm, other = datamodule(dataset), datamodule(dataset, seed=99)
    batches = list(dm.val_dataloader())
    assert len(batches) == VAL_BATCHES
    for x, y, index in batches:
        assert x.shape == y.shape == (BATCH, BLOCK)
        assert index.shape == (BATCH,)
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert same(batches, list(dm.val_dataloader()))  # every evaluation sees the same windows
    assert same(batches, list(other.val_dataloader()))  # whatever the seed, in any run
    val = tokens(dataset, "val")
    # Evenly spread over the split: from its first token to its last.
    assert np.array_equal(batches[0][0][0].numpy(), val[:BLOCK])
    assert np.array_equal(batches[-1][1][-1].numpy(), val[-BLOCK:])


@pytest.mark.parametrize(
    "remove", [("meta.pkl", "train.bin", "val.bin"), ("train.bin",), ("meta.pkl", "val.bin")]
)
def test_missing_artifacts_are_named(
    remove: tuple[str, ...], dataset: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("meta.pkl", "train.bin", "val.bin"):
        if name not in remove:
            (folder / name).write_bytes((dataset / name).read_bytes())
    with pytest.raises(DataError) as info:
        datamodule(folder)
    message = str(info.value)
    assert str(folder) in message
    for name in ("meta.pkl", "train.bin", "val.bin"):
        assert (name in message) == (name in remove), message
    assert "prepare" in message


@pytest.mark.parametrize(("split", "length"), [("train", BLOCK), ("val", BLOCK), ("val", 3)])
def test_split_shorter_than_a_window_is_refused(split: str, length: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lengths = {"train": 200, "val": 50, split: length}
    ids = {name: rng.integers(0, 20, size=n) for name, n in lengths.items()}
    write_bin_and_meta(tmp_path, ids["train"], ids["val"], {"vocab_size": 20})
    with pytest.raises(DataError, match=rf"{split}\.bin.*block_size"):
        datamodule(tmp_path)


def test_split_of_exactly_one_window_works(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 20, size=BLOCK + 1), rng.integers(0, 20, size=BLOCK + 1)
    write_bin_and_meta(tmp_path, train, val, {"vocab_size": 20})
    dm = datamodule(tmp_path)
    x, y = take(dm, 1)[0]
    assert (x == torch.from_numpy(train[:BLOCK])).all(dim=1).all()
    assert (y == torch.from_numpy(train[1:])).all(dim=1).all()
    for vx, vy, _ in dm.val_dataloader():
        assert (vx == torch.from_numpy(val[:BLOCK])).all()
        assert (vy == torch.from_numpy(val[1:])).all()


def _truncate_train(folder: Path) -> None:
    tokens = np.fromfile(folder / "train.bin", dtype=np.uint16)
    tokens[: len(tokens) // 2].tofile(folder / "train.bin")  # an even size: whole tokens


def _append_to_val(folder: Path) -> None:
    with open(folder / "val.bin", "ab") as handle:
        handle.write(b"\0\0")


def _swap(folder: Path) -> None:
    (folder / "train.bin").rename(folder / "swap.bin")
    (folder / "val.bin").rename(folder / "train.bin")
    (folder / "swap.bin").rename(folder / "val.bin")


def _train_as_uint32(folder: Path) -> None:
    tokens = np.fromfile(folder / "train.bin", dtype=np.uint16)
    tokens.astype(np.uint32).tofile(folder / "train.bin")


@pytest.mark.parametrize(
    ("change", "file", "says"),
    [
        (_truncate_train, "train.bin", "truncated or replaced"),
        (_append_to_val, "val.bin", "appended to or replaced"),
        (_swap, "train.bin", "train.bin and val.bin look swapped"),
        (_train_as_uint32, "train.bin", "as many tokens in uint32: it was written in another"),
    ],
)
def test_token_files_that_meta_pkl_contradicts_are_refused(
    change: Callable[[Path], None], file: str, says: str, dataset: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    shutil.copytree(dataset, folder)
    change(folder)
    with pytest.raises(DataError) as info:
        datamodule(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / file}: meta.pkl records "), message
    assert says in message and "`ml-playground prepare --force`" in message, message
