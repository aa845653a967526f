"""Importers: results written by other tools turned into wattkd run directories, so that
`wattkd report` reads them like its own. One module family per foreign format:

  seed_*   the original study's published results (0EXPERIMENT_RESULTS/: telemetry.jsonl of
           its monitor.py, ept.json of its EPT benchmark, eval.json of lm-eval), docs/import.md
"""

from wattkd.importers.seed import SeedImportError, import_seed

__all__ = ["SeedImportError", "import_seed"]
