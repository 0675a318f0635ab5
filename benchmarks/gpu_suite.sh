#!/usr/bin/env bash
# The GPU checks in one command, for one H200 (or any CUDA GPU) machine with Python 3.12, torch and triton installed
# and no package registry: only this checkout is used. Under 8 minutes; every step has its own timeout, a failing or
# hanging step is recorded and the next one runs. Results: $OUT if set, else gpu_suite_out/ (status.tsv, one log and
# JSON per step, summary.md).
#
#   bash benchmarks/gpu_suite.sh              # on the GPU machine, from anywhere
#   bash benchmarks/gpu_suite.sh --dry-run    # print the steps without running them (any machine)
#   bash benchmarks/gpu_suite.sh --cpu        # the same steps on the CPU, shrunk: checks the plumbing only
#
# Steps: env (GPU, versions), import (moeserve importable: already, an editable install without deps, or a shim dir
# of symlinks, since pyproject maps moeserve.kernels -> kernels/moeserve_kernels/ and moeserve.training ->
# training/), kernels (the Triton kernel tests compiled on CUDA: MOESERVE_KERNELS=triton, TRITON_INTERPRET unset; fp32 and the bf16/fp16
# tests), parity (engine vs transformers greedy on CUDA, tiny checkpoints + the built-in base), roofline-make (a
# random OLMoE-1B-7B-shaped checkpoint), decode (decode step times at B = 1 8 32 128 against the roofline, with the
# engine's default: CUDA graphs for decode steps) and decode-eager (the same with --enforce-eager).
# Environment: T_<STEP> overrides a step's timeout (T_KERNELS=200), BUDGET the whole suite's seconds (470: a step
# gets at most what is left), PY the python (python3), ROOFLINE_DIR where the random checkpoint goes
# (/tmp/olmoe-1b-7b-rand, reused), LAYERS fewer layers than OLMoE's 16, CONTEXT the decode prompt length (512).
# With $OUT set (the device tool brings back at most 8 files) the logs end up in one logs.tar.gz beside the JSON.
set -u
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: gpu_suite.sh [--dry-run | --cpu]"; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RES=${OUT:-$ROOT/gpu_suite_out}
if [ "$MODE" = dry ]; then
  SCRATCH=/tmp/gpu_suite.dry
else
  mkdir -p "$RES" && RES=$(cd "$RES" && pwd)
  SCRATCH=$(mktemp -d /tmp/gpu_suite.XXXXXX)  # the import shim, outside $RES (links do not travel back)
fi
export PY=${PY:-python3} ROOT RES SCRATCH
cd "$ROOT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
BUDGET=${BUDGET:-470}
if [ "$MODE" = cpu ]; then
  DEVICE=cpu DTYPE=float32 SHAPE=olmoe-mini BATCHES="1 8" CONTEXT=${CONTEXT:-64} STEPS=4
  export MOESERVE_KERNELS=torch  # compiled Triton needs a GPU; the interpreter is the CPU tests' business
else
  DEVICE=cuda DTYPE=bfloat16 SHAPE=olmoe-1b-7b BATCHES="1 8 32 128" CONTEXT=${CONTEXT:-512} STEPS=32
  LAYERS=${LAYERS:-8}  # half of OLMoE's 16 layers: the roofline ratio is per layer, and half the bytes to write
fi
MODEL=${ROOFLINE_DIR:-/tmp/${SHAPE}${LAYERS:+-$LAYERS}-rand}
started=$(date +%s)
[ "$MODE" = dry ] || printf 'step\tstatus\tseconds\tcommand\n' >"$RES/status.tsv"

# step NAME TIMEOUT COMMAND...: runs COMMAND (a program or a function of this script) under `timeout`, its output in
# NAME.log; status ok / failed (rc) / timeout / skipped (rc 3: the command says it has nothing to run here, or the
# suite's budget is spent)
step() {
  local name=$1 limit=$2; shift 2
  local var
  var="T_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  limit=${!var:-$limit}
  if [ "$MODE" = dry ]; then
    printf '%-14s timeout %4ss: %s\n' "$name" "$limit" "$*"
    return 0
  fi
  local t0 rc status left
  t0=$(date +%s)
  left=$(( BUDGET - (t0 - started) ))
  if [ "$left" -lt 15 ]; then
    printf '%s\t%s\t0\t%s\n' "$name" "skipped (suite budget ${BUDGET}s spent)" "$*" >>"$RES/status.tsv"
    echo "== $name: skipped, the suite's ${BUDGET}s are spent"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (timeout ${limit}s, $(( t0 - started ))s into the suite)"
  if [ "$(type -t "$1")" = function ]; then
    timeout -k 10 "$limit" bash -c "$(declare -f "$1"); $*" >"$RES/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$RES/$name.log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=ok ;;
    3) status=skipped ;;
    124|137) status="timeout (${limit}s)" ;;
    *) status="failed (rc $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$*" >>"$RES/status.tsv"
  echo "   $status; last lines:"
  tail -n 4 "$RES/$name.log" | sed 's/^/   | /'
  return 0
}

