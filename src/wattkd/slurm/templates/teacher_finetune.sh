# Fine-tune the pretrained teacher on the training shards (teacher.finetune: CE, full or LoRA);
# after a requeue it resumes from its last checkpoint.
start_node_samplers "$OUT_DIR/teacher/telemetry"
rank_tasks "${WATTKD[@]}" teacher finetune "$CONFIG" --resume auto
rc=$?
stop_node_samplers
finish "$rc"
