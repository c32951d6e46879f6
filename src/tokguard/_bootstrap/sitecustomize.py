"""tokguard's bootstrap for ``tokguard run``: guard every Python process of a command's tree.

``tokguard run -- CMD`` puts this folder first on ``PYTHONPATH``, so every Python interpreter
the command starts (spawned workers, re-execs, the forkserver) imports this module at start,
before its own code runs. ``opentelemetry-instrument`` and ``ddtrace-run`` work the same way.

It runs at the start of interpreters that may not be ours to slow down or break, so:

- it imports tokguard only when ``TOKGUARD_RUN=1`` (the folder may outlive the variable in
  a copied ``PYTHONPATH``), and nothing else that is not already loaded;
- no failure stops the interpreter: a tokguard that cannot be imported (another Python,
  a broken install) is one line on stderr, and the program runs unguarded;
- it then imports the ``sitecustomize`` module it shadows (Debian's, OpenTelemetry's,
  ddtrace's, your own), exactly as Python would have without it.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, NoReturn

GATE = "TOKGUARD_RUN"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _is_here(entry: str) -> bool:
    try:
        return os.path.abspath(entry) == _HERE
    except Exception:
        return False


def _first_on_path(env: "Mapping[str, str]") -> "str | None":
    """Move this folder to the front of ``env["PYTHONPATH"]`` where another went before it.

    A wrapper run inside ``tokguard run`` (``opentelemetry-instrument``) puts its own
    sitecustomize folder in front of ours and execs the command; its sitecustomize does not
    import the one it shadows, so ours would never run. Ours does import the next one, so
    with ours first, both run.
    """
    value = env.get("PYTHONPATH")
    if value is None or env.get(GATE) != "1":
        return None
    parts = value.split(os.pathsep)
    if not parts or _is_here(parts[0]) or not any(_is_here(p) for p in parts):
        return None
    return os.pathsep.join([_HERE] + [p for p in parts if not _is_here(p)])


def _wrap_exec() -> None:
    # os.execl/execlp/execvp/execvpe all end in os.execv or os.execve, looked up at call time.
    real_execv, real_execve = os.execv, os.execve

    def execv(path: "Any", args: "Any") -> "NoReturn":
        fixed = _first_on_path(os.environ)
        if fixed is not None:
            os.environ["PYTHONPATH"] = fixed
        real_execv(path, args)

    def execve(path: "Any", args: "Any", env: "Any") -> "NoReturn":
        fixed = _first_on_path(env)
        if fixed is not None:
            env = dict(env)
            env["PYTHONPATH"] = fixed
        real_execve(path, args, env)

    execv.__doc__, execve.__doc__ = real_execv.__doc__, real_execve.__doc__
    os.execv, os.execve = execv, execve  # type: ignore[assignment]


def _guard() -> None:
    if os.environ.get(GATE) != "1":
        return
    try:
        import tokguard  # noqa: F401  (installs the guard)
    except Exception as exc:
        sys.stderr.write(
            f"tokguard run: {sys.executable or 'this Python'} cannot import tokguard "
            f"({type(exc).__name__}: {exc}); this program runs unguarded. Install tokguard "
            "into this interpreter's environment.\n"
        )
        return
    _wrap_exec()


def _chain() -> None:
    """Import the sitecustomize this module shadows, as ``site`` would have."""
    me = sys.modules.get("sitecustomize")
    rest = [entry for entry in sys.path if not _is_here(entry)]
    if me is None or len(rest) == len(sys.path):
        return
    sys.path[:] = rest  # for good: the folder has done its work once this module ran
    del sys.modules["sitecustomize"]
    try:
        import sitecustomize  # type: ignore[import-not-found]  # noqa: F401  (the next one)
    except ImportError as exc:
        if exc.name != "sitecustomize":
            _site_error(exc)
    except Exception as exc:
        _site_error(exc)
    finally:
        # importlib re-reads sys.modules["sitecustomize"] after this module: keep an entry.
        if sys.modules.get("sitecustomize") is None:
            sys.modules["sitecustomize"] = me


def _site_error(exc: BaseException) -> None:
    # What site.py itself prints for a failing sitecustomize, and the interpreter goes on.
    if sys.flags.verbose:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    else:
        sys.stderr.write(
            "Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
            f"{type(exc).__name__}: {exc}\n"
        )


try:
    _guard()
except Exception as exc:  # never stop an interpreter start
    sys.stderr.write(f"tokguard run: bootstrap failed ({type(exc).__name__}: {exc})\n")
try:
    _chain()
except Exception as exc:
    sys.stderr.write(f"tokguard run: could not run the shadowed sitecustomize ({exc})\n")
