"""Errors that describe a user's mistake (bad input, missing files, wrong options).

The command-line entry points catch :class:`FEClipError` and print its message on one line without a
traceback; library users get ordinary exceptions (each also subclasses the matching builtin, so
``except ValueError`` keeps working).
"""

from __future__ import annotations


class FEClipError(Exception):
    """Base class for errors caused by input or configuration, not by a bug in feclip."""


class ConfigError(FEClipError, ValueError):
    """An option has a value outside the allowed set; the message names the field and the allowed values."""


class DatasetError(FEClipError, ValueError):
    """A dataset root does not have the expected layout, or a file in it cannot be used."""


class WeightsNotFoundError(FEClipError, FileNotFoundError):
    """CLIP weights are neither on disk nor downloadable (e.g. offline)."""


class CheckpointMismatchError(FEClipError, ValueError):
    """An adapter file does not fit the model it is loaded into (other backbone or tap set)."""
