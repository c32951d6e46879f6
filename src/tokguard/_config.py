"""The guard's mode: the TOKGUARD_MODE variable at import, then ``configure()`` calls.

Precedence is the usual one: the environment sets the starting value, code overrides it.
A bad value in the environment must never raise (it is read at import, and an exception
there would take a server down), so it warns and falls back to the default.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType

MODE_VAR = "TOKGUARD_MODE"
MODES = ("warn", "raise", "off")
DEFAULT_MODE = "warn"

mode = DEFAULT_MODE
"""Read on every fork: a plain module global is the cheapest thing to look up."""


def choices(values: tuple[str, ...]) -> str:
    """``'a', 'b', 'c'``: how every message names the valid values."""
    return ", ".join(repr(v) for v in values)


def validate(value: object, source: str, what: str, values: tuple[str, ...]) -> str:
    """``value`` if it is one of ``values``, else a ValueError naming ``source`` and the choices.

    The one validator of tokguard's settings (``configure()``, ``master_mode()``, the pytest
    plugin's option, ini value and markers), so every bad value is reported the same way.
    """
    if isinstance(value, str) and value in values:
        return value
    raise ValueError(f"{source}: {value!r} is not {what}; valid values are {choices(values)}")


def from_env(var: str, what: str, values: tuple[str, ...], default: str) -> str:
    """The value ``var`` asks for; a warning and ``default`` where it is invalid.

    Read at import: an exception there would take a server down, so a bad value warns.
    """
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in values:
        return value
    message = f"{var}={raw!r} is not {what}; valid values are {choices(values)}. Using {default!r}."
    import warnings  # only for a bad value: not loaded at interpreter start, ~0.25 ms

    try:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    except Warning:
        # -W error made the warning an exception; at import it would stop the guard (or a
        # server), so say it on stderr instead.
        sys.stderr.write(f"RuntimeWarning: {message}\n")
    return default


def mode_from_env() -> str:
    """The mode TOKGUARD_MODE asks for; a warning and the default where it is invalid."""
    return from_env(MODE_VAR, "a tokguard mode", MODES, DEFAULT_MODE)


def validate_mode(value: object, source: str) -> str:
    """``value`` if it is a mode, else a ValueError that names ``source`` and the choices."""
    return validate(value, source, "a tokguard mode", MODES)


class configure:
    """Set the guard's mode; also a context manager that restores the previous mode.

    ``tokguard.configure(mode="raise")`` changes it for the rest of the process;
    ``with tokguard.configure(mode="off"): ...`` changes it for a block only.
    """

    def __init__(self, mode: str | None = None) -> None:
        self.previous = current_mode()
        if mode is not None:
            set_mode(validate_mode(mode, "tokguard.configure(mode=...)"))

    def __enter__(self) -> "configure":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: "TracebackType | None",
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
