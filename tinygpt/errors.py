"""The exceptions for what a user can cause, and the one wrapper every command line uses to report them.

* :class:`UserError`: a mistake the user can fix (bad config, bad file, bad argument). The command prints
  ``error: <message>`` on stderr and exits with status 2, without a traceback. Messages are one line and name the file
  and the field or argument at fault.
* :class:`BrokenModelError`: the run finished and wrote its results, but they are not believable (garbage answers,
  scores under the floors; ``tinygpt.evaluation.health``). Same one line, exit status 3.
* Ctrl-C (KeyboardInterrupt) in a command: one line ``interrupted`` on stderr, exit status 130 (128 + SIGINT, as a
  shell reports a command stopped by Ctrl-C), no traceback.
* :func:`did_you_mean`: the `` (did you mean 'x'?)`` hint every message about a misspelt name uses.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Callable, Iterable

USER_ERROR_EXIT_CODE = 2
BROKEN_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT


class UserError(Exception):
    """A problem the user can fix: bad input file, bad config value, bad CLI argument."""


class BrokenModelError(UserError):
    """The run finished and wrote its results, but they are not believable (see the message)."""


def one_line(error: UserError) -> str:
    """The error's message. One raised in a torch DataLoader worker comes back as "Caught UserError in DataLoader
    worker process 0.\nOriginal Traceback ...": its own message is the traceback's last line, after the class name."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    return re.sub(r"^[\w.]*Error: ", "", text.rstrip().splitlines()[-1])


def report_errors(main: Callable[[], int | None]) -> int:
    """Run a command's body; a UserError becomes one ``error:`` line and exit status 2 (3 for BrokenModelError),
    Ctrl-C one ``interrupted`` line and exit status 130."""
    try:
        return int(main() or 0)
    except BrokenModelError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return BROKEN_EXIT_CODE
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def did_you_mean(name: str, choices: Iterable[str], *, cutoff: float = 0.6, form: str = " (did you mean {!r}?)",
                 prefix: str = "") -> str:
    """The hint for a misspelt ``name``: ``form`` filled with ``prefix`` + the closest of ``choices`` (difflib, at
    least ``cutoff`` alike), or "" when none is close. E.g. ``" (did you mean 'lora'?)"``."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return form.format(prefix + match[0]) if match else ""
