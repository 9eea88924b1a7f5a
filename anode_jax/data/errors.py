"""Exceptions raised by the data pipeline."""

from __future__ import annotations


class DataError(RuntimeError):
    """A dataset could not be loaded: missing, truncated, corrupt or unsafe files.

    The message is a single line that names the offending file (or source) and the
    expected layout, so command-line tools can print it without a traceback.
    """