env_info() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("device",
torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
  "$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"
  "$PY" -c 'import transformers; print("transformers", transformers.__version__)'
  git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null || true
}

# moeserve importable as installed here: already; else an editable install without deps (needs setuptools, no
# network); else a shim dir whose moeserve/ links moeserve/*, kernels/moeserve_kernels/ and training/ the way pyproject
# maps them
setup_import() {
  local probe='import moeserve.kernels, moeserve.training, moeserve.engine, moeserve; print(moeserve.__file__)'
  if (cd /tmp && "$PY" -c "$probe") 2>/dev/null; then echo "moeserve already importable"; return 0; fi
  if "$PY" -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3 && (cd /tmp && "$PY" -c "$probe"); then
    echo "editable install (no deps)"; return 0
  fi
  local shim=$SCRATCH/shim
  rm -rf "$shim" && mkdir -p "$shim/moeserve"
  for f in "$ROOT"/moeserve/*; do ln -s "$f" "$shim/moeserve/$(basename "$f")"; done
  ln -sfn "$ROOT/kernels/moeserve_kernels" "$shim/moeserve/kernels"
  ln -sfn "$ROOT/training" "$shim/moeserve/training"
  echo "$shim" >"$SCRATCH/pythonpath"
  PYTHONPATH=$shim${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "$probe" && echo "shim: PYTHONPATH=$shim"
}

step env 20 env_info
step import 60 setup_import
[ -f "$SCRATCH/pythonpath" ] && PYTHONPATH="$(cat "$SCRATCH/pythonpath")${PYTHONPATH:+:$PYTHONPATH}" && export PYTHONPATH
# pytest-xdist (in the GPU image) compiles the Triton kernels of different tests on several cores at once
xdist=()
[ "$MODE" = gpu ] && "$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 8)

# Compiled Triton on CUDA (the modules pick cuda themselves when it is there); on --cpu only the torch-side tests run
kernel_tests=(tests/test_kernels_backend.py tests/test_kernels_fused_moe.py tests/test_kernels_moe_lora.py
              tests/test_kernels_paged_decode_attention.py tests/test_fused_moe.py)
if [ "$MODE" = cpu ]; then
  step kernels 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_kernels_backend.py tests/test_fused_moe.py \
    --junitxml="$RES/kernels.xml"
else
  step kernels 150 env MOESERVE_KERNELS=triton "$PY" -m pytest -q -p no:cacheprovider -rs "${xdist[@]}" \
    "${kernel_tests[@]}" --junitxml="$RES/kernels.xml"
fi

if [ "$MODE" = cpu ]; then
  step parity 75 "$PY" benchmarks/gpu_parity.py --device cpu --archs olmoe --no-builtin --max-tokens 4 \
    --out "$RES/parity.json"
else
  step parity 75 "$PY" benchmarks/gpu_parity.py --device cuda --out "$RES/parity.json"
fi

if [ "$MODE" != dry ] && [ -f "$MODEL/config.json" ]; then
  echo "== roofline-make: reusing $MODEL"
  printf 'roofline-make\tok (reused %s)\t0\t-\n' "$MODEL" >>"$RES/status.tsv"
else
  step roofline-make 60 "$PY" benchmarks/bench_roofline.py make "$SHAPE" "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    ${LAYERS:+--num-layers "$LAYERS"}
fi
# shellcheck disable=SC2086  # BATCHES is a list of words
step decode 60 "$PY" benchmarks/bench_roofline.py run "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --batch $BATCHES \
  --context "$CONTEXT" --steps "$STEPS" --out "$RES/decode.json"
# shellcheck disable=SC2086
step decode-eager 60 "$PY" benchmarks/bench_roofline.py run "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
  --batch $BATCHES --context "$CONTEXT" --steps "$STEPS" --enforce-eager --out "$RES/decode_eager.json"

[ "$MODE" = dry ] && exit 0
{
  echo "# gpu_suite ($MODE) $(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - started )) s"
  echo
  echo '```'
  cat "$RES/env.log"
  echo '```'
  echo
  echo "| step | status | s |"
  echo "|---|---|---:|"
  tail -n +2 "$RES/status.tsv" | awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}'
  for f in kernels parity decode decode-eager; do
    echo
    echo "## $f (last lines of $f.log)"
    echo
    echo '```'
    tail -n 25 "$RES/$f.log" 2>/dev/null
    echo '```'
  done
} >"$RES/summary.md"
if [ -n "${OUT:-}" ]; then  # few files for the trip back: the logs in one archive
  (cd "$RES" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
fi
rm -rf "$SCRATCH"
cat "$RES/status.tsv"
echo "results in $RES (summary.md, status.tsv, logs, *.json)"
