"""The faults a user can fix, and how every command line reports them: one line, exit status 2.

A fault of this kind (a bad config value, a missing dataset or artefact, a stale input, a failed
notebook) says what is wrong and how to fix it in its message; a traceback would only bury that.
Anything else is a bug of the kit and keeps its traceback.
"""

from __future__ import annotations

import sys

__all__ = ["user_errors", "report"]


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is the whole story (imported on demand: cheap CLIs)."""
    from .config import ConfigError
    from .data.base import DataError
    from .diffusion import PipelineLoadError
    from .runner import NotebookFailed
    from .runs import MissingArtefactError, RunFolderBusy, StaleArtefactError

    return (ConfigError, DataError, PipelineLoadError, NotebookFailed, MissingArtefactError, StaleArtefactError,
            RunFolderBusy, FileNotFoundError, ValueError)


def report(exc: BaseException) -> int:
    """Print ``error: <first line of the message>`` (plus any further lines it has) to stderr; 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2
