#!/usr/bin/env bash
# One-shot GPU check of medconv_ext: every number and check the GPU goals need, in about 5 minutes on one
# H100 (build included). Everything is written under $OUT (default ./gpu_check_out):
#   summary.txt                      status and seconds of every section
#   logs/<section>.log               full output of each section
#   bench/results/<gpu>/*.csv        benchmark rows (bench/harness.py format), ready to commit under
#                                    bench/results/<gpu>/ ; <gpu> = nvidia-smi's name, lower-cased, '-' for spaces
#   cuda_auto_table.json             the CUDA `auto` table those rows give (bench/make_cuda_auto_table.py)
#   sanitizer/<tool>.txt             compute-sanitizer reports;  profile/spectral_profile.txt  kernel profile
#   tests/junit.xml                  the GPU tests
#
# usage: bash bench/gpu_check.sh [--dry-run] [--only SECTION[,SECTION...]] [--list]
#   --dry-run   every section on the CPU at tiny sizes (Triton interpreter, no sanitizer, no rebuild: the build
#               section prints its command); CSVs under $OUT/bench/results/dry-run/. Part of the test suite.
#   --only      rerun the named sections (e.g. the ones that failed); "large" (the > 2^31-element tests, ~70
#               GiB of GPU memory) runs only when named.
# Environment: PYTHON (default python), OUT, MAX_JOBS (build; default: the number of cores).
# Exit status: 0 when every section passed, 1 otherwise (the summary names the failed ones).
set -u

SECTIONS=(env build tests sanitizer bench-rolling bench-involution profile table)
EXTRA_SECTIONS=(large)
# Per-section limits in seconds (GPU run; the estimates on an H100 are in docs/rolling_conv_gpu.md).
declare -A LIMIT=([env]=60 [build]=240 [tests]=180 [sanitizer]=150 [bench-rolling]=150 [bench-involution]=60
                  [profile]=60 [table]=30 [large]=300)
# Dry run on 2 CPU cores.
declare -A DRY_LIMIT=([env]=60 [build]=20 [tests]=150 [sanitizer]=120 [bench-rolling]=120 [bench-involution]=60
                      [profile]=90 [table]=30 [large]=60)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python}"

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
ONLY=""
SECTION=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) shift; ONLY="${1:-}"; [ -n "$ONLY" ] || { echo "--only needs a list of sections" >&2; exit 2; } ;;
    --only=*) ONLY="${1#--only=}" ;;
    --section) shift; SECTION="${1:-}" ;;   # internal: run one section (under its timeout)
    --list) printf '%s\n' "${SECTIONS[@]}" "${EXTRA_SECTIONS[@]}"; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$ROOT" || exit 2
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
export OUT PY
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$OUT/triton_cache}"
# One configuration per Triton kernel (the first that fits this GPU): no autotuning, reproducible timings,
# and the kernels compiled by the tests are reused by the later sections. Set MEDCONV_TRITON_CONFIG=auto to
# autotune instead (slower).
export MEDCONV_TRITON_CONFIG="${MEDCONV_TRITON_CONFIG:-first}"

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  GPU=dry-run
else
  unset TRITON_INTERPRET
  if [ -z "${GPU:-}" ]; then
    GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
           | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')"
    [ -n "$GPU" ] || GPU=unknown-gpu
  fi
fi
export GPU DRY
RESULTS="$OUT/bench/results/$GPU"

# ------------------------------------------------------------------------------------------------ sections
GPU_TESTS=(tests/test_rolling_conv_cuda.py tests/test_rolling_conv_triton.py tests/test_rolling_conv_spectral_triton.py
           tests/test_involution_cuda.py tests/test_involution_triton.py tests/test_cuda_auto_rule.py)
# the dry run: a few cases of the same files (the interpreter is slow)
DRY_K="conv2d-C5-odd or convT2d-fp16 or test_pin or test_shipped_table or test_fixture_table or 2d-odd-k3 or test_triton_public_api"

find_sanitizer() {
  command -v compute-sanitizer 2>/dev/null && return
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && { echo "$d/bin/compute-sanitizer"; return; }
  done
  return 1
}

section_env() {
  if [ "$DRY" = 1 ]; then
    echo "(dry run) nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv"
  else
    nvidia-smi -L || return 1
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || return 1
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton not importable:', e)" || return 1
  echo "results folder: bench/results/$GPU   MEDCONV_TRITON_CONFIG=$MEDCONV_TRITON_CONFIG"
  "$PY" -m medconv_ext
}

section_build() {
  local cc
  if [ "$DRY" = 1 ]; then
    cc="9.0"
  else
    cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')"
  fi
  local cmd="TORCH_CUDA_ARCH_LIST=$cc FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY setup.py build_ext --inplace"
  if [ "$DRY" = 1 ]; then
    echo "(dry run) would run: $cmd"
    echo "  (the visible GPU's architecture only; builds against the installed torch, no network needed)"
    return 0
  fi
  "$PY" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null \
    || echo "note: ninja not found: the sources compile one after another (slower)"
  echo "$cmd"
  env TORCH_CUDA_ARCH_LIST="$cc" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace \
    || return 1
  "$PY" -c "import medconv_ext, sys; from medconv_ext import _ext
ok = _ext.has_cuda_kernels(); print('CUDA kernels compiled in:', ok); sys.exit(0 if ok else 1)"
}

section_tests() {
  mkdir -p "$OUT/tests"
  local sel=(-k "not 2pow31 and not 2_31")
  [ "$DRY" = 1 ] && sel=(-k "$DRY_K")
  "$PY" -m pytest -q -ra -p no:cacheprovider "${sel[@]}" --junitxml="$OUT/tests/junit.xml" "${GPU_TESTS[@]}"
}

section_large() {
  # the > 2^31-element tests: ~70 GiB of free GPU memory for the spectral backend, 40 GiB for the others
  mkdir -p "$OUT/tests"
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest -q -ra -p no:cacheprovider -k "2pow31 or 2_31" --collect-only tests/test_rolling_conv_cuda.py \
      tests/test_involution_cuda.py
    return $(( $? == 5 ? 0 : $? ))  # nothing collected without a GPU is fine
  fi
  "$PY" -m pytest -q -ra -p no:cacheprovider -k "2pow31 or 2_31" --junitxml="$OUT/tests/junit_large.xml" \
    tests/test_rolling_conv_cuda.py tests/test_involution_cuda.py
}

section_sanitizer() {
  mkdir -p "$OUT/sanitizer"
  if [ "$DRY" = 1 ]; then
    echo "(dry run) no compute-sanitizer: the cases run in the Triton interpreter"
    "$PY" bench/gpu_sanitize_cases.py --device cpu --families triton,spectral,involution-triton
    return
  fi
  local cs rc=0
  cs="$(find_sanitizer)" || { echo "compute-sanitizer not found (CUDA toolkit bin/)"; return 1; }
  # memcheck: every family; racecheck: the kernels that share memory between threads
  for spec in "memcheck:cuda,cuda-wmma,triton,spectral,involution-cuda,involution-triton" \
              "racecheck:cuda,cuda-wmma,triton,spectral"; do
    local tool="${spec%%:*}" fams="${spec#*:}"
    echo "== $tool ($fams)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 1 --log-file "$OUT/sanitizer/$tool.txt" \
      "$PY" bench/gpu_sanitize_cases.py --device cuda --families "$fams" || rc=1
    tail -n 3 "$OUT/sanitizer/$tool.txt"
  done
  return $rc
}

section_bench_rolling() {
  mkdir -p "$RESULTS"
  if [ "$DRY" = 1 ]; then
    "$PY" bench/bench_rolling_conv.py --device cpu --shape "2d N=1 C=8 S=8 k=3" --shape "3d N=1 C=4 S=4 k=3" \
      --dtype float32,bfloat16 --impls spectral,reference,cpu,dense,roll_loop --mode all --budget 0.02 \
      --no-peak-mem --out-dir "$RESULTS"
    return
  fi
  "$PY" bench/bench_rolling_conv.py --device cuda --shape "2d N=8 C=256 S=128 k=3" --shape "3d N=2 C=128 S=32 k=5" \
    --dtype float32,float32-tf32,bfloat16 --impls spectral,reference,cuda,triton,dense,roll_loop --mode all \
    --budget 0.15 --out-dir "$RESULTS"
}

