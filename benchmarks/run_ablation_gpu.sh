#!/usr/bin/env bash
# The ablation of docs/architecture.md §8 at the tmlr-187m shape on one GPU, from nothing but this repo and
# the Python environment it runs in (no network): docs/ablation.md reports its numbers.
#
#   PYTHONPATH=$PWD bash benchmarks/run_ablation_gpu.sh            # from the repo root
#
# 1. corpus: the built-in corpus (Python's own docs) + the prose of the installed packages
#    (`builtin:site-packages:$CORPUS_MB`: docstrings, .md/.rst/.txt; see complexity/data/builtin_corpus.py;
#    about a minute on 16 cores)
# 2. a 32k byte-level BPE tokenizer on it; 3. token shards (1% held out)
# 4. `complexity ablate`: the six arms (dense / token-routed+mu / token-routed / learned router+mu /
#    INL / hash-routed top-2), parameter-matched, bf16-mixed, compiled (the trainer's fastest
#    setting for one GPU), three seeds; 25M tokens per run at SCALE=1 (382 steps x 65,536 tokens;
#    ~3.5 minutes a run on an H100, 2 of them in steps at 270-360k tokens/s, so 18 runs take more
#    than one 10-minute call: rerun the command, see "Resume")
# 5. results.md, loss.png, experts.png, ablation.json, each run's metrics.jsonl copied to $OUT, and
#    $OUT/ablation.tgz: the ablation folder without its weights (finished runs only)
#
# Resume. Every stage is skipped when its output exists and the ablation resumes where it stopped,
# so rerunning the same command after an interruption continues it (a TERM or INT stops it cleanly:
# the current run is checkpointed). A job with a time limit on a machine that keeps nothing sets
# TIME_LIMIT instead of cutting the script: it starts no run that could not finish in time, so no
# run's work is lost with the machine. On another machine, extract ablation.tgz into $WORK/ablation
# and copy the tokenizer folder to $WORK/tokenizer first: the finished runs are skipped and the
# report is written from their files (experts.png from each run's expert_map.npz, no weights).
# The finished runs of the published ablation are kept in docs/ablation/state/ (same layout as WORK):
# `cp -r docs/ablation/state/. $WORK/` continues it; the tokenizer stage rebuilds the same tokenizer.
# `complexity ablate` refuses to mix runs trained on a different corpus (sha256 in the manifest).
#
# Environment knobs (defaults in brackets):
#   SCALE [1]         multiplies the step count (tokens per run = 25M x SCALE)
#   STEPS             explicit step count (overrides SCALE)
#   SEEDS [3]         seeds per arm (or a list: 0,2)         ARMS ["dense routed_mu routed learned_mu inl hash_top2"]
#   SEQ [2048]  MICRO [8]  TOKENS_PER_STEP [65536]   sequence length, micro-batch, global batch
#   COMPILE [true]    torch.compile (the trainer picks scope and mode for the hardware)
#   CORPUS_MB [140]   million bytes of site-packages prose to train on (one epoch >= 25M tokens
#                     where the packages have that much prose; the script says how many epochs)
#   TOKENIZER_MB [30] ... of which the tokenizer is trained on the first (same order)
#   WORK [/tmp/complexity-ablation]   corpus, tokenizer, data and run folders
#   OUT [$WORK/out]   where the results are copied
#   ONLY_DATA         stop after the corpus/tokenizer/data stages
#   SPIKE             also run the spike experiment with a corrupted batch at this step (into
#                     $WORK/spike), SPIKE_SEEDS [1] seeds per arm
#   TIME_LIMIT        seconds from the script's start: no run is started that would not finish by
#                     then (`complexity ablate --time-limit`: a run takes RUN_SECONDS, or as long as
#                     the longest run this call), and at the limit itself the run in flight is
#                     checkpointed; either way the finished runs are packed and the script exits 143
#   PRESET [tmlr-187m]  DEVICE [cuda]  PRECISION [bf16-mixed]   the model and where it trains
#   PYTHON [python]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD}"

PY=${PYTHON:-python}
SCALE=${SCALE:-1}
SEEDS=${SEEDS:-3}
ARMS=${ARMS:-"dense routed_mu routed learned_mu inl hash_top2"}
SEQ=${SEQ:-2048}
MICRO=${MICRO:-8}
TOKENS_PER_STEP=${TOKENS_PER_STEP:-65536}
COMPILE=${COMPILE:-true}
CORPUS_MB=${CORPUS_MB:-140}
TOKENIZER_MB=${TOKENIZER_MB:-30}
WORK=${WORK:-/tmp/complexity-ablation}
OUT=${OUT:-$WORK/out}
STEPS=${STEPS:-$("$PY" -c "import math; print(max(20, math.ceil(25_000_000 * float('$SCALE') / $TOKENS_PER_STEP)))")}
WARMUP=$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))
# four evaluations spread over the run, then the final one (STEPS / 5 put the fifth two steps before it)
EVAL_EVERY=$(( (STEPS + 4) / 5 ))
CKPT_EVERY=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))
CLI=("$PY" -m complexity.cli)
for knob in TIME_LIMIT RUN_SECONDS; do  # whole seconds, or unset (bash arithmetic would read a word as 0)
  if [ -n "${!knob:-}" ] && ! [[ "${!knob}" =~ ^[0-9]+$ ]]; then
    echo "run_ablation_gpu.sh: $knob: '${!knob}' is not a whole number of seconds" >&2; exit 2
  fi
