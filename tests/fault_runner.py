"""Child process of the fault-injection suite (tests/test_faults.py): one real wattkd session
(train or teacher cache) with a simulated GPU, killed with a real SIGKILL where the spec says.

    python tests/fault_runner.py SPEC_JSON

The GPU is `FakeNvml` (this machine has no NVML) whose energy counter is a function of wall
time shared by every session: BASE_MJ + WATTS x (t - epoch), stepping every 0.1 s like the real
one, so the true energy of any interval is known. Spec keys:
  cmd        ["train", CONFIG, "--method", M, "--resume", "auto"] or ["cache", CONFIG, SIGNALS]
  epoch      wall time the counter counts from;  watts: its power
  bad_reads  {"N": value}: the N-th counter read of this process returns `value` (0, -5, ...)
  kill       {"where": "ledger-append" | "checkpoint-write" | "cache-encode", "n": N}: SIGKILL
             this process inside the N-th such call (a ledger append is cut mid-line first)
  disk_full  {"ledger": [a, b]}: ledger appends a..b fail with ENOSPC (a full disk)
  hold       {"n": N, "until": PATH}: the N-th checkpoint file write waits until PATH exists
             (a run kept alive while a second process tries the same folder)
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from test_energy_fakes import FakeGpu, FakeNvml

BASE_MJ = 8_000_000
UUID = "GPU-faul7000-1111-2222-3333-444444444444"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class WallGpu(FakeGpu):
    """A fake GPU whose counter is the same function of wall time in every process."""

    def __init__(self, epoch: float, watts: float, bad: dict[int, int]) -> None:
        super().__init__(uuid=UUID, power_w=watts, power_avg_w=watts, limit_w=700.0)
        self.epoch, self.rate, self.bad = epoch, watts, bad

    def counter(self) -> int:
        self.reads += 1
        if self.reads in self.bad:
            return self.bad[self.reads]
        steps = math.floor((time.time() - self.epoch) / 0.1)
        return int(BASE_MJ + steps * 0.1 * self.rate * 1000)


def install(spec: dict[str, Any]) -> Callable[[], None]:
    """Put the simulated GPU and the spec's faults in place; returns the undo (for callers
    that run a session in their own process)."""
    from wattkd import checkpoint as ckpt
    from wattkd.energy import ledger
    from wattkd.energy.sources import nvml as sources
    from wattkd.teacher_cache import writer

    saved = [(sources, "_nvml_lib", sources._nvml_lib),
             (ledger._MeterBase, "_flush_pending", ledger._MeterBase._flush_pending),
             (ckpt.torch, "save", ckpt.torch.save), (writer, "_encode", writer._encode)]
    gpu = WallGpu(spec["epoch"], spec["watts"],
                  {int(k): int(v) for k, v in (spec.get("bad_reads") or {}).items()})
    sources._nvml_lib = lambda: FakeNvml([gpu])
    kill = spec.get("kill") or {}
    where, n = kill.get("where"), int(kill.get("n", 0))
    calls = [0]
    orig_flush = ledger._MeterBase._flush_pending
    full = (spec.get("disk_full") or {}).get("ledger")

    def flush(self: ledger._MeterBase, path: Path) -> None:
        calls[0] += 1
        if where == "ledger-append" and calls[0] == n:
            data = self._pending[-1]
            with open(path, "ab") as fh:      # the kill lands inside the append: a cut line
                fh.write(data[: len(data) // 2])
            _die()
        if full and full[0] <= calls[0] <= full[1]:
            real_write = os.write

            def enospc(fd: int, data: bytes) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")

            os.write = enospc
            try:
                return orig_flush(self, path)
            finally:
                os.write = real_write
        return orig_flush(self, path)

    ledger._MeterBase._flush_pending = flush
    if where == "checkpoint-write":
        real_save = ckpt.torch.save
        saves = [0]

        def save(obj: object, f: object, *a: object, **k: object) -> None:
            saves[0] += 1
            if saves[0] == n:                 # inside a checkpoint: model.pt half written
                real_save(obj, f, *a, **k)
                Path(f).write_bytes(Path(f).read_bytes()[:100])
                _die()
            real_save(obj, f, *a, **k)

        ckpt.torch.save = save
    hold = spec.get("hold")
    if hold:
        held_save = ckpt.torch.save
        writes = [0]

        def save_held(obj: object, f: object, *a: object, **k: object) -> None:
            writes[0] += 1
            if writes[0] == int(hold["n"]):
                while not Path(hold["until"]).exists():
                    time.sleep(0.02)
            held_save(obj, f, *a, **k)

        ckpt.torch.save = save_held
    if where == "cache-encode":
        orig = writer._encode
        encodes = [0]

        def encode(*a: object, **k: object) -> object:
            encodes[0] += 1
            if encodes[0] == n:               # mid-part: earlier parts complete
                _die()
            return orig(*a, **k)

        writer._encode = encode

    def undo() -> None:
        for obj, attr, value in saved:
            setattr(obj, attr, value)

    return undo


def run(spec: dict[str, Any]) -> int:
    """Run the spec's command: `wattkd train ...` through the CLI, or a teacher-cache build."""
    if spec["cmd"][0] == "cache":
        from wattkd.config import load
        from wattkd.teacher_cache import writer

        writer.build_cache(load(spec["cmd"][1]), spec["cmd"][2], progress=False)
        return 0
    from wattkd.cli import app

    try:
        app(spec["cmd"])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def main() -> None:
    spec = json.loads(sys.argv[1])
    install(spec)
    sys.exit(run(spec))


if __name__ == "__main__":
    main()
