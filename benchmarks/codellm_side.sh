#!/usr/bin/env bash
# codellm's side of vllm_side.sh: one `codellm serve` configured as vllm_side.sh's vLLM is (256 sequences, 8k
# context, the default KV pool: what fits), measured by the same clients: prefix_bench's shared and agent workloads,
# then serve_bench's decode-heavy sweep (128 in, 256 out). The server's log keeps its memory and capture lines.
# Usage: bash benchmarks/codellm_side.sh HOME SHAPE OUTDIR [TAG [serve options...]]   (HOME holds model "bench")
set -uo pipefail
source "$(dirname "$0")/wait_ready.sh"
home=${1:?usage: codellm_side.sh HOME SHAPE OUTDIR [TAG [serve options...]]}
shape=${2:?shape, as in serve_bench.SHAPES}
out=${3:?outdir}
tag=${4:-}
shift $(( $# < 4 ? $# : 4 ))
port=${PORT:-12999}
mkdir -p "$out"
log="$out/codellm_server_${shape}${tag}.log"
t0=$(date +%s)
CODELLM_HOME=$home python3 -m codellm.cli.main serve --port "$port" --model bench --slots 256 --num-ctx 8192 \
    --max-queue 512 --log-level info "$@" > "$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
wait_ready codellm "$server" "$port" "$t0" "$log"; ok=$?
grep -v "^ " "$log" | grep -iE "KV cache|device memory|fail|out of memory" | cut -c1-220 | head -8
[ $ok = 0 ] || exit 1
url="http://127.0.0.1:$port"
timeout "${PREFIX_TIMEOUT:-300}" python3 benchmarks/prefix_bench.py --url "$url" --model bench --tokenizer "$home/src" \
    --shape "$shape" --tag="$tag" --out "$out" | tail -22
echo "prefix_bench: rc ${PIPESTATUS[0]}"
timeout "${SERVE_TIMEOUT:-240}" python3 benchmarks/serve_bench.py --url "$url" --shape "$shape" \
    --concurrency "${CONCURRENCY:-1,64,256}" --tag="_side$tag" --out "$out" > "$out/serve_bench$tag.log" 2>&1
echo "serve_bench: rc $?"; grep "^| codellm" "$out"/serve_"$shape"_*side"$tag".md
echo "codellm up $(( $(date +%s) - t0 )) s in all"
