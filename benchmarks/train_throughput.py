"""Training speed: `fit` (Lightning) against a plain PyTorch loop over the same GPT and data.

Both run the same model, optimizer, schedule, gradient clipping and batches, interleaved
A B A B ... so that machine noise hits both alike. Reported: median ms per optimizer step after
warm-up, tokens per second, and the ratio fit / plain.

    uv run python benchmarks/train_throughput.py                       # CPU recipe
    uv run python benchmarks/train_throughput.py --config configs/shakespeare_char_gpu.toml \\
        --steps 100 --rounds 3
    # GPT-2 124M on random tokens (nanoGPT's bench.py setting), no corpus needed:
    uv run python benchmarks/train_throughput.py --config configs/gpt2_124m.toml \\
        --random-data 50257 --set trainer.accumulate_grad_batches 1 --steps 60 --rounds 2

Checkpoints and validation are switched off in both, so the figure is the training step alone.
A step is one optimizer step (all its accumulated micro-batches). On a CPU each step is timed
and the median reported. On a GPU the host is synchronised only where the measured window
starts and ends, as in a real run (which syncs only on logging steps), and the window's mean
is reported; where the GPU's peak is in ml_playground/hardware.py, the MFU too.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from ml_playground.cli import PlaygroundCLI
from ml_playground.configuration import load_config
from ml_playground.configuration.schema import ExperimentConfig
from ml_playground.data import GPTDataModule, RandomWindows
from ml_playground.hardware import peak_flops
from ml_playground.model.gpt import GPT
from ml_playground.module import (
    GPTLightningModule,
    compile_gpt,
    gpt_config,
)
from ml_playground.prepare import artifacts_ready, run_prepare, write_bin_and_meta

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def stamp(step: int, warmup: int, steps: int, device: torch.device) -> float:
    """The time after optimizer step `step` (1-based); on a GPU, exact at the window's ends."""
    if device.type == "cuda" and step in (warmup, steps):
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer(pl.Callback):
    """A time stamp after every optimizer step (not every micro-batch)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.times: list[float] = []
        self._step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step:
            return  # a micro-batch inside gradient accumulation
        self._step = trainer.global_step
        device = trainer.strategy.root_device
        self.times.append(stamp(self._step, self.warmup, self.steps, device))


def write_random_data(folder: Path, vocab_size: int, tokens: int = 1 << 24) -> None:
    """Uniformly random token ids: the throughput of a corpus without preparing one."""
    rng = np.random.default_rng(0)
    write_bin_and_meta(
        folder,
        rng.integers(0, vocab_size, size=tokens, dtype=np.int64),
        rng.integers(0, vocab_size, size=tokens // 64, dtype=np.int64),
        {"vocab_size": vocab_size},
    )


def ensure_data(cfg: ExperimentConfig) -> None:
    if artifacts_ready(cfg.data.dataset_dir):
        return
    settings = cfg.prepare
    if settings.source.startswith("http") and SHARED_CORPUS.is_file():
        settings = settings.model_copy(update={"source": str(SHARED_CORPUS)})  # offline machines
    run_prepare(settings, cfg.data.dataset_dir, seed=cfg.seed_everything)


def step_ms(stamps: list[float], warmup: int, on_gpu: bool) -> list[float]:
    """Per-step times after warm-up (CPU), or the window's mean once per step (GPU)."""
    if on_gpu:
        return [1000 * (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup)]
    return [1000 * (b - a) for a, b in zip(stamps[warmup - 1 :], stamps[warmup:], strict=False)]


def run_fit(argv: list[str], steps: int, warmup: int) -> list[float]:
    """`ml-playground fit` as the console script builds it (LightningCLI, no command run)."""
    cli = PlaygroundCLI(argv, run=False, env_vars=())
    timer = StepTimer(warmup, steps)
    cli.trainer.callbacks.append(timer)  # type: ignore[attr-defined]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.times


