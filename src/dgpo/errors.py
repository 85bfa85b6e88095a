"""The one error type for problems a user can fix: a missing package, binary, server, file or setting.

The command line prints a ``UserError`` (and ``ValueError`` / ``FileNotFoundError``, which the config,
prompt and model checks raise) as one line, ``dgpo: error: ...``, with exit status 2. Anything else is
a bug or a failure of the machine (out of memory, a crashed worker) and keeps its traceback.
"""
from __future__ import annotations


class UserError(RuntimeError):
    """A problem the user can fix; its message says what and how."""
