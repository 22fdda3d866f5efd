"""Write a random GPT-2 124M in the Hugging Face layout (config.json + model.safetensors), for
`model.init_from` on machines that cannot reach the hub (benchmarks/gpu_check.sh, finetune):

    python benchmarks/pretrained_folder.py OUT_DIR [--n-layer 12 --n-head 12 --n-embd 768]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ml_playground.export import hf_config, hf_weights
from ml_playground.model.gpt import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    args = parser.parse_args()
    shape = dict(block_size=1024, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=50257, dropout=0.0, bias=True, activation="gelu_tanh", **shape)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(model.state_dict(), args.n_layer, 50257)
    save_file(weights, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config({**shape, "activation": "gelu_tanh"}, 50257, 50256)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"{args.out}: GPT-2 shape {shape}, {model.num_params():,} parameters (random)")


if __name__ == "__main__":
    main()
