#!/usr/bin/env bash
# GPU validation and benchmark of fedrot_ext in one command, for a machine with a GPU.
#
#   bash bench/run_gpu.sh                 # env build test sanitize bench (all stages)
#   bash bench/run_gpu.sh build test      # chosen stages only, in the order given
#
# Stages:
#   env       nvidia-smi, torch, nvcc, compute-sanitizer versions
#   build     pip install --no-build-isolation --no-deps . ; the built _C is also copied into
#             ./fedrot_ext/ so that imports from the repository root load the same binary
#   test      pytest tests -k cuda (FULL_TESTS=1: the whole suite)
#   sanitize  compute-sanitizer memcheck and racecheck on bench/sanitize_op.py
#   bench     bench/run_bench.py --device cuda (BENCH_ARGS adds or overrides options)
# Every stage after build rebuilds first if `import fedrot_ext` fails, so stages can run
# in separate calls. Writes under $OUT (default results/gpu): env.txt build.log tests.log
# sanitizer.log bench_cuda.txt bench_cuda.json summary.txt; prints the summary last.
# LIMIT (seconds, default 570) bounds the whole script: the bench gets what is left.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
LIMIT=${LIMIT:-570}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env build test sanitize bench)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( LIMIT - ($(date +%s) - START) )); }

importable() { "$PY" -c "import fedrot_ext, torch; assert torch.cuda.is_available()" >/dev/null 2>&1; }

build() {
  local t0=$(date +%s) rc
  (
    echo "# pip install --no-build-isolation --no-deps ."
    MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install --no-build-isolation --no-deps -v . 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
      # Same binary for imports from the repository root (cwd first on sys.path).
      so=$(cd /tmp && "$PY" -c "import fedrot_ext, glob, os; print(glob.glob(os.path.join(os.path.dirname(fedrot_ext.__file__), '_C*.so'))[0])")
      rc=$?
      [ $rc -eq 0 ] && cp -v "$so" fedrot_ext/
    else
      echo "# pip install failed ($rc): building in place instead"
      MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace 2>&1
      rc=$?
    fi
    exit $rc
  ) > "$OUT/build.log" 2>&1
  rc=$?
  note "build: rc=$rc in $(( $(date +%s) - t0 )) s (log: build.log)"
  [ $rc -eq 0 ] || tail -30 "$OUT/build.log"
  return $rc
}

ensure_built() { importable || build; }

stage_env() {
  {
    date -u
    nvidia-smi 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1
    nvcc --version 2>&1 | tail -2
    command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>&1
    nproc; free -g
  } > "$OUT/env.txt" 2>&1
  note "env: $(grep -m1 -o 'NVIDIA [A-Z0-9 ]*' "$OUT/env.txt" | head -1) $(grep -m1 '^torch' "$OUT/env.txt")"
}

stage_test() {
  ensure_built || return 1
  local t0=$(date +%s) rc sel=(-k cuda)
  [ "${FULL_TESTS:-0}" != 0 ] && sel=()
  timeout 300 "$PY" -m pytest tests "${sel[@]}" -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1
  rc=$?
  note "tests: rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/tests.log")"
  [ $rc -eq 0 ] || tail -40 "$OUT/tests.log"
  return $rc
}

stage_sanitize() {
  ensure_built || return 1
  local cs rc=0 tool r t0
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$cs" ]; then note "sanitize: compute-sanitizer not found"; return 1; fi
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck; do
    t0=$(date +%s)
    echo "# $cs --tool $tool" >> "$OUT/sanitizer.log"
    # No caching allocator: memcheck then sees every tensor's real bounds.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 "$cs" --tool "$tool" --error-exitcode 99 \
      "$PY" bench/sanitize_op.py >> "$OUT/sanitizer.log" 2>&1
    r=$?
    note "sanitize $tool: rc=$r in $(( $(date +%s) - t0 )) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitize_op:' "$OUT/sanitizer.log" | tail -2 | tr '\n' ' ')"
    [ $r -eq 0 ] || rc=$r
  done
  [ $rc -eq 0 ] || grep -m 20 -E "Invalid|Race|Hazard|error" "$OUT/sanitizer.log"
  return $rc
}

stage_bench() {
  ensure_built || return 1
  local budget rc t0=$(date +%s)
  budget=$(( $(left) - 60 ))
  [ $budget -lt 30 ] && budget=30
  # shellcheck disable=SC2086
  timeout $(( budget + 50 )) "$PY" bench/run_bench.py --device cuda --loop-cap 0.5 --time-budget "$budget" \
    --out "$OUT/bench_cuda.json" ${BENCH_ARGS:-} > "$OUT/bench_cuda.txt" 2>&1
  rc=$?
  note "bench: rc=$rc in $(( $(date +%s) - t0 )) s (table: bench_cuda.txt, JSON: bench_cuda.json)"
  grep -E "^# |fused \(a\)|kernels" "$OUT/bench_cuda.txt" | cut -c1-200 | tail -60
  [ $rc -eq 0 ] || tail -20 "$OUT/bench_cuda.txt"
  return $rc
}

status=0
for s in "${STAGES[@]}"; do
  case "$s" in
    env) stage_env ;;
    build) build ;;
    test) stage_test ;;
    sanitize) stage_sanitize ;;
    bench) stage_bench ;;
    *) echo "unknown stage $s (env build test sanitize bench)"; status=2; continue ;;
  esac
  r=$?
  [ $r -eq 0 ] || status=$r
done
echo
echo "=== summary ($(( $(date +%s) - START )) s) ==="
cat "$SUMMARY"
exit $status
