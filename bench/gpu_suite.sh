#!/usr/bin/env bash
# Every GPU figure in one command, bounded to 8 minutes on one H200:
#
#   bash bench/gpu_suite.sh            # appends a dated "GPU suite" section to bench/RESULTS.md
#   RESULTS=/tmp/r.md bash bench/gpu_suite.sh
#
# 1. Skipping efficiency per dispatch strategy (bench/inference.py) for routed ResNet-110 and
#    DRNet S at batch 32 / 256 / 1024, half of the routed MACs running, twice: with XLA's
#    command buffers (CUDA graphs) recording conditionals and while loops
#    (--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE) and without them (-CONDITIONAL,-WHILE).
#    Each model and XLA_FLAGS setting is a separate process (70 s each): XLA reads its flags once,
#    and a model that overruns cannot take the other's figures with it.
# 2. The dispatcher alone on a ResNet-110-like stack (bench/dispatch.py), same batches.
# 3. Train-step images/s, compile seconds and routed / router-free ratio (bench/train_step.py) at
#    each config's own (the papers') batch size.
#
# Compile times are real: JAX's persistent compilation cache is switched off for these runs.
# Each step runs under `timeout` within one overall deadline (SUITE_BUDGET_S, default 470 s), so
# a step that overruns is cut and reported, never the whole suite; its partial output is kept.
# Override the interpreter with PYTHON=..., the budget with SUITE_BUDGET_S=....
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-bench/RESULTS.md}
BUDGET_S=${SUITE_BUDGET_S:-470}
LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
unset JAX_COMPILATION_CACHE_DIR
export DYNROUTE_JAX_CACHE=off
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# Let each process take memory as it needs it: the steps run one after the other anyway.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

COND_ON="--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE"
COND_OFF="--xla_gpu_enable_command_buffer=-CONDITIONAL,-WHILE"
BATCHES="32 256 1024"
STRATEGIES="dense batch_cond compact chunk"

start=$SECONDS
steps=()

# run NAME LIMIT_S XLA_FLAGS COMMAND...: runs one step under the remaining budget, logs to a file.
run() {
  local name=$1 limit=$2 xla_flags=$3
  shift 3
  local left=$((BUDGET_S - (SECONDS - start)))
  local log="$LOG_DIR/$name.log"
  steps+=("$name")
  if ((left < 20)); then
    echo "skipped: the suite's ${BUDGET_S} s budget is spent" >"$log"
    echo "== $name: skipped (budget spent)"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s): XLA_FLAGS='$xla_flags' $*"
  {
    echo "\$ XLA_FLAGS='$xla_flags' $*"
    local t0=$SECONDS
    XLA_FLAGS="$xla_flags" timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1
    local rc=$?
    if ((rc == 124 || rc == 137)); then
      echo "(cut after ${limit} s: timeout)"
    elif ((rc != 0)); then
      echo "(exit status $rc)"
    fi
    echo "(wall $((SECONDS - t0)) s)"
  } | tee "$log" | grep -v -E '^(W|I)[0-9]{4} ' | tail -n 60
}

platform=$("$PYTHON" -c 'import jax; d = jax.devices(); print(f"{len(d)} x {d[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")' 2>/dev/null || echo "unknown (jax could not start)")
driver=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
echo "platform: $platform${driver:+; $driver}"

for model in r110 drnet_s; do
  run "inference_${model}_cond_on" 70 "$COND_ON" \
    "$PYTHON" bench/inference.py --models "$model" --batch $BATCHES --fractions 0.5 \
    --repeats 3 --strategies $STRATEGIES
  run "inference_${model}_cond_off" 70 "$COND_OFF" \
    "$PYTHON" bench/inference.py --models "$model" --batch $BATCHES --fractions 0.5 \
    --repeats 3 --strategies $STRATEGIES
done
run dispatch_cond_on 60 "$COND_ON" \
  "$PYTHON" bench/dispatch.py --batch $BATCHES --blocks 18 --fractions 1.0 0.5 --repeats 3 \
  --variants $STRATEGIES
run train_step 120 "" \
  "$PYTHON" bench/train_step.py --models drnet_S,codinet_resnet110,codinet_resnet32 --steps 5

total=$((SECONDS - start))
{
  echo
  echo "## GPU suite, $(date -u +%Y-%m-%d) ($platform${driver:+; $driver})"
  echo
  echo "\`bash bench/gpu_suite.sh\`: ${total} s wall. Efficiency = realised / ideal speed-up over"
  echo "dense masking, half of the routed MACs running; \"cond on\" records conditionals and while"
  echo "loops into command buffers (\`$COND_ON\`), \"cond off\" keeps them out (\`$COND_OFF\`)."
  for name in "${steps[@]}"; do
    echo
    echo "### $name"
    echo
    echo '```'
    grep -v -E '^(W|I)[0-9]{4} ' "$LOG_DIR/$name.log"
    echo '```'
  done
} >>"$RESULTS"
echo "appended to $RESULTS (${total} s); raw logs in $LOG_DIR"
