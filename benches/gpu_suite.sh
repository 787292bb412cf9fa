#!/usr/bin/env bash
# The GPU suite, one command on the GPU machine (from the repository root):
#     bash benches/gpu_suite.sh
# 1. installs the wheels carried in .whl/ (packages the machine lacks: nvidia-cutlass, fla-core, einops),
# 2. builds the CUDA extension (editable install),
# 3. runs the test suite on the GPU (HYPOTHESIS_PROFILE=gpu), test files in parallel processes,
# 4. runs compute-sanitizer memcheck and racecheck over every CUDA kernel at odd shapes,
# 5. runs every benchmark module in benches/ops,
# 6. runs the model benchmark (benches.model) and the HALO stage-2 step benchmark (benches.halo_step),
# and prints a short table last. Each part runs even when an earlier one failed; the exit status is non-zero when
# any part failed. Logs and JSON go to ${OUT:-benches/results}: suite.log (every part's full output), tests/ (one
# log per test file and exits.txt), benches.json (all benchmark rows), OP.png (each benchmark's rows as bars),
# summary.txt (what is printed last), autotune.tar.gz (Triton autotuning results, see SUITE_AUTOTUNE).
#
# Knobs (environment), for narrower runs:
#   SUITE_TESTS="tests/ops/x.py ..."  test paths (default: tests); every test file runs as its own pytest process
#   SUITE_TEST_JOBS=8                  test files run at a time
#   SUITE_HYPOTHESIS_PROFILE=gpu       examples per property: gpu (40) or cpu (8)
#   SUITE_BENCH_OPS="op1 op2"          benchmark modules (default: every file in benches/ops)
#   SUITE_QUICK=1                      benchmarks with --quick, racecheck on fewer cases
#   SUITE_SKIP="build tests sanitize bench model halo_step"  parts to leave out
#   SUITE_MODEL_ARGS / SUITE_HALO_STEP_ARGS  arguments of the two model-level benchmarks
#   SUITE_TIMEOUT_<PART>=seconds       per-part limit (BUILD 900, TESTS 1800, SANITIZE 600, BENCH 900 per op,
#                                      MODEL 900, HALO_STEP 600)
#   SUITE_CC / SUITE_CXX               host compilers of the build (default: the system GCC, see below)
#   SUITE_AUTOTUNE=.autotune           Triton autotuning results to start from (see below)
#
# Autotuning results: fla's kernels autotune on first use (several minutes per dtype on a fresh machine) and keep
# the winners as *.autotune.json files in Triton's cache. After every benchmark module the suite archives those
# files as $RESULTS/autotune.tar.gz; put that archive in .autotune/ (ignored by git) on the next run's machine and
# the suite unpacks it (and copies any loose *.autotune.json there) into the cache before the benchmarks, so fla
# compiles only its chosen configs. Triton reuses a file only for the same kernel source, Triton version, GPU
# target and tuning key.
set -u -o pipefail
cd "$(dirname "$0")/.."

RESULTS=${OUT:-benches/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/suite.log"
SUMMARY="$RESULTS/summary.txt"
WORK=$(mktemp -d)
: > "$LOG"
export PYTHONUNBUFFERED=1
FAILED=()
STATUS_LINES=()

skipped() { [[ " ${SUITE_SKIP:-} " == *" $1 "* ]]; }

# part NAME TIMEOUT CMD...: runs CMD with a time limit, appends its output to the log, records the outcome.
part() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/part.log" 2>&1
  local rc=$?
  cat "$WORK/part.log" >> "$LOG"
  local outcome="ok"
  if [[ $rc -ne 0 ]]; then
    outcome="FAILED (exit $rc$([[ $rc -eq 124 || $rc -eq 137 ]] && echo ", timed out after ${limit}s"))"
    FAILED+=("$name")
    tail -n 25 "$WORK/part.log"
  else
    tail -n 3 "$WORK/part.log"
  fi
  STATUS_LINES+=("$(printf '%-34s %-40s %5ss' "$name" "$outcome" "$((SECONDS - start))")")
  echo "=== $name: $outcome ($((SECONDS - start))s)" | tee -a "$LOG"
}

