"""metrics.jsonl: one JSON line per logged step, flushed (+ TensorBoard when installed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from wattkd.energy.monitor import ensure_trailing_newline

log = logging.getLogger(__name__)


class MetricsLog:
    """metrics.jsonl (one line per logged step, flushed) + TensorBoard when installed."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:  # a kill mid-line left a cut line: end it so the next record stays whole
            ensure_trailing_newline(run_dir / "metrics.jsonl")
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard:
            try:  # optional dependency (wattkd[tensorboard]): imported only when asked for
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard not installed; metrics go to metrics.jsonl only "
                         "(pip install 'wattkd[tensorboard]')")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def __enter__(self) -> MetricsLog:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also when the loop raises: no open handles or writer threads left

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
