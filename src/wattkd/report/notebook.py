"""A Jupyter notebook template (report.ipynb) that loads the report's own tables, so ad-hoc
analysis starts from the same numbers as report.html instead of hand-edited copies."""

from __future__ import annotations

from typing import Any

CELLS = [
    ("markdown", ("# wattkd report tables\n\nLoads the CSV/JSON tables written beside this "
                  "notebook by `wattkd report`. A gap is an empty value with its reason in the "
                  "`<column>_gap` column; `<column>_estimated` marks estimated figures.")),
    ("code", ("import json\nfrom pathlib import Path\n\nimport pandas as pd\n\n"
              "HERE = Path('.').resolve()\nsummary = json.loads((HERE / 'report.json').read_text())\n"
              "print('energy basis:', summary['energy_basis_label'], '| quality:', "
              "summary['quality_label'])\nfor w in summary['warnings']:\n    print('!', w)")),
    ("code", ("tables = {p.stem: pd.read_csv(p) for p in sorted((HERE / 'tables').glob('*.csv'))}\n"
              "list(tables)")),
    ("code", "tables['methods']"),
    ("code", "tables['runs']"),
    ("code", ("# every gap with its reason\n"
              "gaps = [(name, col[:-4], row.get('run', row.get('method')), reason)\n"
              "        for name, df in tables.items() for col in df.columns if col.endswith('_gap')\n"
              "        for _, row in df.iterrows() for reason in [row[col]] if isinstance(reason, str)]\n"
              "pd.DataFrame(gaps, columns=['table', 'column', 'row', 'reason'])")),
    ("code", ("from IPython.display import SVG, display\n"
              "for p in sorted((HERE / 'plots').glob('*.svg')):\n    display(SVG(filename=str(p)))")),
]


def notebook_json() -> dict[str, Any]:
    cells = []
    for kind, src in CELLS:
        cell: dict[str, Any] = {"cell_type": kind, "metadata": {},
                                "source": src.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3",
                                                        "language": "python", "name": "python3"},
                                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}
