"""The report's one error type: an input or output it cannot use, named in the message."""

from __future__ import annotations

from feclip.errors import FEClipError

__all__ = ["ReportError"]


class ReportError(FEClipError, ValueError):
    """A results tree, a paper file or an output folder the report cannot use; the message names it."""
