#!/usr/bin/env bash
# Every GPU check in one run, for a machine with one NVIDIA GPU (an H100/H200 lent for minutes):
# CUDA correctness tests, GPT-2 124M throughput (fit vs plain loop, MFU), the shakespeare_char
# GPU recipe end to end (time to val/loss <= 1.47), and sampling speed. Run from the repo root:
#
#   bash benchmarks/gpu_carry.sh        # here, once: wheels + corpus into .whl/ and .gpu/
#   bash benchmarks/gpu_check.sh        # there: every step; logs go to $OUT (or ./gpu_check_out)
#   bash benchmarks/gpu_check.sh gpt2 loop loop-eager   # only these steps
#
# Steps, most important first: gpt2 loop loop-eager tests step compile gpt2-b32 sample finetune. All
# of them take about 12-15 minutes, more than one 10-minute device call: run the first three,
# then the rest. Each step has its own time limit so one slow step cannot eat the others' time.
# Uses python3 from PATH (PYTHON=... to choose another).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
py=${PYTHON:-python3}
corpus=${CORPUS:-.gpu/input.txt}
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$work/inductor"

if [ -d .whl ]; then  # packages the machine lacks (pydantic), carried as wheels
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" .whl/*.whl || exit 1
  export PYTHONPATH="$work/site"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

steps=" $* "
step() {  # step NAME TITLE: true (and a heading) if NAME was asked for, or no names were given
  [ "$steps" = "  " ] || [[ "$steps" == *" $1 "* ]] || return 1
  echo
  echo "=== $1: $2  ($(date +%T), ${SECONDS}s)"
}
run() {  # run LIMIT_SECONDS LOG COMMAND...: output to the console and to $out/LOG
  local limit=$1 log=$2
  shift 2
  timeout "$limit" "$@" 2>&1 | tee "$out/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "!!! exit $rc: $*"
}

echo "=== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$py -c "import sys, torch, lightning, pydantic, numpy; print('python', sys.version.split()[0], \
'| torch', torch.__version__, '| lightning', lightning.__version__, '| pydantic', \
pydantic.__version__, '| numpy', numpy.__version__, '|', torch.cuda.get_device_name())" || exit 1

if step gpt2 "GPT-2 124M, batch 12 x 1024, bf16, compile, random tokens: fit vs plain loop"; then
  run 240 gpt2_b12.log $py benchmarks/train_throughput.py --config configs/gpt2_124m.toml \
    --random-data 50257 --set trainer.accumulate_grad_batches 1 --steps 60 --rounds 2 --warmup 15
fi

loop() {  # loop NAME FLAGS...: the GPU recipe from a cold start, then its time to val/loss 1.47
  local name=$1
  shift
  local start
  start=$(date +%s.%N)
  run 240 "$name.log" $py -m ml_playground loop \
    --config configs/shakespeare_char_gpu.toml --prepare.source "$corpus" \
    --data.dataset_dir "$work/shakespeare_char" --checkpointing.dirpath "$work/$name/ckpt" \
    --log_dir "$work/$name/logs" --trainer.enable_progress_bar false "$@"
  $py benchmarks/time_to_loss.py "$work/$name/logs/shakespeare_char_gpu" --start "$start" \
    --end "$(date +%s.%N)" --target 1.47 | tee "$out/$name-time.log"
}
if step loop "shakespeare_char GPU recipe, whole loop from a cold start (val/loss <= 1.47)"; then
  loop loop_compiled
fi
if step loop-eager "the same without torch.compile (does compiling pay within a minute?)"; then
  loop loop_eager --model.compile false
fi

if step loop-muon "the GPU recipe with Muon (muon_lr 0.04, AdamW 3e-3): sooner to 1.47?"; then
  loop loop_muon --model.optimizer muon --model.muon_lr 0.04 --model.learning_rate 3e-3 \
    --model.min_lr 3e-4
fi

if step tests "CUDA correctness tests (AdamW and Muon: bf16, compile, resume)"; then
  run 300 tests.log $py -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi

if step step "shakespeare_char GPU recipe step: fit vs plain loop (compile, then CUDA graphs)"; then
  for mode in default reduce-overhead; do
    run 150 "step_$mode.log" $py benchmarks/train_throughput.py \
      --config configs/shakespeare_char_gpu.toml --set data.dataset_dir "$work/shakespeare_char" \
      --set prepare.source "$corpus" --set model.compile_mode "$mode" \
      --steps 150 --rounds 2 --warmup 30
  done
fi

if step compile "torch.compile start-up, GPU recipe's model: whole model vs each block"; then
  run 240 compile_time.log $py benchmarks/compile_time.py --batch 64 --bf16
fi

if step gpt2-b32 "GPT-2 124M, batch 32: fit vs plain loop"; then
  run 240 gpt2_b32.log $py benchmarks/train_throughput.py --config configs/gpt2_124m.toml \
    --random-data 50257 --set trainer.accumulate_grad_batches 1 --set data.batch_size 32 \
    --steps 30 --rounds 2 --warmup 10
fi

if step sample "sampling: batched KV cache vs naive loop"; then
  run 120 sample.log $py benchmarks/sample_throughput.py
fi

if step finetune "finetune_shakespeare.toml, 10 steps in bf16 from a GPT-2 124M-shaped folder"; then
  # No machine here reaches the hub: a random GPT-2 124M in the Hugging Face layout instead.
  export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.gpu/tiktoken_cache}
  run 120 finetune_folder.log $py benchmarks/pretrained_folder.py "$work/gpt2_124m"
  data=(--prepare.source "$corpus" --data.dataset_dir "$work/shakespeare_bpe")
  run 120 finetune_prepare.log $py -m ml_playground prepare \
    --config configs/finetune_shakespeare.toml "${data[@]}"
  run 420 finetune.log $py benchmarks/peak_memory.py fit \
    --config configs/finetune_shakespeare.toml "${data[@]}" \
    --model.init_from "$work/gpt2_124m" --trainer.max_steps 10 \
    --checkpointing.dirpath "$work/finetune/ckpt" --log_dir "$work/finetune/logs" \
    --trainer.enable_progress_bar false
fi

echo
echo "=== done (${SECONDS}s)"
