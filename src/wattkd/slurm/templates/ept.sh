# Inference energy per token of one model (batch sweep, warm-up excluded).
# METHOD "teacher" measures the teacher; in an array, task k measures repeat k.
RUN_DIR="$OUT_DIR/$METHOD"
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then RUN_DIR="$RUN_DIR/rep$SLURM_ARRAY_TASK_ID"; fi
one_task "${WATTKD[@]}" ept "$RUN_DIR" --config "$CONFIG"
finish $?
