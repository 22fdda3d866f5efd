"""`ml-playground ARGS` in this process, then the GPU's peak allocated memory:

python benchmarks/peak_memory.py fit --config configs/finetune_shakespeare.toml ...
"""

from __future__ import annotations

import sys

import torch

from ml_playground.cli import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory allocated: {peak:.2f} GiB ({torch.cuda.get_device_name()})")
    sys.exit(code)
