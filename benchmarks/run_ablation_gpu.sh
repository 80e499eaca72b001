#!/usr/bin/env bash
# The ablation of docs/architecture.md §8 at the tmlr-187m shape on one GPU, from nothing but this repo and
# the Python environment it runs in (no network): docs/ablation.md reports its numbers.
#
#   PYTHONPATH=$PWD bash benchmarks/run_ablation_gpu.sh            # from the repo root
#
# 1. corpus: the built-in corpus (Python's own docs) + the prose of the installed packages
#    (`builtin:site-packages:$CORPUS_MB`: docstrings, .md/.rst/.txt; see complexity/data/builtin_corpus.py;
#    about 1 s per MB on 16 cores)
# 2. a 32k byte-level BPE tokenizer on it; 3. token shards (1% held out)
# 4. `complexity ablate`: the four arms (dense / token-routed+mu / token-routed / learned router+mu),
#    parameter-matched, bf16-mixed, compiled, one seed; ~20M tokens per arm at SCALE=1
#    (305 steps x 65,536 tokens; ~100 s per arm at ~200k tokens/s on an H100)
# 5. results.md, loss.png, experts.png (+ ablation.json, each run's metrics.jsonl) copied to $OUT
#
# Every stage is skipped when its output exists and the ablation resumes where it stopped, so
# rerunning the same command after an interruption continues it.
#
# Environment knobs (defaults in brackets):
#   SCALE [1]         multiplies the step count (tokens per arm = 20M x SCALE)
#   STEPS             explicit step count (overrides SCALE)
#   SEEDS [1]         seeds per arm          ARMS ["dense routed_mu routed learned_mu"]
#   SEQ [2048]  MICRO [8]  TOKENS_PER_STEP [65536]   sequence length, micro-batch, global batch
#   COMPILE [true]    torch.compile the decoder layers
#   CORPUS_MB [100]   million bytes of site-packages prose to train on (~25M tokens)
#   TOKENIZER_MB [30] ... of which the tokenizer is trained on the first (same order)
#   WORK [/tmp/complexity-ablation]   corpus, tokenizer, data and run folders
#   OUT [$WORK/out]   where the results are copied
#   ONLY_DATA         stop after the corpus/tokenizer/data stages (~3 min of CPU work on 16 cores)
#   SPIKE             also run the spike experiment with a corrupted batch at this step (into $WORK/spike)
#   PYTHON [python]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD}"

PY=${PYTHON:-python}
SCALE=${SCALE:-1}
SEEDS=${SEEDS:-1}
ARMS=${ARMS:-"dense routed_mu routed learned_mu"}
SEQ=${SEQ:-2048}
MICRO=${MICRO:-8}
TOKENS_PER_STEP=${TOKENS_PER_STEP:-65536}
COMPILE=${COMPILE:-true}
CORPUS_MB=${CORPUS_MB:-100}
TOKENIZER_MB=${TOKENIZER_MB:-30}
WORK=${WORK:-/tmp/complexity-ablation}
OUT=${OUT:-$WORK/out}
STEPS=${STEPS:-$("$PY" -c "print(max(20, round(20_000_000 * float('$SCALE') / $TOKENS_PER_STEP)))")}
WARMUP=$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))
EVAL_EVERY=$(( STEPS / 5 > 0 ? STEPS / 5 : 1 ))
CKPT_EVERY=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))
CLI=("$PY" -m complexity.cli)

mkdir -p "$WORK" "$OUT"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

"$PY" - <<'EOF'
import platform, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} | {gpu}")
EOF

if [ ! -f "$WORK/tokenizer/tokenizer.json" ]; then
  stamp "tokenizer: 32k byte-level BPE on builtin + builtin:site-packages:$TOKENIZER_MB"
  "${CLI[@]}" tokenizer train --builtin --input "builtin:site-packages:$TOKENIZER_MB" --vocab-size 32000 \
    --out "$WORK/tokenizer" --no-progress --force
fi
if [ ! -f "$WORK/data/manifest.json" ]; then
  stamp "data: tokenize and pack (1% of documents held out)"
  "${CLI[@]}" data prepare --builtin --builtin-site-packages "$CORPUS_MB" --tokenizer "$WORK/tokenizer" \
    --out "$WORK/data" --no-progress
fi
"${CLI[@]}" data inspect "$WORK/data"
if [ -n "${ONLY_DATA:-}" ]; then stamp "ONLY_DATA set: stopping before the ablation"; exit 0; fi

# shellcheck disable=SC2086
ABLATE=("${CLI[@]}" ablate --preset tmlr-187m --data "$WORK/data" --steps "$STEPS" --seeds "$SEEDS"
  training.seq_len="$SEQ" training.micro_batch_size="$MICRO" training.tokens_per_step="$TOKENS_PER_STEP"
  training.precision=bf16-mixed training.compile="$COMPILE" training.device=cuda
  optim.lr=6e-4 optim.min_lr=6e-5 schedule.warmup_steps="$WARMUP"
  eval.every="$EVAL_EVERY" eval.max_batches=20 checkpoint.every="$CKPT_EVERY" checkpoint.keep_last=1
  logging.progress=false --arms $ARMS)

stamp "ablation: $STEPS steps x $TOKENS_PER_STEP tokens per arm ($(( STEPS * TOKENS_PER_STEP )) tokens), arms: $ARMS"
"${ABLATE[@]}" --out "$WORK/ablation"
cp "$WORK/ablation/results.md" "$WORK/ablation/loss.png" "$WORK/ablation/ablation.json" "$OUT/"
[ -f "$WORK/ablation/experts.png" ] && cp "$WORK/ablation/experts.png" "$OUT/"
mkdir -p "$OUT/metrics"
for run in "$WORK/ablation/runs"/*/; do
  cp "$run/metrics.jsonl" "$OUT/metrics/$(basename "$run").jsonl"
done

if [ -n "${SPIKE:-}" ]; then
  stamp "spike experiment: corrupted batch at step $SPIKE (LR x 10), spike guard off"
  "${ABLATE[@]}" --out "$WORK/spike" --spike "$SPIKE"
  mkdir -p "$OUT/spike"
  cp "$WORK/spike/results.md" "$WORK/spike/spike.png" "$WORK/spike/loss.png" "$OUT/spike/"
fi

stamp "done: results in $OUT"
cat "$OUT/results.md"
