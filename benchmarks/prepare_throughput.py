"""Prepare throughput and peak memory on a generated corpus (100 MB by default).

Writes a folder of English-like documents into a temporary directory, then runs the streaming
preparer (`ml_playground.prepare.prepare_corpus`, both passes: scan + tokenize + write) in a
fresh child process per tokenizer and reports MB/s, tokens/s and the child's peak resident
memory (`ru_maxrss`). The baseline is the same child importing everything and preparing nothing,
so "over baseline" is what streaming the corpus costs.

    uv run python benchmarks/prepare_throughput.py                  # char, and gpt2 if available
    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken_cache uv run python benchmarks/prepare_throughput.py
    uv run python benchmarks/prepare_throughput.py --mb 20 --chunk-bytes 1048576 --threads 2

gpt2 runs only when tiktoken can load it (network, or TIKTOKEN_CACHE_DIR with its files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_WORDS = (
    "the of and to in a is that for it as was with be by on not he i this are or his from at "
    "which but have an they you were her she there one all we their been has would when if "
    "king queen sword crown thou thee hath doth lord lady night day love war heart blood "
    "river stone fire gold wind field honour answer speak citizen Rome Romeo Juliet 1599 42"
)
WORDS = _WORDS.split(" ")
PUNCT = np.array([" ", " ", " ", " ", " ", " ", ", ", ". ", "; ", "! ", "? ", ".\n", ":\n"])

CHILD = """
import json, os, resource, sys, time
from pathlib import Path
from ml_playground.prepare import PrepareConfig, TiktokenTokenizer, prepare_corpus
args = json.loads(sys.argv[1])
char = args["tokenizer"] == "char"
tok = "char" if char else TiktokenTokenizer(args["tokenizer"])
files = sorted(Path(args["corpus"]).glob("*.txt"))
settings = PrepareConfig(
    source=args["corpus"], source_sha256="", val_fraction=0.1, document_separator="",
    tokenizer="char" if char else "tiktoken:" + args["tokenizer"], split=args["split"],
    chunk_bytes=args["chunk_bytes"], num_threads=args["threads"], text_field="text",
    max_documents=0)
start = time.perf_counter()
meta = {"train_tokens": 0, "val_tokens": 0}
if not args["baseline"]:
    meta = prepare_corpus(files, tok, Path(args["out"]), settings, seed=0)
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "tokens": meta["train_tokens"] + meta["val_tokens"],
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def make_corpus(folder: Path, total_mb: int, files: int, seed: int = 0) -> int:
    """``files`` documents of English-like text, ``total_mb`` MB in all; returns the bytes."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    per_file = total_mb * 1_000_000 // files
    total = 0
    for i in range(files):
        with open(folder / f"doc{i:04d}.txt", "w", encoding="utf-8") as f:
            written = 0
            while written < per_file:
                n = 200_000
                text = "".join(
                    np.char.add(
                        words[rng.integers(0, len(words), n)], PUNCT[rng.integers(0, len(PUNCT), n)]
                    )
                )
                text = text[: per_file - written]
                f.write(text)
                written += len(text)
        total += (folder / f"doc{i:04d}.txt").stat().st_size
    return total


def run_child(args: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpt2_available() -> bool:
    probe = "import tiktoken; tiktoken.get_encoding('gpt2')"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=100, help="corpus size in MB")
    parser.add_argument("--files", type=int, default=100, help="number of documents (files)")
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20, help="prepare.chunk_bytes")
    parser.add_argument("--threads", type=int, default=0, help="prepare.num_threads (0: CPUs)")
    parser.add_argument("--split", default="documents", choices=("contiguous", "documents"))
    opts = parser.parse_args()

    tokenizers = ["char"] + (["gpt2"] if gpt2_available() else [])
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    with tempfile.TemporaryDirectory(prefix="prepare_bench_") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        t0 = time.perf_counter()
        size = make_corpus(corpus, opts.mb, opts.files)
        print(
            f"# corpus: {size / 1e6:.1f} MB in {opts.files} files ({time.perf_counter() - t0:.0f} s to generate)"
        )
        print(
            f"# split={opts.split} chunk_bytes={opts.chunk_bytes} "
            f"threads={opts.threads or os.cpu_count()}"
        )
        print("| tokenizer | tokens | seconds | MB/s | tokens/s | peak RSS | over baseline |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for tokenizer in tokenizers:
            common = {
                "tokenizer": tokenizer,
                "corpus": str(corpus),
                "out": str(Path(tmp) / f"out_{tokenizer}"),
                "split": opts.split,
                "chunk_bytes": opts.chunk_bytes,
                "threads": opts.threads,
            }
            base = run_child({**common, "baseline": True})
            res = run_child({**common, "baseline": False})
            rss, base_rss = res["maxrss_kb"] / 1024, base["maxrss_kb"] / 1024
            print(
                f"| {tokenizer} | {res['tokens']:,} | {res['seconds']:.1f} | "
                f"{size / 1e6 / res['seconds']:.1f} | {res['tokens'] / res['seconds']:,.0f} | "
                f"{rss:.0f} MiB | {rss - base_rss:+.0f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