done

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
"$PY" - "$WORK/data" "$(( STEPS * TOKENS_PER_STEP ))" <<'EOF'
import json, sys
train = json.load(open(f"{sys.argv[1]}/manifest.json"))["splits"]["train"]["tokens"]
print(f"a run reads {int(sys.argv[2]):,} tokens: {int(sys.argv[2]) / train:.2f} epochs of {train:,} training tokens")
EOF
if [ -n "${ONLY_DATA:-}" ]; then stamp "ONLY_DATA set: stopping before the ablation"; exit 0; fi

# shellcheck disable=SC2086
ABLATE=("${CLI[@]}" ablate --preset "${PRESET:-tmlr-187m}" --data "$WORK/data" --steps "$STEPS"
  training.seq_len="$SEQ" training.micro_batch_size="$MICRO" training.tokens_per_step="$TOKENS_PER_STEP"
  training.precision="${PRECISION:-bf16-mixed}" training.compile="$COMPILE" training.device="${DEVICE:-cuda}"
  optim.lr=6e-4 optim.min_lr=6e-5 schedule.warmup_steps="$WARMUP"
  eval.every="$EVAL_EVERY" eval.max_batches=20 checkpoint.every="$CKPT_EVERY" checkpoint.keep_last=1
  logging.progress=false --arms $ARMS)

# A TERM or INT (a job's time limit) is passed to `complexity ablate`, which checkpoints the run it
# is training and stops; the script waits for that, packs what is finished and exits 143.
# TIME_LIMIT: ablate itself starts no run that could not finish in the time left (exit 75), and a
# watcher TERMs this script (the trap checkpoints the run in flight) at the limit itself.
stopped=0
ablate() {  # DIR ARGS...: the ablation folder, ablate's arguments
  local dir=$1 watcher= limit=() left
  shift
  if [ -n "${TIME_LIMIT:-}" ]; then
    left=$(( t0 + TIME_LIMIT - $(date +%s) ))
    limit=(--time-limit $(( left > 1 ? left : 1 )) ${RUN_SECONDS:+--run-seconds "$RUN_SECONDS"})
  fi
  "${ABLATE[@]}" --out "$dir" "${limit[@]}" "$@" &
  local pid=$! rc=0
  trap 'kill -TERM $pid 2>/dev/null; stopped=1' TERM INT
  if [ -n "${TIME_LIMIT:-}" ]; then watch_time_limit & watcher=$!; fi
  wait $pid || rc=$?
  while kill -0 $pid 2>/dev/null; do rc=0; wait $pid || rc=$?; done  # a trapped signal ends a wait early
  trap - TERM INT
  if [ -n "$watcher" ]; then kill $watcher 2>/dev/null || true; fi
  return $rc
}
watch_time_limit() {
  while sleep 1; do
    if [ $(( t0 + TIME_LIMIT - $(date +%s) )) -le 0 ]; then
      stamp "TIME_LIMIT: ${TIME_LIMIT}s reached: stopping the run in flight"; kill -TERM $$; return
    fi
  done
}
# OUT/<folder>.tgz: the ablation.json and the finished runs, without weights (nor the run's copy of
# WORK/tokenizer, which the same corpus rebuilds byte for byte), to continue elsewhere
pack() {
  local dir=$1 runs=()
  if [ ! -f "$dir/ablation.json" ]; then stamp "nothing to pack: $dir has no plan yet"; return; fi
  for run in "$dir"/runs/*/; do [ -f "$run/done.json" ] && runs+=("runs/$(basename "$run")"); done
  tar czf "$OUT/$(basename "$dir").tgz" -C "$dir" --exclude checkpoints --exclude final --exclude tokenizer ablation.json "${runs[@]}"
  stamp "packed $OUT/$(basename "$dir").tgz: ${#runs[@]} finished run(s)"
}
finish_or_stop() {  # DIR RC
  pack "$1"
  if [ "$stopped" = 1 ]; then stamp "stopped by a signal: rerun the same command to continue"; exit 143; fi
  if [ "$2" = 75 ]; then stamp "TIME_LIMIT: the next run would not finish in time: rerun the same command to continue"; exit 143; fi
  if [ "$2" != 0 ]; then stamp "complexity ablate failed (exit $2)"; exit "$2"; fi
}

stamp "ablation: $STEPS steps x $TOKENS_PER_STEP tokens per run ($(( STEPS * TOKENS_PER_STEP )) tokens), $SEEDS seed(s), arms: $ARMS"
rc=0; ablate "$WORK/ablation" --seeds "$SEEDS" || rc=$?
finish_or_stop "$WORK/ablation" $rc
cp "$WORK/ablation/results.md" "$WORK/ablation/loss.png" "$WORK/ablation/ablation.json" "$OUT/"
[ -f "$WORK/ablation/experts.png" ] && cp "$WORK/ablation/experts.png" "$OUT/"
mkdir -p "$OUT/metrics"
for run in "$WORK/ablation/runs"/*/; do
  cp "$run/metrics.jsonl" "$OUT/metrics/$(basename "$run").jsonl"
done

if [ -n "${SPIKE:-}" ]; then
  stamp "spike experiment: corrupted batch at step $SPIKE (LR x 10), spike guard off, ${SPIKE_SEEDS:-1} seed(s)"
  rc=0; ablate "$WORK/spike" --seeds "${SPIKE_SEEDS:-1}" --spike "$SPIKE" || rc=$?
  finish_or_stop "$WORK/spike" $rc
  mkdir -p "$OUT/spike"
  cp "$WORK/spike/results.md" "$WORK/spike/spike.png" "$WORK/spike/loss.png" "$OUT/spike/"
fi

stamp "done: results in $OUT"
cat "$OUT/results.md"
