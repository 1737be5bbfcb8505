"""Exceptions shared by every stage."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config value, missing file). The CLI prints it as one line, no traceback."""
