# Tables, plots, report.html and report.md over every student run and the teacher.
one_task "${WATTKD[@]}" report "${RUN_DIRS[@]}" --teacher "$OUT_DIR/teacher" --out "$OUT_DIR/report"
finish $?
