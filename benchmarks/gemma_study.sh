#!/usr/bin/env bash
# The real study of issues 10 and 22 on one GPU, in one command:
#   Gemma 3 270M teacher, first fine-tuned on the corpus (`wattkd teacher finetune`, full),
#   -> 6-layer students copied from the *adapted* teacher's layers 0,3,6,9,12,17, trained with
#   response, feature and relation KD (online teacher) and the no-KD baseline, REPEATS repeats
#   each at the same token budget (repeat k: data order and new-parameter init from seed k,
#   shared by all methods, so the runs are paired); teacher and students evaluated on held-out
#   perplexity (the adapted teacher's domain), the offline suite and EPT; the report with
#   spreads, 95% intervals and verdicts; benchmarks/results/$NAME.json with every repeat.
#
#   bash benchmarks/gemma_study.sh OUT_DIR [--set key=value ...]
#
# Scale with environment variables (defaults in brackets) to the device time you have:
#   STEPS [100; the config's own cap with CONFIG]  student steps (x MBS x 1024 tokens each)
#   FT_STEPS [100]     teacher fine-tune steps (same batch)
#   FT_LR [5e-5]       teacher fine-tune learning rate
#   REPEATS [3]        repeats per method
#   MBS [16]           micro-batch size (students and the fine-tune)
#   EVAL_LIMIT [100]   examples per task of the offline suite
#   EPT_BATCHES [[1,8,32]]  EPT batch sizes (YAML list)
#   EPT_REPEATS [3]    measured EPT windows per batch size
#   EPT_WINDOW_S []    EPT window length in s (empty: telemetry.min_window_s, 10 s)
#   EPT_PREFILL [true] separate prefill windows in EPT
#   CKPT_EVERY [50]    checkpoint interval, students and fine-tune (0: none; resume needs them)
#   EVAL_EVERY [50]    held-out loss interval during training (0: off)
#   NAME [gemma_study] results file benchmarks/results/$NAME.json
#   CONFIG [configs/gemma-270m/study.yaml]  the experiment; configs/gemma-270m/onpolicy_study.yaml
#                      is issue 27's row (on-policy vs response KD vs baseline at one energy
#                      budget, train.energy_budget_j: STEPS is then left to the config's cap
#                      unless given, so every run stops at the budget, not at a step count)
# Cost (estimated from the issue-10 run on an H200, not measured for this script): each student
# trains ~10-16 s per 100 steps at MBS 16 plus ~20 s of start-up (load, compile, checkpoint),
# the fine-tune about as long as a baseline student; evaluation (suite at limit 100 +
# perplexity) ~30-40 s per model; EPT per batch size ~ warm-up (compile) + EPT_REPEATS x
# (1 or 2 windows of EPT_WINDOW_S). At the defaults (REPEATS=3: 12 students + teacher) that
# is ~40 min. One-lease setting, ~13-17 min (estimated): STEPS=60 FT_STEPS=60 REPEATS=3
# MBS=16 EVAL_LIMIT=50 EPT_BATCHES=[32] EPT_REPEATS=2 EPT_WINDOW_S=3 EPT_PREFILL=false
# CKPT_EVERY=0 EVAL_EVERY=0 (MBS >= 3: relation KD compares sequences within a micro-batch).
# The summary table is also written to OUT_DIR/study_table.md.
#
# Needs `pip install 'wattkd[gemma,eval]'` and ../shared/data (corpora, MMLU, BIG-bench) or
# your own copies named with --set. Rerunning continues where it stopped (the pipeline skips
# finished stages and resumes training, the fine-tune included, from checkpoints).
# WATTKD_TOKENIZER_FROM: a folder with a tokenizer converted by a transformers version that
# converts Gemma's GGUF tokenizer right (benchmarks/RESULTS.md, Gemma section).
set -euo pipefail
out=${1:?usage: gemma_study.sh OUT_DIR [--set key=value ...]}
shift
model=models/gemma3-270m          # the path configs/gemma-270m/study.yaml names
wattkd=(python3 -m wattkd.cli)
CONFIG=${CONFIG:-configs/gemma-270m/study.yaml}
[ "$CONFIG" = configs/gemma-270m/study.yaml ] && STEPS=${STEPS:-100}
STEPS=${STEPS:-}
FT_STEPS=${FT_STEPS:-100}
FT_LR=${FT_LR:-5e-5}
REPEATS=${REPEATS:-3}
MBS=${MBS:-16}
EVAL_LIMIT=${EVAL_LIMIT:-100}
EPT_BATCHES=${EPT_BATCHES:-[1,8,32]}
EPT_REPEATS=${EPT_REPEATS:-3}
EPT_WINDOW_S=${EPT_WINDOW_S:-}
EPT_PREFILL=${EPT_PREFILL:-true}
CKPT_EVERY=${CKPT_EVERY:-50}
EVAL_EVERY=${EVAL_EVERY:-50}
NAME=${NAME:-gemma_study}

if [ ! -f "$model/config.json" ]; then
    prep=("${wattkd[@]}" models prepare gemma3-270m --out "$model")
    [ -n "${WATTKD_TOKENIZER_FROM:-}" ] && prep+=(--tokenizer-from "$WATTKD_TOKENIZER_FROM")
    "${prep[@]}"
fi

overrides=(
    --set "output_dir=$out"
    --set "teacher.finetune.max_steps=$FT_STEPS" --set "teacher.finetune.lr=$FT_LR"
    --set "teacher.finetune.warmup_steps=10" --set "teacher.finetune.micro_batch_size=$MBS"
    --set "train.micro_batch_size=$MBS"
    --set "train.repeats=$REPEATS" --set train.warmup_steps=10
    --set train.log_every=10 --set "train.eval_every=$EVAL_EVERY"
    --set "train.checkpoint_every=$CKPT_EVERY"
    --set "eval.limit=$EVAL_LIMIT" --set "eval.ept.batch_sizes=$EPT_BATCHES"
    --set "eval.ept.repeats=$EPT_REPEATS" --set "eval.ept.measure_prefill=$EPT_PREFILL"
)
[ -n "$STEPS" ] && overrides+=(--set "train.max_steps=$STEPS")
[ -n "$EPT_WINDOW_S" ] && overrides+=(--set "eval.ept.min_window_s=$EPT_WINDOW_S")
start=$(date +%s)
"${wattkd[@]}" pipeline "$CONFIG" "${overrides[@]}" "$@"
knobs="CONFIG=$CONFIG STEPS=$STEPS FT_STEPS=$FT_STEPS FT_LR=$FT_LR REPEATS=$REPEATS MBS=$MBS EVAL_LIMIT=$EVAL_LIMIT"
knobs+=" EPT_BATCHES=$EPT_BATCHES EPT_REPEATS=$EPT_REPEATS EPT_WINDOW_S=$EPT_WINDOW_S"
knobs+=" EPT_PREFILL=$EPT_PREFILL CKPT_EVERY=$CKPT_EVERY EVAL_EVERY=$EVAL_EVERY"
python3 benchmarks/study_summary.py "$out" --name "$NAME" --wall-s "$(( $(date +%s) - start ))" \
    --command "$knobs bash benchmarks/gemma_study.sh $out $*" | tee "$out/study_table.md"
