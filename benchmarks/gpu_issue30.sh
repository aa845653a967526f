#!/usr/bin/env bash
# Issue 30 on one GPU, in one call of about 8 minutes (each stage under its own time limit):
#   1. kd_throughput rows (Gemma-270M pair, batch 64): Liger chunked online, wattkd online, the
#      cached top-k step (chunked setup), and the same with the bodies sped up
#      (train.body_kernels = compile / triton), body_only rows            -> $OUT/kd/
#   2. the Triton kernel tests on CUDA, each case under a timeout, compile vs run time per
#      case                                                                -> $OUT/kernel/
#   3. if time is left: the JSD case at the fp32 tiles of before (128x128x64), to see whether
#      its compile is what did not finish in 120 s                         -> $OUT/diag/
#   4. the tables for benchmarks/RESULTS.md and the targets' verdicts    -> $OUT/summary.md
# At most 7 files come back: kd/kd_throughput.json, kernel/{kernel_tests.json,
# kernel_tests_tracebacks.txt, kernel_tests_events.jsonl}, diag/kernel_tests.json,
# summary.md, log.txt.
#
#   bash benchmarks/gpu_issue30.sh [--dry-run] [--fetch-wheels] [--total SECONDS] [--part 2]
#
# --part 2 (a second call): where the cached top-k step's time goes and whether larger logit
#   chunks help it: the top-k rows with and without compiled bodies, the cache path's body
#   rows (also with flex attention, an experiment), a torch.profiler table of
#   wattkd_topk_body_compile (kd/), and the top-k rows again at --chunk 4096 (kd4096/); no
#   kernel tests. 5 files come back.
#
# --fetch-wheels: download the wheels of benchmarks/gpu_issue30_wheels.txt into .whl/ (here,
#   where pip works) and stop; carry .whl to the GPU machine. There, the ones whose module does
#   not import are installed into /tmp/site.
# --dry-run: CPU check of the whole script (tiny pair, interpreter, short limits).
# --total: the seconds the stages may take together (default 460).
set -u
cd "$(dirname "$0")/.."
DRY=0; FETCH=0; TOTAL=460; PART=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --part) shift; PART="${1:-}"
            case "$PART" in 1|2) ;; *) echo "error: --part must be 1 or 2, got '$PART'" >&2; exit 2 ;; esac ;;
    --total) shift; TOTAL="${1:-}"
             case "$TOTAL" in ''|*[!0-9]*) echo "error: --total needs whole seconds, got '$TOTAL'" >&2; exit 2 ;; esac ;;
    *) echo "error: unknown argument '$1' (expected --dry-run, --fetch-wheels, --total SECONDS, --part 1|2)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
WHEELS=benchmarks/gpu_issue30_wheels.txt
if [ "$FETCH" = 1 ]; then
  mkdir -p .whl
  grep -v '^#' "$WHEELS" | awk 'NF {print $2}' | xargs "$PY" -m pip download -q --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl || exit 1
  ls .whl; exit 0
fi
OUT="${OUT:-/tmp/gpu_issue30}"
mkdir -p "$OUT/kd" "$OUT/kernel" "$OUT/diag"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
echo "== gpu_issue30 $(date -u +%FT%TZ) dry=$DRY total=${TOTAL}s out=$OUT"

# -- packages: install the carried wheels whose module is missing
missing=()
while read -r mod req; do
  case "$mod" in ''|'#'*) continue ;; esac
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod:$req")
done < "$WHEELS"
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing here: ${missing[*]}"
  files=()
  for item in "${missing[@]}"; do
    req="${item#*:}"; name="${req%%==*}"; norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
    f=$(ls .whl/ 2>/dev/null | grep -i "^${norm}-" | head -1)
    [ -n "$f" ] && files+=(".whl/$f") || echo "  no wheel for $req in .whl/"
  done
  if [ ${#files[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${files[@]}" && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  fi
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
"$PY" - <<'PYEOF' || { echo "error: wattkd's core does not import (above): carry the missing wheels in .whl/ (bash benchmarks/gpu_issue30.sh --fetch-wheels)"; exit 3; }
import importlib, sys
# needed by every wattkd row; the rest only by some rows (a row whose module is missing
# records the error and the others go on)
core = ["torch", "triton", "transformers", "pydantic", "yaml", "wattkd.distill.objective"]
optional = {"pyarrow": "top-k rows (teacher_cache)", "liger_kernel": "liger_chunked row",
            "pytest": "kernel tests", "pynvml": "J/token figures"}
bad = []
for name in core + list(optional):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '')}")
    except Exception as exc:  # noqa: BLE001
        print(f"  MISSING {name} ({type(exc).__name__}: {exc})"
              + (f": no {optional[name]}" if name in optional else ""))
        bad += [name] if name in core else []