def run_plain(cfg: ExperimentConfig, steps: int, warmup: int) -> list[float]:
    """What a user would write by hand: the same pieces, no framework."""
    pl.seed_everything(cfg.seed_everything, verbose=False)
    accelerator = cfg.trainer.get("accelerator", "auto")
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if use_cuda else "cpu")
    data = GPTDataModule(**cfg.data.model_dump())
    module = GPTLightningModule(data.vocab_size, cfg.data.batch_size, **cfg.model.model_dump())
    module.to(device)
    model = module.model
    if cfg.model.compile:
        compile_gpt(model, cfg.model)
    # The module's own optimizer and schedule (fused AdamW, or Muon with AdamW), as `fit` has.
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    stream = iter(
        torch.utils.data.DataLoader(
            RandomWindows(
                data.dataset_dir / "train.bin",
                data.dtype,
                cfg.data.batch_size,
                cfg.data.block_size,
                cfg.seed_everything,
                0,
            ),
            batch_size=None,
            pin_memory=device.type == "cuda",
        )
    )
    precision = str(cfg.trainer.get("precision", "32-true"))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision.startswith("bf16")
        else contextlib.nullcontext()
    )
    clip = cfg.trainer.get("gradient_clip_val")
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    model.train()
    stamps = []
    for step in range(1, steps + 1):
        for _ in range(accumulate):
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                _, loss = model(x, y)
            (loss / accumulate).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(stamp(step, warmup, steps, device))
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "shakespeare_char.toml")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds")
    parser.add_argument("--warmup", type=int, default=20, help="steps ignored per round")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument(
        "--random-data",
        type=int,
        metavar="VOCAB",
        help="train on random token ids of this vocabulary (e.g. 50257) instead of the corpus",
    )
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")

    with tempfile.TemporaryDirectory() as tmp:
        if args.random_data:
            write_random_data(Path(tmp) / "random", args.random_data)
            args.set.insert(0, ("data.dataset_dir", f"{tmp}/random"))
        flags = [
            ("trainer.max_steps", str(args.steps)),
            ("trainer.val_check_interval", str(10**9)),
            ("trainer.limit_val_batches", "0"),
            ("trainer.enable_progress_bar", "false"),
            ("checkpointing.keep.last", "0"),
            ("checkpointing.keep.best", "0"),
            ("checkpointing.dirpath", f"{tmp}/ckpt"),
            ("log_dir", f"{tmp}/logs"),
            *[(k, v) for k, v in args.set],
        ]
        cfg = load_config([args.config], flags)
        argv = ["--config", str(args.config), *(f"--{key}={value}" for key, value in flags)]
        ensure_data(cfg)
        on_gpu = torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu"
        fit_ms: list[float] = []
        plain_ms: list[float] = []
        for _ in range(args.rounds):
            fit_ms += step_ms(run_fit(argv, args.steps, args.warmup), args.warmup, on_gpu)
            plain_ms += step_ms(run_plain(cfg, args.steps, args.warmup), args.warmup, on_gpu)
    tokens = (
        cfg.data.batch_size * cfg.data.block_size * cfg.trainer.get("accumulate_grad_batches", 1)
    )
    device = torch.device("cuda" if on_gpu else "cpu")
    peak, device_name = peak_flops(device, str(cfg.trainer.get("precision", "32-true")))
    vocab = (
        args.random_data or GPTDataModule(**(cfg.data.model_dump() | {"val_batches": 1})).vocab_size
    )
    flops_per_token = GPT(gpt_config(cfg.model, vocab)).flops_per_token()
    print(
        f"config: {args.config.name}  device: {device_name}  threads: {torch.get_num_threads()}"
        f"  tokens/step: {tokens}  torch {torch.__version__}"
    )
    if args.set:
        print("settings: " + "  ".join(f"{key}={value}" for key, value in args.set))
    how = "median over rounds of each window's mean" if on_gpu else "median over steps"
    print(f"ms/step: {how}; {args.rounds} rounds of {args.steps} steps, {args.warmup} warm-up")
    print(f"{'':8} {'ms/step':>10} {'tokens/s':>10} {'MFU':>6}")
    for name, values in (("fit", fit_ms), ("plain", plain_ms)):
        median = statistics.median(values)
        rate = tokens / median * 1000
        mfu = f"{flops_per_token * rate / peak:6.1%}" if peak else f"{'-':>6}"
        print(f"{name:8} {median:10.2f} {rate:10.0f} {mfu}")
    print(f"ratio fit/plain: {statistics.median(fit_ms) / statistics.median(plain_ms):.3f}")


if __name__ == "__main__":
    main()
