#!/usr/bin/env python3
"""Regenerate the plain sbatch wrappers in scripts/slurm/ from the package's templates.

The wrappers are for users who prefer editing batch files to `wattkd slurm submit`: the same
templates (src/wattkd/slurm/templates) make both, so a fix to the signal/requeue logic reaches
both. Resources (#SBATCH lines) come from the `slurm` section of --config.

    python scripts/generate.py                      # from configs/demo.yaml
    python scripts/generate.py --config my.yaml     # resources of your cluster config
    python scripts/generate.py --check              # exit 1 if scripts/slurm/ is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "scripts" / "slurm"
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                    help="experiment YAML whose slurm section gives the resources")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for the .sbatch files")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; fail if a wrapper differs from the templates")
    args = ap.parse_args(argv)

    from wattkd.atomic import atomic_write_text
    from wattkd.config import ConfigError, load
    from wattkd.slurm.scripts import wrapper_scripts

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scripts = wrapper_scripts(cfg)
    stale = sorted(name for name, text in scripts.items()
                   if not (args.out / name).is_file() or (args.out / name).read_text() != text)
    if args.check:
        if stale:
            print(f"out of date in {args.out}: {', '.join(stale)}; run python scripts/generate.py",
                  file=sys.stderr)
            return 1
        print(f"{len(scripts)} wrappers in {args.out} are up to date")
        return 0
    for name, text in scripts.items():
        path = atomic_write_text(args.out / name, text)
        path.chmod(0o755)
    print(f"wrote {len(scripts)} wrappers to {args.out} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
