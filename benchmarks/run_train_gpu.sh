#!/usr/bin/env bash
# Training on one GPU, in one call of about 6 minutes on an H200 (its numbers go to BENCHMARKS.md,
# "Training throughput"):
#   1. the GPU suite's training tests (compile modes x scopes with gradient accumulation against
#      eager, the automatic setting in bf16-mixed with eval between steps, a resume under CUDA
#      graphs, activation checkpointing under CUDA graphs, pure bf16, grouped GEMM); for time
#      without the max-autotune modes, the runs without accumulation and the other model
#      variants (`scripts/test --gpu` runs them all);
#   2. data: the built-in corpus with a 32k BPE tokenizer (about 750k train tokens; the loader
#      repeats it, reshuffled each epoch);
#   3. `complexity train --config recipes/tmlr-187m.toml` as shipped (compile on, mode and scope
#      auto: whole model with CUDA graphs on one GPU; 524,288 tokens per step = 32 micro-batches of
#      8 x 2048, gradient accumulation as the recipe implies), STEPS steps with a per-step log;
#   4. the same with training.compile=false (eager) for the first EAGER_STEPS steps (same
#      schedule: --stop-after), and the per-step loss agreement of the two runs.
#
#   PYTHONPATH=$PWD OUT=/tmp/out bash benchmarks/run_train_gpu.sh       # from the repo root
#
# Environment knobs (defaults in brackets): STEPS [30]  EAGER_STEPS [8]  WARMUP [10] (the recipe's
# 100 exceeds a short run)  TESTS [1] (0 skips step 1)  WORK [/tmp/complexity-train-gpu]
# DATA [unset: step 2 builds $WORK/data32k; set: a prepared dataset folder, step 2 skipped]
# OUT [$WORK/out]: gpu_tests.log, train.log, auto-summary.json, auto-run.json, auto-metrics.jsonl,
# eager-metrics.jsonl, compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD}"
PY=${PYTHON:-python3}
STEPS=${STEPS:-30}
EAGER_STEPS=${EAGER_STEPS:-8}
WARMUP=${WARMUP:-10}
TESTS=${TESTS:-1}
WORK=${WORK:-/tmp/complexity-train-gpu}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1

if [ "$TESTS" = 1 ]; then
  echo "== 1. GPU suite, training tests"
  "$PY" -m pytest -q -m gpu tests/gpu/test_train_gpu.py tests/gpu/test_grouped_gemm_gpu.py \
    -k "not autotune and not accum1 and not every_model_variant" \
    -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || echo "GPU TESTS FAILED (see gpu_tests.log)"
fi

if [ -z "${DATA:-}" ]; then
  echo "== 2. data: built-in corpus, 32k tokenizer"
  "$PY" -m complexity.cli tokenizer train --builtin --vocab-size 32000 --min-frequency 1 --out "$WORK/tok32k" \
    --no-progress --force
  "$PY" -m complexity.cli data prepare --builtin --tokenizer "$WORK/tok32k" --out "$WORK/data32k"
  DATA=$WORK/data32k
fi

common=(--config recipes/tmlr-187m.toml --data "$DATA" --max-steps "$STEPS" --overwrite
        "schedule.warmup_steps=$WARMUP" "logging.every=1" "eval.at_end=false")
echo "== 3. tmlr-187m as shipped (compile auto), $STEPS steps"
"$PY" -m complexity.cli train --out "$WORK/auto" "${common[@]}" 2>&1 | tee "$OUT/train.log"
echo "== 4. the same, eager, first $EAGER_STEPS steps"
"$PY" -m complexity.cli train --out "$WORK/eager" --stop-after "$EAGER_STEPS" "${common[@]}" \
  training.compile=false 2>&1 | tee -a "$OUT/train.log"

cp "$WORK/auto/summary.json" "$OUT/auto-summary.json"
cp "$WORK/auto/run.json" "$OUT/auto-run.json"
cp "$WORK/auto/metrics.jsonl" "$OUT/auto-metrics.jsonl"
cp "$WORK/eager/metrics.jsonl" "$OUT/eager-metrics.jsonl"
"$PY" - "$WORK" "$OUT/compare.json" <<'EOF'
import json, sys
from pathlib import Path

from complexity.train.metrics import read_metrics, train_losses

work, out = Path(sys.argv[1]), Path(sys.argv[2])
auto, eager = train_losses(read_metrics(work / "auto")), train_losses(read_metrics(work / "eager"))
steps = sorted(set(auto) & set(eager))
rel = {s: abs(auto[s] - eager[s]) / abs(eager[s]) for s in steps}
summary = json.loads((work / "auto/summary.json").read_text())
eager_summary = json.loads((work / "eager/summary.json").read_text())
result = {
    "steps_compared": len(steps), "max_relative_loss_difference": max(rel.values()), "tolerance": 1e-2,
    "within_tolerance": max(rel.values()) <= 1e-2, "per_step": {s: [auto[s], eager[s], rel[s]] for s in steps},
    "auto": {k: summary[k] for k in ("tokens_per_s", "mfu", "mfu_peak_flops_per_device", "mfu_peak", "compile",
                                     "grad_accum", "peak_memory_gib", "device")},
    "eager": {k: eager_summary[k] for k in ("tokens_per_s", "mfu", "compile")},
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=2))
EOF