section_bench_involution() {
  mkdir -p "$RESULTS"
  if [ "$DRY" = 1 ]; then
    "$PY" bench/bench_involution.py --device cpu --shape "2d N=1 C=8 S=6 K=3 G=2" --dtype float32 --smoke --no-plot \
      --out "$RESULTS/involution.csv"
    return
  fi
  "$PY" bench/bench_involution.py --device cuda --shape "2d N=8 C=64 S=56 K=7 G=4" --dtype float32,bfloat16 --quick \
    --out "$RESULTS/involution.csv"
}

section_profile() {
  mkdir -p "$OUT/profile"
  if [ "$DRY" = 1 ]; then
    "$PY" bench/gpu_profile.py --device cpu --shape "2d N=1 C=8 S=6 k=3" --dtype float32 --rows 8 \
      --out "$OUT/profile/spectral_profile.txt"
    return
  fi
  "$PY" bench/gpu_profile.py --device cuda --shape "2d N=8 C=256 S=128 k=3" --dtype bfloat16 \
    --out "$OUT/profile/spectral_profile.txt"
}

section_table() {
  local extra=()
  [ "$DRY" = 1 ] && extra=(--include-all)
  "$PY" bench/make_cuda_auto_table.py --results "$OUT/bench/results" --out "$OUT/cuda_auto_table.json" "${extra[@]}"
}

if [ -n "$SECTION" ]; then  # one section, called by the driver below under `timeout`
  fn="section_${SECTION//-/_}"
  declare -F "$fn" >/dev/null || { echo "unknown section $SECTION" >&2; exit 2; }
  "$fn"
  exit $?
fi

# ------------------------------------------------------------------------------------------------ driver
if [ -n "$ONLY" ]; then
  IFS=',' read -r -a RUN <<< "$ONLY"
  for s in "${RUN[@]}"; do
    case " ${SECTIONS[*]} ${EXTRA_SECTIONS[*]} " in *" $s "*) ;; *)
      echo "unknown section '$s' (sections: ${SECTIONS[*]} ${EXTRA_SECTIONS[*]})" >&2; exit 2 ;;
    esac
  done
else
  RUN=("${SECTIONS[@]}")
fi

mkdir -p "$OUT/logs"
SUMMARY="$OUT/summary.txt"
{
  echo "bench/gpu_check.sh $( [ "$DRY" = 1 ] && echo --dry-run ) sections: ${RUN[*]}"
  echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)  gpu $GPU  commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo -)"
  echo "MEDCONV_TRITON_CONFIG=$MEDCONV_TRITON_CONFIG"
} > "$SUMMARY"
FAILED=()
T_ALL=$SECONDS
for s in "${RUN[@]}"; do
  if [ "$DRY" = 1 ]; then lim="${DRY_LIMIT[$s]}"; else lim="${LIMIT[$s]}"; fi
  log="$OUT/logs/$s.log"
  printf '== %-17s (limit %4ss) ... ' "$s" "$lim"
  t0=$SECONDS
  timeout --kill-after=15 "$lim" bash "$0" --section "$s" $( [ "$DRY" = 1 ] && echo --dry-run ) > "$log" 2>&1
  rc=$?
  dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then status=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT after ${lim}s"; FAILED+=("$s")
  else status="FAILED (exit $rc)"; FAILED+=("$s"); fi
  echo "$status, ${dt}s  -> $log"
  printf '%-17s %-22s %5ss\n' "$s" "$status" "$dt" >> "$SUMMARY"
  [ $rc -eq 0 ] || tail -n 15 "$log" | sed 's/^/    /'
done
echo "total ${SECONDS}s" >> "$SUMMARY"
echo "total $((SECONDS - T_ALL))s; results under $OUT (summary.txt)"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED sections: ${FAILED[*]}   rerun them: bash bench/gpu_check.sh$( [ "$DRY" = 1 ] && echo ' --dry-run') --only $(IFS=,; echo "${FAILED[*]}")"
  exit 1
fi
echo "all sections passed"
