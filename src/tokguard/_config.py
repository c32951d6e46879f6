"""The guard's mode: the TOKGUARD_MODE variable at import, then ``configure()`` calls.

Precedence is the usual one: the environment sets the starting value, code overrides it.
A bad value in the environment must never raise (it is read at import, and an exception
there would take a server down), so it warns and falls back to the default.
"""

from __future__ import annotations

import os
import sys
import warnings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType

ENV_VAR = "TOKGUARD_MODE"
MODES = ("warn", "raise", "off")
DEFAULT_MODE = "warn"

mode = DEFAULT_MODE
"""Read on every fork: a plain module global is the cheapest thing to look up."""


def _choices() -> str:
    return ", ".join(repr(m) for m in MODES)


def mode_from_env() -> str:
    """The mode TOKGUARD_MODE asks for; a warning and the default where it is invalid."""
    raw = os.environ.get(ENV_VAR)
    if raw is None or not raw.strip():
        return DEFAULT_MODE
    value = raw.strip().lower()
    if value in MODES:
        return value
    message = (
        f"{ENV_VAR}={raw!r} is not a tokguard mode; valid values are {_choices()}. "
        f"Using {DEFAULT_MODE!r}."
    )
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    except Warning:
        # -W error made the warning an exception; at import it would stop the guard (or a
        # server), so say it on stderr instead.
        sys.stderr.write(f"RuntimeWarning: {message}\n")
    return DEFAULT_MODE


def validate_mode(value: object, source: str) -> str:
    """``value`` if it is a mode, else a ValueError that names ``source`` and the choices."""
    if isinstance(value, str) and value in MODES:
        return value
    raise ValueError(f"{source}: {value!r} is not a tokguard mode; valid values are {_choices()}")


class configure:
    """Set the guard's mode; also a context manager that restores the previous mode.

    ``tokguard.configure(mode="raise")`` changes it for the rest of the process;
    ``with tokguard.configure(mode="off"): ...`` changes it for a block only.
    """

    def __init__(self, mode: str | None = None) -> None:
        self.previous = current_mode()
        if mode is not None:
            set_mode(validate_mode(mode, "tokguard.configure(mode=...)"))

    def __enter__(self) -> configure:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        set_mode(self.previous)

    def __repr__(self) -> str:
        return f"tokguard.configure(mode={current_mode()!r})"


def current_mode() -> str:
    """The mode in force now."""
    return mode


def set_mode(value: str) -> None:
    """Set an already validated mode (configure() and the pytest plugin validate first)."""
    global mode
    mode = value


def load_from_env() -> None:
    """Read TOKGUARD_MODE into the mode (import time, and ``tokguard.reset()``)."""
    set_mode(mode_from_env())
