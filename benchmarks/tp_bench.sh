#!/usr/bin/env bash
# Tensor-parallel serving on several GPUs of one host, measured by serve_bench's client: the Llama-2-7B shape at
# TP=1 and TP=2 (1 / 32 / 128 streams, the same model directory), then the Llama-3-70B shape (random bf16, written
# tensor by tensor) split over N GPUs, which no one GPU holds. NVLink multicast stays off.
# Usage: bash benchmarks/tp_bench.sh OUTDIR [N [PARTS]]   (N: the 70B split, default 4; PARTS: any of "7b 70b")
set -uo pipefail
out=${1:?usage: tp_bench.sh OUTDIR [N [PARTS]]}
n=${2:-4}
parts=${3:-7b 70b}
export NCCL_NVLS_ENABLE=0
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
if [[ " $parts " == *" 7b "* ]]; then
timeout 900 python3 benchmarks/serve_bench.py --build llama2-7b --home /root/tp7 --concurrency 1,32,128 --tag _tp1 \
    --out "$out" > "$out/tp1.log" 2>&1
echo "TP=1: rc $?"
timeout 900 python3 benchmarks/serve_bench.py --shape llama2-7b --home /root/tp7 --concurrency 1,32,128 --tag _tp2 \
    --server-args "--tensor-parallel 2" --out "$out" > "$out/tp2.log" 2>&1
echo "TP=2: rc $?"
fi
if [[ " $parts " == *" 70b "* ]]; then
timeout 1800 python3 benchmarks/serve_bench.py --build llama3-70b --home /root/tp70 --concurrency 1,32 --tag "_tp$n" \
    --server-args "--tensor-parallel $n" --out "$out" > "$out/tp70.log" 2>&1
echo "70B at TP=$n: rc $?"
fi
grep "| codellm" "$out"/serve_*.md
