"""The faults a user can fix, and how every command line reports them: one line, exit status 2.

Anything else is a bug of the kit and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys

__all__ = ["TooLittleData", "user_error", "user_errors", "report", "environment_fault", "os_fault_message"]


class TooLittleData(ValueError):
    """Too few rows for a computation; the message says how many are needed and which key gives more."""


_USER_ERRORS: list[type[BaseException]] = []


def user_error(cls: type[BaseException]) -> type[BaseException]:
    """Class decorator: mark an exception type as a fault the user can fix from its message alone."""
    _USER_ERRORS.append(cls)
    return cls


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is the whole story (:func:`user_error` ones and a few OS ones)."""
    return (*_USER_ERRORS, FileNotFoundError, ValueError)


def report(exc: BaseException) -> int:
    """Print ``error: <message>`` to stderr and return 2."""
    message = os_fault_message(exc) if environment_fault(exc) else exc
    print(f"error: {message}", file=sys.stderr)
    return 2


_WRITABLE = "choose a folder you can write for --out, or make it writable (chmod u+w)"
_FULL = "free some space (or choose --out on another disk) and rerun the same command: finished work is kept"
# errno → (what happened, the fix)
_OS_FAULTS = {
    errno.ENOSPC: ("no space left on the device", _FULL),
    errno.EDQUOT: ("disk quota exceeded", _FULL),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("operation not permitted", _WRITABLE),
    errno.EROFS: ("read-only file system", "choose --out on a writable file system"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another --out"),
    errno.EEXIST: ("a file of that name is in the way", "choose another --out"),
    errno.ENOENT: ("it cannot be created there", "choose another --out"),
}


def environment_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``OSError`` of the machine the user can fix (a full disk, no permission …).

        >>> environment_fault(OSError(errno.ENOSPC, "No space left on device")), environment_fault(OSError(errno.EBADF, "x"))
        (True, False)
    """
    return isinstance(exc, OSError) and exc.errno in _OS_FAULTS and exc.errno != errno.ENOENT


def os_fault_message(exc: OSError, what: str | None = None) -> str:
    """One line for an ``OSError`` of the machine: ``cannot write <what or the file>: <reason>; <fix>``.

        >>> os_fault_message(OSError(errno.ENOSPC, "No space left on device", "run/notebooks/00_data.ipynb"))
        'cannot write run/notebooks/00_data.ipynb: no space left on the device; free some space (or choose --out on another disk) and rerun the same command: finished work is kept'
    """
    reason, fix = _OS_FAULTS.get(exc.errno, (exc.strerror or str(exc), "choose another --out"))
    return f"cannot write {what or exc.filename or 'a file of the run'}: {reason}; {fix}"
