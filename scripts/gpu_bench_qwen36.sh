#!/usr/bin/env bash
# The GPU measurement of issue 4, prepared to run in one go on a lent H200 (device tool) or any GPU box
# with torch, transformers >= 5.6, peft and pyyaml: bf16 LoRA on the full-size Qwen3.6-27B architecture
# (random weights, built from its config), sequence length 2048, without and with flash-linear-attention.
#
# Beforehand, here (pure-Python wheels, 1.5 MB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
# Then: run(command="bash scripts/gpu_bench_qwen36.sh", carry=[".whl"], timeout_s=540)
# Results: $OUT (device tool) or bench/ as JSON, plus one README table row per run on stdout.
set -euo pipefail
out=${OUT:-bench}
export PYTHONUNBUFFERED=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no GPU"; print(torch.cuda.get_device_name())'
python3 scripts/bench_finetune.py --full-size-qwen3.6 --seq-len 2048 --warmup 1 --steps 3 --no-fast-kernels --out "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fla-site .whl/*.whl
  export PYTHONPATH=/tmp/fla-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c 'import fla; print("flash-linear-attention", fla.__version__)'
python3 scripts/bench_finetune.py --full-size-qwen3.6 --seq-len 2048 --warmup 1 --steps 3 --out "$out"
