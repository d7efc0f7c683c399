#!/usr/bin/env bash
# The device memory of a `codellm serve` start, sampled twice a second, beside the server's log: where a default KV
# pool, the warmup and the CUDA graphs put the GPU's memory. Usage: bash benchmarks/memory_timeline.sh HOME OUTDIR
# [serve options...]   (HOME: a registry holding model "bench", e.g. serve_bench.py --build's)
set -uo pipefail
home=${1:?home}; out=${2:?outdir}; shift 2
mkdir -p "$out"
(while true; do echo "$(date +%s.%N | cut -c1-14) $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)"; sleep 0.5; done) > "$out/smi.txt" &
smi=$!
CODELLM_HOME=$home python3 -m codellm.cli.main serve --port 12999 --model bench --log-level info "$@" > "$out/serve.log" 2>&1 &
server=$!
t0=$(date +%s)
for _ in $(seq 400); do sleep 0.5; curl -sf localhost:12999/health > /dev/null && break; kill -0 $server 2>/dev/null || break; done
echo "ready after $(( $(date +%s) - t0 )) s"
curl -s localhost:12999/health | head -c 500; echo
curl -s localhost:12999/v1/completions -H 'content-type: application/json' \
    -d '{"model":"bench","prompt":[5,6,7,8],"max_tokens":8}' | head -c 300; echo
kill -TERM $server; wait $server; kill $smi
grep -v "^ " "$out/serve.log" | grep -iE "kv|memory|GiB|graph|error|captur|fits" | cut -c1-220 | head -20
awk 'NR % 4 == 1' "$out/smi.txt" | awk '{print $2}' | tr '\n' ' '; echo
