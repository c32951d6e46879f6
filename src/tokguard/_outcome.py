"""What a ``tokguard`` command came to, and its bad-input error, shared by ``cli`` and the commands.

A module of its own so that the commands never import ``cli`` (which imports them): a
command returns an outcome, and the CLI alone turns it into an exit status
(``cli.EXIT_FOR``), the interface a CI gate reads.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    #: ``check`` returns its verdict's status (the JSON's ``status``); ``doctor`` and ``demo``
    #: "ok" or "unsafe"; ``run`` returns only when it cannot exec the command.
    Outcome = Literal[
        "ok",
        "safe",
        "unsafe",
        "import-failed",
        "module-not-found",
        "attribute-not-found",
        "timeout",
        "error",
        "cannot-execute",
        "command-not-found",
    ]


class UsageError(Exception):
    """Bad input from the command line; the message names the input and the valid choices."""
