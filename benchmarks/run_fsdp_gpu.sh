#!/usr/bin/env bash
# FSDP2 on several GPUs of one host against one GPU of the same host, on the shipped recipes:
# scaling (tokens/s per GPU), peak memory per GPU, loss curves at the same global batch, and a
# checkpoint written on N GPUs resumed on 1 GPU and the reverse. BENCHMARKS.md reports its numbers.
#
#   PYTHONPATH=$PWD DATA=data/builtin-32k bash benchmarks/run_fsdp_gpu.sh     # from the repo root
#
# Environment knobs (defaults in brackets):
#   DATA               a prepared data folder (`complexity data prepare`), required
#   RECIPES ["tmlr-187m 1b"]   recipes/NAME.toml to run
#   STEPS [30]         optimizer steps per run; checkpoints at STEPS/2 and at the end
#   TOKENS_PER_STEP [131072]   global batch (the same on 1 and N GPUs: accumulation makes up the rest)
#   NGPU [2]           GPUs for the torchrun runs
#   RESUME [1]         also run the N->1 and 1->N GPU resumes
#   EXTRA              more recipe overrides for every run (section.key=value, space-separated)
#   WORK [/tmp/complexity-fsdp]  run folders;  OUT [$WORK/out]  where summaries and metrics are copied
#
# NVLink multicast stays as the environment sets it (this script sets no NCCL variables).
set -euo pipefail
: "${DATA:?set DATA to a prepared data folder}"
RECIPES=${RECIPES:-"tmlr-187m 1b"}
STEPS=${STEPS:-30}
TOKENS_PER_STEP=${TOKENS_PER_STEP:-131072}
NGPU=${NGPU:-2}
RESUME=${RESUME:-1}
WORK=${WORK:-/tmp/complexity-fsdp}
OUT=${OUT:-$WORK/out}
HALF=$((STEPS / 2))
mkdir -p "$WORK" "$OUT"

common=(--data "$DATA" --max-steps "$STEPS" "training.tokens_per_step=$TOKENS_PER_STEP" "training.dp=\"fsdp\""
        "checkpoint.every=$HALF" "checkpoint.keep_last=4" "checkpoint.export_final=false" "eval.every=0"
        "eval.at_end=false" "logging.every=5" "logging.tensorboard=false")
read -r -a extra <<< "${EXTRA:-}"
common+=("${extra[@]}")
one_gpu() { python -m complexity.cli train "$@"; }
n_gpu() { torchrun --standalone --nproc-per-node "$NGPU" -m complexity.cli train "$@"; }

# A copy of RUN that keeps only the checkpoint at step HALF, to be resumed from there.
fork_at_half() {
  rm -rf "$2" && cp -r "$1" "$2"
  find "$2/checkpoints" -maxdepth 1 -name 'step_*' ! -name "$(printf 'step_%08d' "$HALF")" -exec rm -rf {} +
}

for recipe in $RECIPES; do
  echo "== $recipe: 1 GPU"
  one_gpu --config "recipes/$recipe.toml" --out "$WORK/$recipe-1gpu" --overwrite "${common[@]}"
  echo "== $recipe: $NGPU GPUs (FSDP2)"
  n_gpu --config "recipes/$recipe.toml" --out "$WORK/$recipe-${NGPU}gpu" --overwrite "${common[@]}"
  runs=("$recipe-1gpu" "$recipe-${NGPU}gpu")
  if [ "$RESUME" = 1 ]; then
    echo "== $recipe: the $NGPU-GPU checkpoint of step $HALF resumed on 1 GPU"
    fork_at_half "$WORK/$recipe-${NGPU}gpu" "$WORK/$recipe-${NGPU}to1"
    one_gpu --config "recipes/$recipe.toml" --out "$WORK/$recipe-${NGPU}to1" --resume "${common[@]}"
    echo "== $recipe: the 1-GPU checkpoint of step $HALF resumed on $NGPU GPUs"
    fork_at_half "$WORK/$recipe-1gpu" "$WORK/$recipe-1to${NGPU}"
    n_gpu --config "recipes/$recipe.toml" --out "$WORK/$recipe-1to${NGPU}" --resume "${common[@]}"
    runs+=("$recipe-${NGPU}to1" "$recipe-1to${NGPU}")
  fi
  for run in "${runs[@]}"; do
    mkdir -p "$OUT/$run"
    cp "$WORK/$run/summary.json" "$WORK/$run/metrics.jsonl" "$WORK/$run/resolved.json" "$OUT/$run/"
  done
done

python - "$OUT" "$NGPU" $RECIPES <<'PY'
import json
import sys
from pathlib import Path

out, ngpu, recipes = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
report = {}
for recipe in recipes:
    runs = {}
    for d in sorted(out.glob(f"{recipe}-*")):
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}
        runs[d.name.removeprefix(recipe + "-")] = {"summary": json.loads((d / "summary.json").read_text()),
                                                   "losses": losses}
    one, many = runs["1gpu"], runs[f"{ngpu}gpu"]
    per_gpu_1 = one["summary"]["tokens_per_s_per_device"]
    per_gpu_n = many["summary"]["tokens_per_s_per_device"]
    steps = sorted(set(one["losses"]) & set(many["losses"]))
    entry = {
        "tokens_per_s_1gpu": one["summary"]["tokens_per_s"], f"tokens_per_s_{ngpu}gpu": many["summary"]["tokens_per_s"],
        "speedup": many["summary"]["tokens_per_s"] / one["summary"]["tokens_per_s"],
        "per_gpu_efficiency": per_gpu_n / per_gpu_1,
        "peak_memory_gib_1gpu": one["summary"]["peak_memory_gib"], f"peak_memory_gib_{ngpu}gpu": many["summary"]["peak_memory_gib"],
        "losses": {s: {name: r["losses"].get(s) for name, r in runs.items()} for s in steps},
        "max_rel_loss_diff_1_vs_n": max(abs(one["losses"][s] - many["losses"][s]) / abs(one["losses"][s]) for s in steps),
    }
    report[recipe] = entry
    print(json.dumps({k: v for k, v in entry.items() if k != "losses"}))
    for s in steps:
        print(recipe, s, "  ".join(f"{name} {r['losses'].get(s, float('nan')):.4f}" for name, r in runs.items()))
(out / "fsdp_report.json").write_text(json.dumps(report, indent=2))
PY
