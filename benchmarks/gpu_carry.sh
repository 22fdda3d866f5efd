#!/usr/bin/env bash
# Prepare, on this machine, what benchmarks/gpu_check.sh needs on a GPU machine that has no
# network: wheels of the packages its image lacks (.whl/) and the tinyshakespeare corpus
# (.gpu/). Both folders are git-ignored through .git/info/exclude; carry them with the run.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for folder in /.whl/ /.gpu/; do
  grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >>"$exclude"
done
# The GPU image's Python is 3.12 with torch, lightning, numpy, tiktoken, tensorboard, pytest,
# hypothesis; pydantic, jsonargparse (LightningCLI's parser), tomli-w, safetensors and a recent
# filelock (MarkerSoftFileLock) are missing. Versions as in uv.lock.
python_version=${GPU_PYTHON_VERSION:-3.12}
for package in pydantic pydantic-core annotated-types typing-inspection typing-extensions \
  jsonargparse docstring-parser typeshed-client tomli-w safetensors filelock; do
  version=$(uv export --frozen --no-hashes --no-dev 2>/dev/null | grep -i "^$package==" | cut -d' ' -f1)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${version:-$package}"
done
mkdir -p .gpu
# tiktoken's GPT-2 BPE files (the fine-tuning step's data), as tiktoken's cache names them.
if [ -d ../shared/data/tiktoken_cache ]; then
  cp -r ../shared/data/tiktoken_cache .gpu/
fi
shared=../shared/data/tinyshakespeare/input.txt
if [ -f "$shared" ]; then
  cp "$shared" .gpu/input.txt
else
  curl -fsSL -o .gpu/input.txt \
    https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
fi
ls -la .whl .gpu