{
  echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  nvcc --version 2>&1 | tail -n 1
} | tee -a "$LOG"

if compgen -G ".whl/*.whl" > /dev/null; then
  part "install wheels" 300 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
AUTOTUNE=${SUITE_AUTOTUNE:-.autotune}
if [[ -d "$AUTOTUNE" ]]; then
  mkdir -p "$TRITON_CACHE_DIR"
  for archive in "$AUTOTUNE"/*.tar.gz; do
    [[ -f "$archive" ]] && tar -xzf "$archive" -C "$TRITON_CACHE_DIR"
  done
  (cd "$AUTOTUNE" && find . -name '*.autotune.json' -exec cp --parents {} "$TRITON_CACHE_DIR/" \;)
  echo "# autotuning results from $AUTOTUNE: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) files" \
    | tee -a "$LOG"
fi

# save_autotune: every autotuning result in the Triton cache, as one archive (paths relative to the cache) at
# $RESULTS/autotune.tar.gz: one file, where a folder of them could exceed what a run may send back.
save_autotune() {
  (cd "$TRITON_CACHE_DIR" 2> /dev/null && find . -name '*.autotune.json' -print0 \
    | tar --null -czf "$RESULTS/autotune.tar.gz" -T -)
}

# The GPU image's default compiler (/opt/gcc) built an extension that segfaulted while formatting a
# TORCH_CHECK message (inlined libstdc++ code that does not match the libstdc++.so torch loads); the
# system GCC matches it. SUITE_CC / SUITE_CXX override.
if [[ -n "${SUITE_CXX:-}" || -x /usr/bin/g++ ]]; then
  export CC=${SUITE_CC:-/usr/bin/gcc} CXX=${SUITE_CXX:-/usr/bin/g++}
fi
echo "# host compilers: CC=${CC:-default} CXX=${CXX:-default}" | tee -a "$LOG"

if ! skipped build; then
  part "build extension" "${SUITE_TIMEOUT_BUILD:-900}" env MAX_JOBS="${MAX_JOBS:-16}" HYPENET_FORCE_CUDA_BUILD=1 \
    python3 -m pip install --no-build-isolation --no-deps -v -e .
  part "extension loads" 60 python3 -c "
from hypenet.ops import cuda_ext
print(cuda_ext.build_info())
assert cuda_ext.cuda_ext_error() is None, cuda_ext.cuda_ext_error()"
fi

# One pytest process per test file, SUITE_TEST_JOBS at a time: the Triton tests spend most of their time compiling
# kernels for the shapes Hypothesis draws, which is CPU work that parallel processes spread over the host's cores.
# The kernel test files (*_triton.py: most of the compiling, up to ~7 minutes each on an H200 with the gpu profile)
# start first so that the longest ones do not start last. Each file's log lands in $RESULTS/tests as soon as the file
# ends, and its exit line in $RESULTS/tests/exits.txt, so a run stopped by a time limit still shows every file that
# finished.
run_test_files() {
  local files
  # shellcheck disable=SC2086  (SUITE_TESTS is a list of paths)
  files=$(find ${SUITE_TESTS:-tests} -name 'test_*_triton.py' | sort
          find ${SUITE_TESTS:-tests} -name 'test_*.py' ! -name 'test_*_triton.py' | sort)
  mkdir -p "$RESULTS/tests"
  : > "$RESULTS/tests/exits.txt"
  echo "$files" | xargs -P "${SUITE_TEST_JOBS:-8}" -I{} sh -c \
    'log="$1/$(echo "$2" | tr / _).log"; start=$(date +%s)
     python3 -m pytest -q -p no:cacheprovider -rs --durations=5 "$2" > "$log" 2>&1; rc=$?
     echo "exit $rc $2 $(( $(date +%s) - start ))s: $(tail -n 1 "$log")" | tee -a "$1/exits.txt"' _ "$RESULTS/tests" {}
  echo "# per file:"
  cat "$RESULTS/tests/exits.txt"
  grep -v "^exit 0 " "$RESULTS/tests/exits.txt" | while read -r _ _ file _; do
    cat "$RESULTS/tests/$(echo "$file" | tr / _).log"
  done
  ! grep -q "^exit [1-9]" "$RESULTS/tests/exits.txt"
}

if ! skipped tests; then
  export -f run_test_files
  export RESULTS SUITE_TESTS SUITE_TEST_JOBS
  profile=${SUITE_HYPOTHESIS_PROFILE:-gpu}
  part "tests ($profile profile)" "${SUITE_TIMEOUT_TESTS:-1800}" env HYPOTHESIS_PROFILE="$profile" bash -c run_test_files
fi

if ! skipped sanitize; then
  if command -v compute-sanitizer > /dev/null; then
    part "compute-sanitizer memcheck" "${SUITE_TIMEOUT_SANITIZE:-600}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m benches.cuda_sanitize
    part "compute-sanitizer racecheck" "${SUITE_TIMEOUT_SANITIZE:-600}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m benches.cuda_sanitize --quick
  else
    echo "=== compute-sanitizer not found" | tee -a "$LOG"
    FAILED+=("compute-sanitizer missing")
  fi
fi

if ! skipped bench; then
  ops=${SUITE_BENCH_OPS:-$(cd benches/ops && ls ./*.py | sed 's|^\./||; s|\.py$||' | grep -v '^__init__$')}
  for op in $ops; do
    # OUT is dropped for the child: the rows are merged into one benches.json below.
    part "bench $op" "${SUITE_TIMEOUT_BENCH:-900}" env -u OUT python3 -m benches.run --op "$op" \
      --json "$WORK/bench_$op.json" ${SUITE_QUICK:+--quick}
    save_autotune
  done
fi

# Whole-model benchmarks (their own JSON and PNG files in $RESULTS).
if ! skipped model; then
  part "bench model" "${SUITE_TIMEOUT_MODEL:-900}" env -u OUT python3 -m benches.model --out "$RESULTS" \
    ${SUITE_MODEL_ARGS:---contexts 32768,131072,262144,524288,1048576 --decode-steps 8}
fi
if ! skipped halo_step; then
  # shellcheck disable=SC2086  (SUITE_HALO_STEP_ARGS is a list of arguments)
  part "bench halo_step" "${SUITE_TIMEOUT_HALO_STEP:-600}" env -u OUT python3 -m benches.halo_step --out "$RESULTS" \
    ${SUITE_HALO_STEP_ARGS:---batches 16 --accumulation 6 --compile --breakdown}
fi

python3 - "$WORK" "$RESULTS/benches.json" > "$WORK/tables.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
from benches.common import format_table, plot_rows
payloads = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("bench_*.json"))]
Path(sys.argv[2]).write_text(json.dumps(payloads, indent=2) + "\n")
for p in payloads:
    print(f"\n## {p['op']} on {p['device']}")
    print(format_table(p["rows"]))
    print("# " + plot_rows(p["rows"], Path(sys.argv[2]).with_name(f"{p['op']}.png"), f"{p['op']} on {p['device']}"))
EOF

{
  echo
  echo "################ GPU suite summary"
  printf '%s\n' "${STATUS_LINES[@]}"
  cat "$WORK/tables.txt"
  echo
  if [[ ${#FAILED[@]} -eq 0 ]]; then
    echo "ALL PARTS OK"
  else
    echo "FAILED PARTS: ${FAILED[*]} (full output in $LOG)"
  fi
} | tee "$SUMMARY" | tee -a "$LOG"
rm -rf "$WORK"
[[ ${#FAILED[@]} -eq 0 ]]
