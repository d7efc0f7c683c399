#!/usr/bin/env bash
# vLLM beside codellm in one sitting, on the model directory codellm was measured on: one `vllm serve` (bf16,
# CUDA graphs and torch.compile, prefix caching on, 256 sequences, 8k context, cached-token counts reported)
# measured by the same clients as codellm: prefix_bench's shared and agent workloads, then serve_bench's
# decode-heavy sweep (128 in, 256 out). vLLM must be installed in $VSITE (../shared/device/vllm: receive.sh
# for each piece, then install.sh), its client script in $VLLM_BIN (default .vllm/bin).
# Usage: bash benchmarks/vllm_side.sh MODEL_DIR SHAPE OUTDIR [TAG]
set -uo pipefail
source "$(dirname "$0")/wait_ready.sh"
set -m  # the server gets its own process group: API server and engine core stop together
model=${1:?usage: vllm_side.sh MODEL_DIR SHAPE OUTDIR [TAG]}
shape=${2:?shape, as in serve_bench.SHAPES}
out=${3:?outdir}
tag=${4:-}
site=${VSITE:-/root/vsite}
port=${PORT:-8011}
mkdir -p "$out"
log="$out/vllm_server_${shape}${tag}.log"
t0=$(date +%s)
env PYTHONPATH="$site" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1 \
    python3 -m vllm.entrypoints.cli.main serve "$model" --host 127.0.0.1 --port "$port" --served-model-name bench \
    --dtype bfloat16 --max-num-seqs 256 --max-model-len 8192 --gpu-memory-utilization 0.90 --seed 0 \
    --tokenizer-mode hf --enable-prompt-tokens-details --uvicorn-log-level warning --disable-uvicorn-access-log \
    ${EXTRA_ARGS:-} > "$log" 2>&1 &
server=$!
stop() { kill -TERM -- "-$server" 2>/dev/null; for _ in $(seq 30); do kill -0 -- "-$server" 2>/dev/null || break; sleep 1; done
         kill -KILL -- "-$server" 2>/dev/null; wait "$server" 2>/dev/null; }
trap stop EXIT
wait_ready vllm "$server" "$port" "$t0" "$log"; ok=$?
grep -E "FLASH_ATTN|TRITON_ATTN|KV cache|Maximum concurrency" "$log" | cut -c1-200 | head -8
[ $ok = 0 ] || exit 1
url="http://127.0.0.1:$port"
PYTHONPATH=$PWD timeout "${PREFIX_TIMEOUT:-300}" python3 benchmarks/prefix_bench.py --url "$url" --model bench \
    --tokenizer "$model" --shape "$shape" --server vllm-0.26 --tag="$tag" --out "$out"
echo "prefix_bench: rc $?"
PYTHONPATH=$PWD timeout "${SERVE_TIMEOUT:-240}" python3 "${VLLM_BIN:-.vllm/bin}/vllm_client.py" --url "$url" --model bench \
    --model-dir "$model" --concurrency "${CONCURRENCY:-1,64,256}" --prompt-len 128 --max-tokens 256 --out "$out" --serve-bench benchmarks/serve_bench.py --tag="_${shape}${tag}" \
    --server-args "prefix caching on, --max-model-len 8192" 2>&1 | tail -8
echo "decode sweep: rc ${PIPESTATUS[0]}; vLLM up $(( $(date +%s) - t0 )) s in all"
