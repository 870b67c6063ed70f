"""Errors a user can fix, and how every command line reports them.

Expected failures (a bad flag or config value, a missing or unreadable file, an incompatible
checkpoint, a bad dataset, a full disk) are :class:`UserError` subclasses. Command lines run
their ``main`` through :func:`run_cli`, which prints one ``error: ...`` line on stderr and
returns a non-zero exit status; anything else is a bug and keeps its traceback. Set
``ITPN_DEBUG=1`` to get the traceback of expected errors too. Imports no detectron2.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Optional

DEBUG_ENV = "ITPN_DEBUG"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """An expected error whose message names the problem, the file or flag, and the fix."""


class DiskFullError(UserError, OSError):
    """Writing a file failed because its disk is full (or over quota)."""


def one_line(message: str) -> str:
    """``message`` on one line: detail lines are joined with ``; ``."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def disk_full_message(error: OSError, what: str = "") -> Optional[str]:
    """A message for ``ENOSPC`` / ``EDQUOT`` (also when torch wraps them), else ``None``."""
    text = str(error)
    codes = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if getattr(error, "errno", None) in codes or "No space left" in text \
            or "unexpected pos" in text:  # torch's zip writer on a full disk
        where = f" writing {what}" if what else ""
        return (f"no space left on device{where}: free some space or choose another output "
                f"folder; the last complete checkpoint was kept")
    return None


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def run_cli(main: Callable[[], Optional[int]]) -> int:
    """Call ``main()``; turn expected errors into one ``error:`` line and exit status 2.

    Returns ``main``'s status (``None`` counts as 0). ``KeyboardInterrupt`` returns 130.
    """
    try:
        status = main()
    except UserError as e:
        if debug_enabled():
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        message = disk_full_message(e)
        if message is None or debug_enabled():
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(status or 0)
