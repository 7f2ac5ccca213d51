"""The stage modules' shared command line, ``python -m ncis_core.stages.<stage> --preset P --out DIR``
(also under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Callable, Sequence

__all__ = ["stage_main"]


def stage_main(argv: Sequence[str] | None, name: str, stage_run: Callable) -> int:
    """Parse the arguments, create the run folder and run ``stage_run``; returns the exit status."""
    from ..config import load_run_config
    from ..device import process_state
    from ..errors import environment_fault, report, user_errors
    from ..runs import RunDir, write_lock

    parser = argparse.ArgumentParser(prog=f"python -m ncis_core.stages.{name}",
                                     description=f"Run stage {name} (also under accelerate launch).")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", required=True, help="the run folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="STAGE.KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_run_config(args.preset, args.overrides, out=args.out)
        state, _ = process_state(cfg.run.device)
        # the main process holds the folder's writer lock (the others write their shards under it)
        lock = write_lock(cfg.run.out, f"python -m ncis_core.stages.{name}") if state.is_main_process \
            else contextlib.nullcontext()
        with lock:
            if state.is_main_process:
                RunDir.create(cfg)
            state.wait_for_everyone()
            stage_run(cfg, RunDir(cfg.run.out, cfg), progress=not args.no_progress)
    except user_errors() as exc:
        return report(exc)
    except OSError as exc:  # a full disk, no permission, a read-only file system
        if not environment_fault(exc):
            raise
        return report(exc)
    return 0
