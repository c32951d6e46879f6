"""TOKENIZERS_PARALLELISM, read exactly the way the tokenizers Rust crate reads it.

tokenizers reads the variable through the C environment on every call, so this module
reads the C environment too: ``os.environ`` is a snapshot taken at interpreter start and
misses ``os.putenv`` and values set by C code.
"""

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

PARALLELISM_VAR = "TOKENIZERS_PARALLELISM"

# tokenizers/src/utils/parallelism.rs: lower-cased, not trimmed, unset counts as true.
FALSE_VALUES = frozenset({"", "off", "false", "f", "no", "n", "0"})

# Names people type instead of PARALLELISM_VAR; tokenizers ignores them silently.
MISSPELLINGS = (
    "TOKENIZER_PARALLELISM",
    "TOKENIZERS_PARALLEL",
    "TOKENIZERS_PARALLELISME",
    "TOKENISERS_PARALLELISM",
    "TOKENIZERS_PARRALELISM",
    "TOKENIZERS_PARALELLISM",
    "TOKENIZERS_PARALLELSIM",
    "HF_TOKENIZERS_PARALLELISM",
)

TOKGUARD_SET_DEFAULT = False
"""True once tokguard itself set PARALLELISM_VAR=false because the process had no value."""

_getenv = None


def parallel(value: str | None) -> bool:
    """Whether tokenizers would run its rayon pool given this raw value (None = unset)."""
    if value is None:
        return True
    return value.lower() not in FALSE_VALUES


def c_getenv(name: str) -> str | None:
    """The value the C library (and so tokenizers) sees right now."""
    global _getenv
    if _getenv is None:
        try:
            import ctypes

            func = ctypes.CDLL(None).getenv
            func.restype = ctypes.c_char_p
            func.argtypes = [ctypes.c_char_p]
            _getenv = func
        except (ImportError, OSError, AttributeError):
            # No C library to ask (an unusual platform): os.environ is the next best thing.
            return os.environ.get(name)
    raw = _getenv(os.fsencode(name))
    return None if raw is None else os.fsdecode(raw)


_PARALLELISM_BYTES = PARALLELISM_VAR.encode()
_FALSE_BYTES = frozenset(v.encode() for v in FALSE_VALUES)


def c_parallel() -> bool:
    """``parallel(c_getenv(PARALLELISM_VAR))``, about three times faster: the wrappers' hot path.

    bytes.lower() only folds ASCII, like the false set itself; no non-ASCII character
    lower-cases to one of its letters, so the answer is the same as tokenizers' own.
    """
    if _getenv is None:
        c_getenv(PARALLELISM_VAR)
        if _getenv is None:
            return parallel(os.environ.get(PARALLELISM_VAR))
    raw = _getenv(_PARALLELISM_BYTES)
    return raw is None or raw.lower() not in _FALSE_BYTES


_on_change: "list[Callable[[], None]]" = []


def on_parallelism_change(callback: "Callable[[], None]") -> None:
    """Call ``callback`` after every change of PARALLELISM_VAR made from Python.

    Why: a padded ``encode`` is too short to read the C environment on every call (about
    5 % of it), so the tokenizers pool wraps it only while parallelism is on, and needs to
    hear when that changes. ``os.environ`` writes and deletes go through ``os.putenv`` and
    ``os.unsetenv`` (looked up in the os module on each call, CPython 3.9 and later), so
    wrapping those two sees every change made from Python; one made by C code is not seen,
    and the pool's fork-time check covers it.
    """
    if not _on_change:
        os.putenv = _notifying(os.putenv)
        os.unsetenv = _notifying(os.unsetenv)
    _on_change.append(callback)


def _notifying(real: "Callable[..., None]") -> "Callable[..., None]":
    def wrapper(name: "Any", *args: "Any") -> None:
        real(name, *args)
        # os.environ passes the name encoded; bytes and str are never compared (python -b).
        if name == (_PARALLELISM_BYTES if isinstance(name, bytes) else PARALLELISM_VAR):
            for callback in _on_change:
                try:
                    callback()
                except Exception as exc:  # a tokguard bug must not break the user's putenv
                    from ._report import internal_error

                    internal_error(f"watching {PARALLELISM_VAR}", exc)

    wrapper.__name__ = real.__name__
    wrapper.__qualname__ = real.__name__
    wrapper.__doc__ = real.__doc__
    wrapper.__wrapped__ = real  # type: ignore[attr-defined]
    return wrapper


def _c_has(name: str) -> bool:
    """Whether the C environment holds ``name``, without importing ctypes.

    ``import ctypes`` costs several milliseconds, which would blow the import budget of
    ``import tokguard``; the ``_ctypes`` extension alone is cheap. ``call_function`` returns
    the low 32 bits of the pointer, so only "zero or not" is read from it.
    """
    try:
        import _ctypes

        handle = _ctypes.dlopen(None)  # type: ignore[arg-type]
        address = _ctypes.call_function(_ctypes.dlsym(handle, "getenv"), (os.fsencode(name),))
        return bool(address)
    except Exception:
        return c_getenv(name) is not None


def apply_default() -> None:
    """Set PARALLELISM_VAR=false where the process has no value at all, keeping any value a user set.

    Why false by default: a fork after the rayon pool ran hangs the child whenever the
    variable holds a true value (hang-table row 2), and tokenizers' own guard only covers
    the unset case. Serial tokenization in the parent is the price; a user who sets the
    variable keeps their choice and tokguard repairs the children instead.
    """
    global TOKGUARD_SET_DEFAULT
    if PARALLELISM_VAR in os.environ or _c_has(PARALLELISM_VAR):
        return
    os.environ[PARALLELISM_VAR] = "false"  # also calls putenv, so tokenizers sees it
    TOKGUARD_SET_DEFAULT = True


def force_serial() -> None:
    """Child repair: tokenizers serial in this process, in both environments."""
    os.environ[PARALLELISM_VAR] = "false"
    # Code that rebound os.environ to a plain dict would leave the C value untouched.
    os.putenv(PARALLELISM_VAR, "false")
