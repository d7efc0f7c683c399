#!/usr/bin/env bash
# One GPU sitting for the Llama-3-8B shape, codellm beside vLLM, in calls of at most 10 minutes that each start within
# 30 s of the last (the machine is given back when idle, and /root with it). Every call runs from the checkout's root
# and writes under $OUT.
#   1. checks   (carry .whl .gpu): the GPU's wheels into /root/site; the 8B model built in /root/h8 while the GPU
#               tests of the prefill kernels, layouts and riding graphs run; prefill_bench (the Triton kernels against
#               the compiled rotary, decode rows riding against apart). Decides the serve option for step 2:
#               --mixed-steps where the riding tests passed and every riding replay beat prefill plus decode.
#   2. codellm: codellm_side.sh with that option (prompt-reuse workloads, then the decode-heavy 1/64/256 sweep).
#   3. receive.sh for .vllm/.vw1 and .vw2, a call each (carry .vllm/.vwN .vllm/SHA256SUMS .vllm/bin).
#   4. vllm     (carry .vllm/.vw3 .vllm/SHA256SUMS .vllm/bin): the last piece, install.sh, vllm_side.sh.
# Usage: bash benchmarks/sitting_8b.sh checks|codellm|vllm
set -uo pipefail
part=${1:?usage: sitting_8b.sh checks|codellm|vllm}
out=${OUT:?OUT: where results go}
h8=${H8:-/root/h8}
tag=${TAG:-_r38}
t0=$(date +%s)
at() { echo "$(( $(date +%s) - t0 )) s"; }
if [ ! -f /root/site/.done ] && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site \
        .whl/*.whl .gpu/*.whl && touch /root/site/.done
fi
export PYTHONPATH=/root/site:$PWD
case $part in
checks)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
    [ -d "$h8/src" ] || (python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
import serve_bench; serve_bench.build_model('llama3-8b', Path('$h8'))" > "$out/build_8b.log" 2>&1; echo "8B built: rc $? at $(at)") &
    build=$!
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k "fused or packed or riding or layouts" \
        > "$out/tests_gpu.txt" 2>&1
    tests=$?
    echo "GPU tests: rc $tests at $(at): $(tail -1 "$out/tests_gpu.txt")"; grep -E "^(FAILED|ERROR)" "$out/tests_gpu.txt" | head -8
    wait $build
    timeout $(( 540 - ($(date +%s) - t0) )) python3 benchmarks/prefill_bench.py --home "$h8" --variants fused-compiled,fused \
        --rows 64,256 --packings 16x128,1x2048,4x512+2048 --top 10 --reps 10 --out "$out/prefill_8b$tag.json" \
        > "$out/prefill_bench.log" 2>&1
    bench=$?
    echo "prefill_bench: rc $bench at $(at)"; grep -E "^fused" "$out/prefill_bench.log"
    python3 - "$tests" "$bench" "$out/prefill_8b$tag.json" > /root/serve_options.txt <<'PY'
import json, sys
tests, bench, path = sys.argv[1:]
ok = tests == "0" and bench == "0"
if ok:
    ok = all(v["riding"] < v["apart"] for v in json.load(open(path))["variants"]["fused"]["riding_ms"].values())
print("--mixed-steps" if ok else "")
PY
    echo "serve options for the side-by-side: '$(cat /root/serve_options.txt)'" ;;
codellm)
    # shellcheck disable=SC2046
    CODELLM_STEP_LOG=$out/steps_side.jsonl SERVE_TIMEOUT=200 PREFIX_TIMEOUT=240 \
        bash benchmarks/codellm_side.sh "$h8" llama3-8b "$out" "$tag" $(cat /root/serve_options.txt 2>/dev/null) 2>&1 | tail -40
    echo "codellm side: done at $(at)" ;;
vllm)
    bash .vllm/bin/receive.sh .vllm/.vw3 > "$out/receive3.log" 2>&1 && bash .vllm/bin/install.sh .vllm > "$out/vllm_install.log" 2>&1
    echo "vLLM installed: rc $? at $(at)"; tail -6 "$out/vllm_install.log"
    SERVE_TIMEOUT=200 PREFIX_TIMEOUT=240 bash benchmarks/vllm_side.sh "$h8/src" llama3-8b "$out" "$tag" 2>&1 | tail -40
    echo "vLLM side: done at $(at)" ;;
*) echo "unknown part: $part" >&2; exit 2 ;;
esac
