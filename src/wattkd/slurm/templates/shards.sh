# Tokenize, mix and pack the config's sources into Parquet shards (a matching set is kept).
one_task "${WATTKD[@]}" data build "$CONFIG"
finish $?
