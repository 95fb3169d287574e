"""What every command-line app shares: a usage mistake or a user error is one line on stderr and exit
status 2, Ctrl-C is exit status 130, and no traceback is shown for either.

``prog: error: <message>`` with the message's newlines folded, so that a log line or a shell prompt
shows all of it. Exit statuses: 0 success, 1 a failure that is not the user's (a download that broke),
2 a user mistake (bad argument, config, input file), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from feclip.errors import FEClipError

__all__ = ["OneLineParser", "fail", "one_line", "run_app"]


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) folded into one space."""
    return " ".join(str(message).split())


def fail(prog: str, message: object, status: int = 2) -> int:
    """Print ``prog: error: message`` on one line to stderr and return ``status``."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return status


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (with a pointer to ``--help``) and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def run_app(
    prog: str, body: Callable[[], int], failures: dict[type[BaseException], int] | None = None
) -> int:
    """Run ``body()`` and return its exit status, turning errors into one line and a status.

    ``failures`` maps further exception types to their status (checked first, in order), e.g. a
    download error to 1; :class:`~feclip.errors.FEClipError` is 2 and ``KeyboardInterrupt`` 130.
    """
    try:
        return body()
    except KeyboardInterrupt as err:
        detail = f" {one_line(err)}" if str(err) else ""
        print(f"{prog}: interrupted{detail}", file=sys.stderr)
        return 130
    except Exception as err:
        for kind, status in (failures or {}).items():
            if isinstance(err, kind):
                return fail(prog, err, status)
        if isinstance(err, FEClipError):
            return fail(prog, err)
        raise
