#!/usr/bin/env bash
# lm-eval-harness (local-completions) against `lorafuse serve` on a skill world.
#
#   examples/lm_eval/run.sh WORLD OUT
#
# Starts `lorafuse serve` on WORLD's base and LoRAs in the background, waits for /health, and
# for each variant writes the tasks' data from WORLD (make_data.py) into OUT/<variant>/data and
# runs lm_eval's two tasks (tasks/*.yaml) once for the base model and once for the task's LoRA;
# then stops the server and writes OUT/summary.json and OUT/summary.md (summarize.py). Variants:
# `plain`, the prompts as lm-eval sends them (no <s>), and `bos`, every prompt starting with the
# world's <s> as in its training and its own evaluation. lm_eval's results and per-sample logs
# are under OUT/<variant>/results/<model>/.
#
# Settings (environment): TASK (world task and LoRA scored, default math), LIMIT (first N test
# rows, default all), VARIANTS (default "plain bos"), PORT (default 8123), LM_EVAL (lm_eval
# command, default lm_eval),
# LORAFUSE (lorafuse command, default lorafuse), PYTHON (for the two scripts, default python3),
# SERVE_ARGS (more `lorafuse serve` options).
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 WORLD OUT" >&2
  exit 2
fi
HERE="$(cd "$(dirname "$0")" && pwd)"
WORLD="$(cd "$1" && pwd)"
mkdir -p "$2"
OUT="$(cd "$2" && pwd)"
TASK="${TASK:-math}"
PORT="${PORT:-8123}"
LM_EVAL="${LM_EVAL:-lm_eval}"
LORAFUSE="${LORAFUSE:-lorafuse}"
PYTHON="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# shellcheck disable=SC2086
$LORAFUSE serve --base "$WORLD/base" --adapters "$WORLD/loras" --tokenizer "$WORLD/tokenizer" \
  --model-name base --port "$PORT" --log-level warning ${SERVE_ARGS:-} >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

HEALTHY=0
for _ in $(seq 1 600); do
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "lorafuse serve exited (port $PORT taken?); its log:" >&2
    cat "$OUT/serve.log" >&2
    exit 1
  fi
  if "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" \
      2>/dev/null; then
    HEALTHY=1
    break
  fi
  sleep 1
done
sleep 1
if [ "$HEALTHY" != 1 ] || ! kill -0 "$SERVER" 2>/dev/null; then
  echo "lorafuse serve did not become healthy on port $PORT; its log:" >&2
  cat "$OUT/serve.log" >&2
  exit 1
fi

for VARIANT in ${VARIANTS:-plain bos}; do
  FLAGS=()
  [ "$VARIANT" = bos ] && FLAGS=(--bos)
  "$PYTHON" "$HERE/make_data.py" "$WORLD" "$OUT/$VARIANT/data" --task "$TASK" ${LIMIT:+--limit "$LIMIT"} \
    "${FLAGS[@]}"
  cd "$OUT/$VARIANT"  # the tasks' data_files (data/*.jsonl) are relative to the working folder
  for MODEL in base "$TASK"; do
    echo "== lm_eval: $VARIANT, $MODEL"
    # shellcheck disable=SC2086
    $LM_EVAL --model local-completions \
      --model_args "model=$MODEL,base_url=http://127.0.0.1:$PORT/v1/completions,tokenized_requests=True,tokenizer_backend=remote,num_concurrent=1,max_retries=1" \
      --tasks lorafuse_world_mc,lorafuse_world_gen --include_path "$HERE/tasks" \
      --output_path "$OUT/$VARIANT/results/$MODEL" --log_samples
  done
done

"$PYTHON" "$HERE/summarize.py" "$OUT" --command "examples/lm_eval/run.sh $1 $2 (TASK=$TASK${LIMIT:+ LIMIT=$LIMIT})"
