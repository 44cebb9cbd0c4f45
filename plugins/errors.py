"""One clear line for bad input.

``UserError`` is raised for anything the user can fix (a bad option, a missing file). When it reaches
the top of a ``fairseq-*`` command, the hook installed by ``plugins/__init__.py`` prints
``error: <message>`` instead of a traceback, so the message, which says what to do, is what is seen.
Set ``EFFICIENT_LM_TRACEBACK=1`` to see the traceback anyway.
"""

import os
import sys


class UserError(ValueError):
    pass


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    if issubclass(exc_type, UserError) and not os.environ.get("EFFICIENT_LM_TRACEBACK"):
        print(f"error: {exc}", file=sys.stderr)
        return
    _previous(exc_type, exc, tb)


def install_excepthook() -> None:
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook
