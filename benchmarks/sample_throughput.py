"""Sampling speed: ml-playground's batched, KV-cached `generate` against a naive loop.

The naive loop is what nanoGPT's sample.py does: one sample at a time, and for every new token
a full forward pass over the (cropped) context. Both produce `--samples` x `--tokens` tokens
with the same model, temperature and top-k.

    uv run python benchmarks/sample_throughput.py                           # CPU recipe shape
    uv run python benchmarks/sample_throughput.py --ckpt checkpoints/shakespeare_char/ckpt_best_...pt

Without --ckpt the model is randomly initialised with the config's shape (speed does not
depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ml_playground.checkpoint_reading import load_checkpoint
from ml_playground.configuration import load_config
from ml_playground.model.gpt import GPT, GPTConfig
from ml_playground.module import gpt_config
from ml_playground.sampling import model_from_checkpoint

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def naive(model: GPT, prompt: torch.Tensor, samples: int, tokens: int, top_k: int) -> None:
    block = model.config.block_size
    for _ in range(samples):
        idx = prompt.clone()
        for _ in range(tokens):
            logits, _ = model(idx[:, -block:])
            logits = logits[:, -1, :] / 0.8
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1)
            idx = torch.cat((idx, nxt), dim=1)


def batched(model: GPT, prompt: torch.Tensor, samples: int, tokens: int, top_k: int) -> None:
    keep = model.default_refresh_keep()  # what `ml-playground sample` uses
    model.generate(
        prompt.repeat(samples, 1), tokens, temperature=0.8, top_k=top_k, refresh_keep=keep
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "shakespeare_char.toml")
    parser.add_argument("--ckpt", type=Path, help="a checkpoint to sample from")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--top_k", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.ckpt:
        model = model_from_checkpoint(args.ckpt, load_checkpoint(args.ckpt))
    else:
        cfg = load_config([args.config])
        torch.manual_seed(0)
        model = GPT(GPTConfig(**vars(gpt_config(cfg.model, vocab_size=65))))
    device = torch.device(args.device)
    model = model.to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    produced = args.samples * args.tokens
    results = {}
    for name, fn in (("batched+kv", batched), ("naive", naive)):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(model, prompt, args.samples, args.tokens, args.top_k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[name] = produced / statistics.median(times)
    print(f"device: {device}  model block {model.config.block_size}, "
          f"{args.samples} samples x {args.tokens} tokens")  # fmt: skip
    for name, rate in results.items():
        print(f"{name:12} {rate:10.0f} tokens/s")
    print(f"speed-up: {results['batched+kv'] / results['naive']:.1f}x")


if __name__ == "__main__":
    main()
