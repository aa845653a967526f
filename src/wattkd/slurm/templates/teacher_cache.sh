# Run the teacher once over the shards and store its signals for every student (resumable).
one_task "${WATTKD[@]}" teacher cache "$CONFIG"
finish $?
