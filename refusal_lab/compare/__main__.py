"""``python -m refusal_lab.compare <multirun sweep folder>``: compare its jobs, write the report, exit 1 if any failed."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from refusal_lab.errors import ConfigError

log = logging.getLogger("refusal_lab.compare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refusal_lab.compare", description=__doc__)
    parser.add_argument("folder", type=Path, help="a multirun sweep folder: multirun/<date>/<time>_<name>")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the comparison to W&B, even where the jobs did")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from refusal_lab.compare import compare_sweep

    try:
        summary = compare_sweep(args.folder, wandb=not args.no_wandb)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    return 1 if summary["n_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
