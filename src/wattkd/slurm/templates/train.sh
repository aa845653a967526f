# One student per array task: task k is repeat k (seed = train.seed + k). After a requeue the
# run resumes from its last checkpoint.
REPEAT=${SLURM_ARRAY_TASK_ID:-0}
RUN_DIR="$OUT_DIR/$METHOD/rep$REPEAT"
start_node_samplers "$RUN_DIR/telemetry"
rank_tasks "${WATTKD[@]}" train "$CONFIG" --method "$METHOD" --repeat "$REPEAT" --resume auto
rc=$?
stop_node_samplers
finish "$rc"
