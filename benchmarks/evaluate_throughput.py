"""`ml-playground evaluate` at GPT-2 124M's size: tokens per second over 1,000 HellaSwag-format
examples, per `evaluate.batch_size`, against build-nanogpt's way of scoring.

The model is a checkpoint of GPT-2 124M's shape (12 layers x 768, block 1024, GPT-2 BPE padded
to 50,304) with its random initial weights (`fit` for one step at learning rate 0: speed does
not depend on the weights). The examples come from tinyshakespeare's held-out tenth
(hellaswag_from_corpus.py). Each `evaluate` runs as its own command; tokens are those of the
rows build-nanogpt would run (context + ending, 4 per example), over the seconds of scoring.
build-nanogpt's way, run in this process on the same model and the first `--reference`
examples: one example per forward pass, its 4 rows padded to the longest, the logits of every
position over the whole (padded) vocabulary.

    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken_cache uv run python benchmarks/evaluate_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hellaswag_from_corpus import examples as make_examples

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
GPT2_124M = ("--model.n_layer", "12", "--model.n_head", "12", "--model.n_embd", "768",
             "--model.block_size", "1024", "--model.vocab_multiple_of", "64", "--model.bias",
             "true")  # fmt: skip
SCORED = re.compile(r"scored ([\d,]+) tokens in ([\d.]+) s")


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ml_playground", *map(str, args)]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    return result


@torch.no_grad()
def build_nanogpt_way(checkpoint: Path, work: Path, path: Path, count: int) -> tuple[int, float]:
    """(row tokens, seconds) of build-nanogpt's loop over the first `count` examples."""
    from ml_playground.evaluation import read_examples
    from ml_playground.sampling import load_model

    _, model, tokenizer, _ = load_model(str(checkpoint), work / "ckpt", work / "data")
    model.eval()
    tokens, started = 0, time.perf_counter()
    for example in read_examples(path, count):
        context = tokenizer.encode(example.context)
        rows = [context + tokenizer.encode(" " + ending) for ending in example.endings]
        width = max(map(len, rows))
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width)
        for r, row in enumerate(rows):
            idx[r, : len(row)] = torch.tensor(row)
            mask[r, len(context) : len(row)] = 1
        logits, _ = model(idx, idx)  # every position, every (padded) vocabulary row
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="none"
        )
        sums = (losses.view(len(rows), -1) * mask[:, 1:]).sum(1)
        (sums / mask[:, 1:].sum(1)).argmin()
        tokens += sum(map(len, rows))
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--batch_sizes", default="4,16,64,256")
    parser.add_argument("--reference", type=int, default=200, help="examples, build-nanogpt's way")
    parser.add_argument("--work", type=Path, help="keep the data and checkpoint here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="evaluate_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    hellaswag = work / "hellaswag_shakespeare.jsonl"
    found = make_examples(CORPUS.read_text(encoding="utf-8"), args.examples)
    hellaswag.write_text("".join(json.dumps(e) + "\n" for e in found), encoding="utf-8")
    common = ("--config", REPO / "configs" / "shakespeare.toml", "--prepare.source", CORPUS,
              "--data.dataset_dir", work / "data", "--checkpointing.dirpath", work / "ckpt",
              "--log_dir", work / "logs")  # fmt: skip
    checkpoint = work / "ckpt" / "ckpt_last_00000001.pt"
    if not checkpoint.is_file():
        run("prepare", *common, cwd=work)
        run("fit", *common, *GPT2_124M, "--model.learning_rate", "0", "--model.min_lr", "0",
            "--trainer.max_steps", "1", "--data.val_batches", "1", "--checkpointing.keep.best",
            "0", "--checkpointing.keep.last", "1", "--trainer.enable_progress_bar", "false",
            cwd=work)  # fmt: skip
    print(f"{len(found)} examples, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("| evaluate.batch_size | row tokens | scoring s | tokens/s | command wall s | figures |")
    print("|---:|---:|---:|---:|---:|---|")
    for batch in args.batch_sizes.split(","):
        started = time.perf_counter()
        result = run("evaluate", *common, "--ckpt_path", checkpoint, "--evaluate.hellaswag",
                     hellaswag, "--evaluate.batch_size", batch, cwd=work)  # fmt: skip
        wall = time.perf_counter() - started
        scored = SCORED.search(result.stderr)
        assert scored, result.stderr
        tokens, seconds = int(scored[1].replace(",", "")), float(scored[2])
        print(f"| {batch} | {tokens:,} | {seconds:.1f} | {tokens / seconds:,.0f} | {wall:.1f} | "
              f"{result.stdout.strip()} |", flush=True)  # fmt: skip
    if args.reference:
        tokens, seconds = build_nanogpt_way(checkpoint, work, hellaswag, args.reference)
        print(f"build-nanogpt's way, first {args.reference} examples: {tokens:,} row tokens in "
              f"{seconds:.1f} s, {tokens / seconds:,.0f} tokens/s")  # fmt: skip


if __name__ == "__main__":
    main()
