"""Name the line of the user's own code behind a pool's first use or a fork.

A report that says "os.py:123" or "multiprocess/popen_fork.py:66" helps nobody; the useful
line is the first frame, walking outwards, of the user's own code. A hand-kept list of
library names always misses one (``multiprocess`` is not ``multiprocessing``; a celery
worker forks from inside ``click``), so a frame is judged by what its file *is*: code of
the standard library, or of an installed distribution (a site-packages or dist-packages
directory, or the interpreter's scripts directory, where console scripts live), is a
library; tokguard is one too. Everything else is the user's: a script, ``python -c`` code,
an editable install of their project, a test file. Whole ``sys.prefix`` trees are not used:
a system Python has ``sys.prefix`` ``/usr``, and applications live in ``/usr/src/app``.

The judgement is cached per file name, so a walk costs one dict lookup per frame once
each file has been seen, and no traceback or inspect import.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType

# What the walk is for. Kept as the names callers already pass; the frames skipped are the
# same for both (every library), only the wording without a user frame differs.
POOL_LIBRARIES = "first use"
FORK_LIBRARIES = "fork"

TOKGUARD_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_roots: tuple[str, ...] | None = None
_stdlib_roots: tuple[str, ...] = ()
_kinds: dict[str, int] = {}  # file name -> _USER, _LIBRARY or _STDLIB
_USER, _LIBRARY, _STDLIB = 0, 1, 2


def _real(path: str) -> str:
    return os.path.realpath(path).rstrip(os.sep) + os.sep


def _load_roots() -> tuple[str, ...]:
    """Directories whose files are library code; read once, at the first report."""
    global _roots, _stdlib_roots
    import sysconfig  # not at import: only a report or a first use needs it

    stdlib: set[str] = set()
    installed: set[str] = {TOKGUARD_DIR}
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        variables = {"base": prefix, "platbase": prefix, "installed_base": prefix}
        paths = sysconfig.get_paths(vars=variables)
        stdlib.update(paths[key] for key in ("stdlib", "platstdlib") if key in paths)
        installed.update(paths[key] for key in ("purelib", "platlib", "scripts") if key in paths)
    site = sys.modules.get("site")
    if site is not None:
        installed.update(getattr(site, "getsitepackages", list)())
        user_site = getattr(site, "ENABLE_USER_SITE", False) and getattr(site, "USER_SITE", None)
        if user_site:
            installed.add(user_site)
    # Distributions put on sys.path by other means (PYTHONPATH, pipx, a zipapp's vendor dir).
    installed.update(
        p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")
    )
    _stdlib_roots = tuple(sorted({_real(p) for p in stdlib if p}))
    # site-packages lives inside the standard library's directory: test it first.
    _roots = tuple(sorted({_real(p) for p in installed if p}))
    return _roots


def _kind(filename: str) -> int:
    kind = _kinds.get(filename)
    if kind is not None:
        return kind
    roots = _roots if _roots is not None else _load_roots()
    if filename.startswith("<"):
        # "<frozen os>" is the standard library; "<string>" (python -c), "<stdin>" and a
        # notebook cell are the user's.
        kind = _STDLIB if filename.startswith("<frozen ") else _USER
    else:
        path = _real(filename)
        if path.startswith(roots):
            kind = _LIBRARY
        elif path.startswith(_stdlib_roots):
            kind = _STDLIB
        else:
            kind = _USER
    _kinds[filename] = kind
    return kind


def is_users(filename: str) -> bool:
    """Whether code from this file is the user's own (not a library, not the stdlib)."""
    return _kind(filename) == _USER


def _describe(frame: FrameType) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _package(frame: FrameType) -> str:
    name = frame.f_globals.get("__name__") or "?"
    if name == "__main__":  # `python -m celery`: the module's real name is in its spec
        spec = frame.f_globals.get("__spec__")
        name = getattr(spec, "name", None) or name
    return str(name).partition(".")[0]


def entry_point() -> str:
    """The command this process runs, as a person would type it (``celery -A proj worker``)."""
    argv = list(getattr(sys, "argv", None) or [])
    if not argv or not argv[0]:
        return "an interactive or embedded interpreter"
    first = argv[0]
    if first == "-c":
        name = "python -c ..."
        argv = []
    elif os.path.basename(first) == "__main__.py":
        name = f"python -m {os.path.basename(os.path.dirname(first))}"
    elif _kind(first) == _USER and first.endswith(".py"):
        name = f"python {first}"
    else:
        name = os.path.basename(first)
    command = " ".join([name, *argv[1:]])
    return command if len(command) <= 100 else command[:97] + "..."


def walk(depth: int = 1) -> tuple[FrameType | None, list[str]]:
    """(the innermost frame of the user's code or None, the libraries passed on the way).

    The libraries are the top-level packages of the installed distributions between the
    caller and that frame, innermost first, or where there are none the standard-library
    modules: they say which library forked or used a pool.
    """
    try:
        frame: FrameType | None = sys._getframe(depth + 1)
    except ValueError:
        return None, []
    installed: list[str] = []
    stdlib: list[str] = []
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(TOKGUARD_DIR):
            kind = _kind(filename)
            if kind == _USER:
                return frame, installed or stdlib
            package = _package(frame)
            passed = installed if kind == _LIBRARY else stdlib
            if package not in ("__main__", "os", "posix") and package not in passed[:1]:
                # Innermost first, outermost last: "billiard, called by celery".
                if package in passed:
                    passed.remove(package)
                passed.append(package)
        frame = frame.f_back
    return None, installed or stdlib


def no_user_frame(passed: list[str], purpose: str) -> str:
    """What to name when no frame of the user's code is on the stack."""
    if not passed:
        actor = "the interpreter"
    elif len(passed) == 1:
        actor = passed[0]
    else:
        actor = f"{passed[0]} (called by {passed[-1]})"
    if purpose == FORK_LIBRARIES:
        return f"no line of your own code ({actor} forked, in `{entry_point()}`)"
    # Worded like the probes' "not recorded (...)", which the report renders as such.
    return f"not recorded (no line of your own code: {actor} used the pool, in `{entry_point()}`)"


def user_site(purpose: str = FORK_LIBRARIES, depth: int = 1) -> str | None:
    """``file:line in function`` of the innermost frame of the user's own code.

    Where no frame of the user's code is on the stack (a celery worker forking its pool,
    gunicorn's arbiter loop), says so and names the entry point and the library instead.
    """
    frame, passed = walk(depth + 1)
    if frame is not None:
        return _describe(frame)
    return no_user_frame(passed, purpose)