import torch
print("  cuda:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
sys.exit(1 if bad else 0)
PYEOF

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  KD_ARGS=(--tiny --batches 2 --steps 1 --warmup 1
           --impls wattkd_topk,wattkd_body_triton,body_only_student)
  KT_ARGS=(--timeout 60 --match "benchmark fkl")
  DIAG_ARGS=(--timeout 30 --match "jsd(0.3)")
  KD_LIMIT=200
else
  # targets first (a cut run keeps them), then the body rows, the ceilings' rows, and last
  # the first GPU run of the top-k Triton LM-head path (a hang there costs no other row)
  KD_ARGS=(--batches 64 --steps 4 --warmup 2 --impls
           liger_chunked,wattkd,wattkd_topk,wattkd_body_compile,wattkd_topk_body_compile,wattkd_body_triton,wattkd_topk_body_triton,body_only,body_only_body_compile,body_only_student,wattkd_topk_triton)
  KT_ARGS=(--timeout 60)
  DIAG_ARGS=(--timeout 75 --match "jsd(0.3)" --fp32-blocks 128,128,64,8,3)
  KD_LIMIT=$(( TOTAL - 160 ))
fi

if [ "$PART" = 2 ]; then
  [ "$DRY" = 1 ] && P2=(--tiny --batches 2 --steps 1 --warmup 1) \
                 || P2=(--batches 64 --steps 4 --warmup 2)
  echo "== part 2: top-k rows, cache-path bodies, profile (limit $(( TOTAL * 6 / 10 ))s)"
  timeout -k 10 $(( TOTAL * 6 / 10 )) "$PY" benchmarks/kd_throughput.py --out "$OUT/kd" \
    "${P2[@]}" --impls liger_chunked,wattkd_topk,wattkd_topk_body_compile,wattkd_topk_body_triton,body_only_student,body_only_student_body_compile,body_only_student_body_triton,body_only_student_body_flex,wattkd_topk_body_flex \
    --profile wattkd_topk_body_compile=$([ "$DRY" = 1 ] && echo 2 || echo 64)
  echo "exit $?  ($(left)s left)"
  echo "== part 2: top-k rows at --chunk 4096"
  timeout -k 10 $(( $(left) > 30 ? $(left) - 10 : 20 )) "$PY" benchmarks/kd_throughput.py \
    --out "$OUT/kd4096" "${P2[@]}" --chunk 4096 --impls wattkd_topk,wattkd_topk_body_compile
  echo "exit $?"
  { "$PY" benchmarks/issue30_table.py --kd "$OUT/kd/kd_throughput.json"; echo;
    "$PY" benchmarks/issue30_table.py --kd "$OUT/kd4096/kd_throughput.json"; } > "$OUT/summary.md"
  cat "$OUT/summary.md"
  echo "== done in $(( $(date +%s) - START ))s"
  exit 0
fi

echo "== 1. kd_throughput (limit ${KD_LIMIT}s)"
timeout -k 10 "$KD_LIMIT" "$PY" benchmarks/kd_throughput.py --out "$OUT/kd" "${KD_ARGS[@]}"
echo "kd_throughput exit $?  ($(left)s left)"

# the runner's own budget ends its cases in time to write its JSON before `timeout` would kill
# it; at least 60 s even when stage 1 overran
KT_BUDGET=$(( $(left) - 30 )); [ "$KT_BUDGET" -gt 150 ] && KT_BUDGET=150
[ "$KT_BUDGET" -lt 60 ] && KT_BUDGET=60
echo "== 2. kernel tests on CUDA (budget ${KT_BUDGET}s)"
timeout -k 10 $(( KT_BUDGET + 25 )) "$PY" benchmarks/kernel_tests_cuda.py \
  --out "$OUT/kernel" "${KT_ARGS[@]}" --budget "$KT_BUDGET"
echo "kernel tests exit $?  ($(left)s left)"

if [ "$(left)" -gt 60 ]; then
  echo "== 3. diagnosis: the JSD case at the old fp32 tiles"
  DIAG_BUDGET=$(( $(left) - 35 )); [ "$DIAG_BUDGET" -gt 75 ] && DIAG_BUDGET=75
  timeout -k 10 $(( DIAG_BUDGET + 25 )) "$PY" benchmarks/kernel_tests_cuda.py \
    --out "$OUT/diag" "${DIAG_ARGS[@]}" --budget "$DIAG_BUDGET"
  echo "diagnosis exit $?"
  rm -f "$OUT/diag/kernel_tests_events.jsonl"   # (the file count that comes back is limited)
else
  echo "== 3. diagnosis skipped ($(left)s left)"
fi

echo "== 4. summary"
"$PY" benchmarks/issue30_table.py --kd "$OUT/kd/kd_throughput.json" \
  --kernel "$OUT/kernel/kernel_tests.json" --diag "$OUT/diag/kernel_tests.json" \
  > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "== done in $(( $(date +%s) - START ))s"
