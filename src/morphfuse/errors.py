"""Exceptions shared by every stage, and the exit statuses of the CLI.

Exit statuses of every ``morphfuse`` subcommand (``morphfuse.cli.main``):

  0  success
  1  the run completed, but some inputs could not be used (each one is listed on stderr and in the ledger)
  2  usage error: a bad option, config value, bundle or input path; nothing was computed (one line on stderr)
  3  an output could not be written (no space left, read-only file system, permission denied); one line naming
     the path and the cause. Everything finished before it is kept, no partial file is left, and running the
     same command again resumes where a stage supports it (``detect``, ``fuse``)
  130, 143  interrupted (Ctrl-C, SIGTERM); what was finished is kept, as for 3
"""
from __future__ import annotations

import errno as _errno
import os

EXIT_OK = 0
EXIT_BAD_INPUTS = 1
EXIT_USAGE = 2
EXIT_WRITE = 3


class UserError(Exception):
    """A problem the user can fix (bad config value, missing file). The CLI prints it as one line, no traceback."""


def describe_oserror(e: BaseException) -> str:
    """A short cause for an OS error: its strerror (e.g. 'No space left on device'), without the file name."""
    if isinstance(e, OSError):
        if e.errno is not None:
            return e.strerror or os.strerror(e.errno)
        return str(e) or type(e).__name__
    return str(e) or type(e).__name__


class OutputError(UserError):
    """An output could not be written (no space left, read-only file system, permission denied): exit status 3.

    ``str(err)`` is one line naming the path and the cause. ``errno`` is the OS error number (or None).
    """

    exit_status = EXIT_WRITE

    def __init__(self, path: str | os.PathLike, cause: BaseException | str):
        self.path = str(path)
        self.errno = getattr(cause, "errno", None)
        why = cause if isinstance(cause, str) else describe_oserror(cause)
        hint = ""
        if self.errno in (_errno.ENOSPC, _errno.EDQUOT):
            hint = " (free some space, then run the same command again)"
        super().__init__(f"cannot write {self.path}: {why}{hint}")


class Interrupted(BaseException):
    """Raised in the main thread when SIGTERM arrives during a long stage (see :func:`sigterm_raises`), so that
    ``finally`` blocks run (locks released, files closed); the CLI exits 128 + the signal number (143)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signum}")


class sigterm_raises:  # noqa: N801 - used as a context manager
    """Within the block, SIGTERM raises :class:`Interrupted` (main thread only; elsewhere it does nothing)."""

    def __enter__(self):
        import signal
        import threading

        self.old = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise Interrupted(signum)

            self.old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False
