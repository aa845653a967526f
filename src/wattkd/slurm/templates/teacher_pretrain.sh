# Train the config's from-scratch teacher with CE; after a requeue it resumes from its last
# checkpoint.
start_node_samplers "$OUT_DIR/teacher/telemetry"
rank_tasks "${WATTKD[@]}" teacher pretrain "$CONFIG" --resume auto
rc=$?
stop_node_samplers
finish "$rc"
