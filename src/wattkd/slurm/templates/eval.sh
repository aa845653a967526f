# Quality of one model: the lm-eval suite under the locked protocol, plus held-out perplexity.
# METHOD "teacher" evaluates the teacher; in an array, task k evaluates repeat k.
RUN_DIR="$OUT_DIR/$METHOD"
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then RUN_DIR="$RUN_DIR/rep$SLURM_ARRAY_TASK_ID"; fi
one_task "${WATTKD[@]}" eval "$RUN_DIR" --config "$CONFIG" --perplexity
finish $?
