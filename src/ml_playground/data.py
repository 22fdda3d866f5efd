"""The LightningDataModule over a prepared dataset folder (train.bin, val.bin, meta.pkl).

Training batches are random windows of the memory-mapped train.bin. Batch k of rank r is drawn
from a generator seeded by (seed, r, k) alone, so the stream is reproducible, different per
rank, and resumes at any step without replaying the batches before it. Validation uses a fixed
set of evenly spaced windows, so `val/loss` is comparable across evaluations and runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ml_playground.errors import DataError
from ml_playground.prepare import CharTokenizer, dataset_meta, load_tokens
from ml_playground.prepare.artifacts import check_token_counts
from ml_playground.sections import AnchoredPath, Section

ARTIFACTS = ("meta.pkl", "train.bin", "val.bin")


class DataConfig(Section):
    """Where the prepared tokens are and how batches are drawn from them."""

    dataset_dir: AnchoredPath = Field(
        description="folder with train.bin, val.bin and meta.pkl ({experiment} is replaced)"
    )
    batch_size: int = Field(description="sequences per micro-batch (per device)", gt=0)
    block_size: int = Field(description="tokens per training sequence", gt=0)
    val_batches: int = Field(
        description="batches in the fixed validation set (evenly spaced windows of val.bin)",
        gt=0,
    )
    num_workers: int = Field(description="DataLoader worker processes (0: load in-process)", ge=0)
    pin_memory: bool = Field(description="pin host memory for faster copies to a GPU")


def require_artifacts(dataset_dir: Path) -> None:
    """Fail fast, naming every missing file and the command that creates them.

    A folder with both token files but no meta.pkl is nanoGPT's GPT-2 BPE layout
    (data/shakespeare, data/openwebtext) and is accepted as it is.
    """
    folder = Path(dataset_dir)
    missing = [name for name in ARTIFACTS if not (folder / name).is_file()]
    if missing == ["meta.pkl"] and not (folder / "meta.pkl").exists():
        return
    if missing:
        raise DataError(
            f"{dataset_dir}: missing {', '.join(missing)}; run "
            "`ml-playground prepare --config <your config>` first (or set data.dataset_dir)"
        )


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, ...]:
    """Inputs and next-token targets for windows starting at `starts`, gathered in one go."""
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))  # (B, T+1)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def _largest_id(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """Max over the memmap in chunks: one streaming pass, bounded memory."""
    largest = 0
    for start in range(0, len(tokens), chunk):
        largest = max(largest, int(tokens[start : start + chunk].max()))
    return largest


class RandomWindows(IterableDataset):
    """Endless stream of whole batches of random windows (the DataLoader does no batching)."""

    def __init__(
        self, path: Path, dtype: str, batch_size: int, block_size: int, seed: int, rank: int
    ) -> None:
        self.path, self.dtype = path, dtype
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank = seed, rank
        self.start_batch = 0

    def batch(self, index: int, tokens: np.ndarray) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng([self.seed, self.rank, index])
        starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
        return windows(tokens, starts, self.block_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        tokens = load_tokens(self.path, self.dtype)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader reads workers round-robin, so worker w serving every w-th batch keeps
        # the global order identical to the single-process order.
        index = self.start_batch + worker
        while True:
            yield self.batch(index, tokens)
            index += workers


class FixedWindows(Dataset):
    """`count` windows evenly spaced over the split, always the same ones."""

    def __init__(self, path: Path, dtype: str, block_size: int, count: int) -> None:
        self.path, self.dtype, self.block_size = path, dtype, block_size
        length = len(load_tokens(path, dtype))
        self.starts = np.linspace(0, length - block_size - 1, num=count).astype(np.int64)
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Inputs, targets and the window's index (under DDP the sampler pads the last share
        with repeated windows; the index lets the loss count each window once)."""
        if self._tokens is None:  # opened lazily so the dataset pickles cheaply to workers
            self._tokens = load_tokens(self.path, self.dtype)
        x, y = windows(self._tokens, self.starts[i : i + 1], self.block_size)
        return x[0], y[0], i


class GPTDataModule(pl.LightningDataModule):
    """Reads the three artifacts of `prepare`; hands out training and validation batches."""

    def __init__(self, seed: int = 0, **data: Any) -> None:
        """`data` holds the `[data]` settings (`DataConfig`); `seed` is `seed_everything`."""
        super().__init__()
        config = DataConfig(**data)
        self.dataset_dir = Path(config.dataset_dir)
        self.batch_size, self.block_size = config.batch_size, config.block_size
        self.val_batches, self.num_workers = config.val_batches, config.num_workers
        self.pin_memory, self.seed = config.pin_memory, seed
        self._resume_batch = 0  # batches drawn before this run (from a checkpoint)
        self._start_step = 0  # the optimizer step this run's stream started at
        require_artifacts(self.dataset_dir)
        # meta.pkl, or nanoGPT's GPT-2 BPE convention when the folder has none.
        self.meta: dict[str, Any] = dataset_meta(self.dataset_dir)
        self.dtype: str = self.meta.get("dtype", "uint16")
        self.vocab_size: int = int(self.meta["vocab_size"])
        if "itos" in self.meta or "stoi" in self.meta:  # a char table must match vocab_size
            try:
                CharTokenizer.from_meta(self.meta)
            except DataError as exc:
                raise DataError(f"{self.dataset_dir / 'meta.pkl'}: {exc}") from None
        opened = {
            s: load_tokens(self.dataset_dir / f"{s}.bin", self.dtype) for s in ("train", "val")
        }
        check_token_counts(self.dataset_dir, self.meta)  # from the sizes, before the reads below
        for split, tokens in opened.items():
            length = len(tokens)
            largest = _largest_id(tokens)
            if largest >= self.vocab_size:
                raise DataError(
                    f"{self.dataset_dir / f'{split}.bin'}: token id {largest} is outside the "
                    f"vocabulary of {self.vocab_size} (meta.pkl); prepare the dataset again "
                    "(`prepare --force`)"
                )
            if length <= self.block_size:
                raise DataError(
                    f"{self.dataset_dir / f'{split}.bin'}: {length} tokens, fewer than one "
                    f"window of data.block_size + 1 = {self.block_size + 1}; use a larger corpus "
                    "or a smaller data.block_size"
                )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        dataset = RandomWindows(
            self.dataset_dir / "train.bin",
            self.dtype,
            self.batch_size,
            self.block_size,
            self.seed,
            rank,
        )
        dataset.start_batch = self._resume_batch  # continue the stream where a checkpoint left it
        # Called after a checkpoint is restored: global_step is the step resumed from.
        self._start_step = trainer.global_step if trainer is not None else 0
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position: how many batches each rank has drawn so far. Counted from
        the resumed position, so a run resumed with another accumulate_grad_batches neither
        replays nor skips data."""
        trainer = self.trainer
        drawn = self._resume_batch
        if trainer is not None:
            drawn += (trainer.global_step - self._start_step) * trainer.accumulate_grad_batches
        return {"batches_drawn": drawn, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_batch = int(state_dict.get("batches_drawn", 0))

    def val_dataloader(self) -> DataLoader:
        dataset = FixedWindows(
            self.dataset_dir / "val.bin",
            self.dtype,
            self.block_size,
            self.val_batches * self.batch_size,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )
