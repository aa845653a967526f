"""lm-eval task YAMLs shipped with wattkd: local MMLU (JSONL) and BIG-bench (task.json).

Point lm-eval's TaskManager at `TASKS_DIR` (`include_path`) and pass the data locations as
TaskManager metadata under `utils.MMLU_PATH_KEY` / `utils.BIGBENCH_DIR_KEY`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
