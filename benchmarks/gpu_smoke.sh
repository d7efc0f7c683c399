#!/usr/bin/env bash
# GPU smoke run of the trainer: QLoRA (nf4) `codellm train` with an eval split, then `codellm merge`, on
# the tiny test model, in a scratch registry. Usage: bash benchmarks/gpu_smoke.sh [OUTDIR [TRAIN OPTIONS...]]
# e.g. bash benchmarks/gpu_smoke.sh /tmp/smoke --compile --checkpoint-layers 1
set -euo pipefail
out=${1:-/tmp/codellm-gpu-smoke}
shift || true
export CODELLM_HOME=$out/home
mkdir -p "$out"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
from codellm.engine import tiny
out = Path(sys.argv[1])
tiny.build(out / "tiny")
rows = [{"instruction": f"Write a Python function add_{i} that adds two numbers.", "input": "",
         "output": f"def add_{i}(a, b):\n    return a + b\n"} for i in range(40)]
(out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(out / "Modelfile").write_text(f"FROM {out / 'tiny'}\n")
PY
python3 -m codellm create tiny -f "$out/Modelfile"
python3 -m codellm train tiny --data "$out/data.jsonl" --name tiny-qlora --epochs 2 --batch-size 4 --eval-split 0.1 --max-len 128 --lr 3e-3 "$@"
python3 -m codellm merge tiny-qlora --as tiny-merged
python3 -m codellm run tiny-qlora "Write a Python function add_3 that adds two numbers." --local | head -5
grep -h eval_loss "$CODELLM_HOME"/train/*/metrics.jsonl | cut -c1-200
