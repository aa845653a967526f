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
#   STEPS [100]        student steps (x MBS x 1024 tokens each: 1.64 M tokens at the defaults)
#   FT_STEPS [100]     teacher fine-tune steps (same batch)
#   FT_LR [5e-5]       teacher fine-tune learning rate
#   REPEATS [3]        repeats per method
#   MBS [16]           micro-batch size (students and the fine-tune)
#   EVAL_LIMIT [100]   examples per task of the offline suite
#   EPT_BATCHES [[1,8,32]]  EPT batch sizes (YAML list)
#   NAME [gemma_study] results file benchmarks/results/$NAME.json
# Cost (estimated from the issue-10 run on an H200, not measured for this script): each student
# trains ~15 s per 100 steps, the fine-tune about as long as a baseline student; evaluation
# (suite at limit 100 + perplexity) and EPT take ~60-90 s per model, so REPEATS=3 (12 students
# + teacher) is ~20 min of device time, REPEATS=2 ~14 min; lower EVAL_LIMIT or EPT_BATCHES to
# save most.
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
STEPS=${STEPS:-100}
FT_STEPS=${FT_STEPS:-100}
FT_LR=${FT_LR:-5e-5}
REPEATS=${REPEATS:-3}
MBS=${MBS:-16}
EVAL_LIMIT=${EVAL_LIMIT:-100}
EPT_BATCHES=${EPT_BATCHES:-[1,8,32]}
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
    --set "train.max_steps=$STEPS" --set "train.micro_batch_size=$MBS"
    --set "train.repeats=$REPEATS" --set train.warmup_steps=10
    --set train.log_every=10 --set train.eval_every=50 --set train.checkpoint_every=50
    --set "eval.limit=$EVAL_LIMIT" --set "eval.ept.batch_sizes=$EPT_BATCHES"
)
start=$(date +%s)
"${wattkd[@]}" pipeline configs/gemma-270m/study.yaml "${overrides[@]}" "$@"
python3 benchmarks/study_summary.py "$out" --name "$NAME" --wall-s "$(( $(date +%s) - start ))" \
    --command "STEPS=$STEPS FT_STEPS=$FT_STEPS FT_LR=$FT_LR REPEATS=$REPEATS MBS=$MBS EVAL_LIMIT=$EVAL_LIMIT EPT_BATCHES=$EPT_BATCHES bash benchmarks/gemma_study.sh $out $*"
