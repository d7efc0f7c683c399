#!/usr/bin/env bash
# The engine's GPU-only checks and its headline benchmarks, in one sitting on one GPU: the Triton kernels and
# CUDA-graph paths against their references, speculation's greedy equality, then the decode-heavy serve_bench
# (each level twice: the 64- and 256-stream levels follow the host CPU) and the edit workload with and without
# n-gram speculation. Usage: bash benchmarks/gpu_engine_checks.sh [OUTDIR [PARTS]]   (results and logs land in
# OUTDIR; PARTS: any of "tests serve spec", default all three: about 2, 5 and 8 minutes; "prefill", not in the
# default: the Llama-3-8B shape built in OUTDIR/h8, one packed-prefill replay over the model's own pointwise ops, over
# the fused norm with compiled rotary and over the Triton kernels, each alone and with decode rows riding
# (prefill_bench.py), then the 8B decode-heavy sweep, about 8 minutes in all; H8=DIR builds or
# reuses the 8B model there instead, so that its 16 GB stay out of an OUTDIR that is copied back)
set -uo pipefail
out=${1:-/tmp/codellm-gpu-checks}
parts=${2:-tests serve spec}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
if [[ " $parts " == *" tests "* ]]; then
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py \
    -k "split_kv or greedy or first_tokens or pipelined or compiled or fused or packed or riding or layouts" > "$out/tests_engine.txt" 2>&1
echo "engine tests: rc $? ($(tail -1 "$out/tests_engine.txt"))"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_speculation.py \
    -k "greedy or catches or adapters" > "$out/tests_speculation.txt" 2>&1
echo "speculation tests: rc $? ($(tail -1 "$out/tests_speculation.txt"))"
fi
if [[ " $parts " == *" serve "* ]]; then
timeout 420 python3 benchmarks/serve_bench.py --build llama3.2-1b --home "$out/serve-home" \
    --concurrency 1,1,64,64,256,256 --out "$out" > "$out/serve_bench.log" 2>&1
echo "serve_bench: rc $?"; grep "| codellm" "$out"/serve_*.md
fi
if [[ " $parts " == *" prefill "* ]]; then
h8=${H8:-$out/h8}
[ -d "$h8/src" ] || python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
import serve_bench; serve_bench.build_model('llama3-8b', Path('$h8'))" > "$out/build_8b.log" 2>&1
timeout 420 python3 benchmarks/prefill_bench.py --home "$h8" --variants eager,fused-compiled,fused --rows 64,256 \
    --out "$out/prefill_8b.json" > "$out/prefill_bench.log" 2>&1
echo "prefill_bench: rc $?"; grep -E "^(eager|fused|fused-compiled) " "$out/prefill_bench.log"
CODELLM_STEP_LOG="$out/steps_8b.jsonl" timeout 480 python3 benchmarks/serve_bench.py --shape llama3-8b --home "$h8" --concurrency 1,64,256 \
    --out "$out" > "$out/serve_bench_8b.log" 2>&1
echo "serve_bench 8B: rc $?"; grep "| codellm" "$out"/serve_llama3-8b_*.md
fi
if [[ " $parts " == *" spec "* ]]; then
timeout 600 python3 benchmarks/spec_bench.py --shape llama3.2-1b --steps 900 --lr 4e-4 --ways off,ngram \
    --concurrency 1,8,32 --requests 192 --home "$out/spec-home" --out "$out" > "$out/spec_bench.log" 2>&1
echo "spec_bench: rc $?"; grep -E "^\| [0-9]" "$out"/spec_edit*.md
fi
