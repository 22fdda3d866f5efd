"""Start-up cost of torch.compile: first training step and later steps, per compile scope.

Each variant runs in a fresh process with an empty inductor cache, so the first step includes
the whole compilation, as at the start of a real run.

    uv run python benchmarks/compile_time.py                      # GPU recipe's model, batch 4
    uv run python benchmarks/compile_time.py --batch 64 --bf16    # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("eager", "model", "blocks")


def measure(scope: str, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from ml_playground.model.gpt import GPT, GPTConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=args.block, vocab_size=65, n_layer=args.layers, n_head=args.heads,
        n_embd=args.width, dropout=0.2, bias=False,
    )  # fmt: skip
    model = GPT(config).to(device)
    if scope == "model":
        model.compile()
    elif scope == "blocks":
        for block in model.transformer.h:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    x = torch.randint(0, 65, (args.batch, args.block), device=device)
    y = torch.randint(0, 65, (args.batch, args.block), device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    )
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "later_ms": 1000 * statistics.median(times[2:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    print(f"model {args.layers} x {args.width}, block {args.block}, batch {args.batch}, "
          f"{'bf16' if args.bf16 else 'fp32'}")  # fmt: skip
    print(f"{'scope':8} {'first step':>11} {'later steps':>12}")
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                env=env, capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:8} {result['first_s']:10.1f}s {result['later_ms']:10.1f}ms")


if __name__ == "__main__":
    main()
