"""``tokguard run [--mode MODE] -- CMD ARGS...``: guard a command's Python processes, unedited.

It sets ``TOKGUARD_RUN=1`` (and ``TOKGUARD_MODE`` when ``--mode`` is given), puts the
bootstrap folder (``_bootstrap/``, holding a ``sitecustomize.py``) first on ``PYTHONPATH``,
and replaces itself with the command (``execve``): same pid, signals and exit status are the
command's own, and no wrapper process stays behind. Every Python interpreter of the tree
then imports tokguard at start, because the variables pass down to children.

What cannot work is said before the exec, on stderr: a missing command (127, like a shell),
a file that cannot be executed (126), and, as warnings, interpreters that will skip the
bootstrap (``-I``, ``-E``, ``-S``) and programs that are not Python at all.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from . import _config, _env
from ._outcome import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._outcome import Outcome

GATE = "TOKGUARD_RUN"
BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")

_PYTHON_NAME = re.compile(r"^(python|pypy)[0-9.]*[a-z]?$")
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox"})
_SKIP = {
    "I": "isolated mode ignores PYTHONPATH and every PYTHON* variable",
    "E": "it ignores PYTHONPATH and every PYTHON* variable",
    "S": "it skips the site module, which is what imports sitecustomize",
}
_INSTEAD = "tokguard run cannot guard it; put `import tokguard` first in the program instead"


def environment(base: Mapping[str, str], mode: str | None) -> dict[str, str]:
    """The command's environment: ``base`` plus the gate, the mode and the bootstrap folder."""
    env = dict(base)
    env[GATE] = "1"
    if mode is not None:
        env[_config.MODE_VAR] = mode
    old = env.get("PYTHONPATH")
    # Empty entries mean "the current directory" to Python: keep them as they are.
    rest = [] if not old else [p for p in old.split(os.pathsep) if not _is_bootstrap(p)]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP, *rest])
    if _env.TOKGUARD_SET_DEFAULT and env.get(_env.PARALLELISM_VAR) == "false":
        # This process's own `import tokguard` set it; the command must not take it for the
        # user's choice (its own tokguard sets the same default, and knows it did).
        del env[_env.PARALLELISM_VAR]
    return env


def _is_bootstrap(entry: str) -> bool:
    return bool(entry) and os.path.abspath(entry) == BOOTSTRAP


def resolve(command: str, path: str | None = None) -> str | None:
    """The file ``command`` runs, found as a shell finds it; None when there is none."""
    if os.sep in command:
        return command if os.path.exists(command) else None
    return shutil.which(command, path=path)


def python_flags(args: list[str]) -> list[str]:
    """The flags among I, E, S that a Python command line ``args`` (after the interpreter) sets."""
    found: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        if arg.startswith("--"):
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        for j, flag in enumerate(arg[1:], 1):
            if flag in "cm":
                return found  # what follows is the program's
            if flag in "WXQ":
                if j == len(arg) - 1:
                    i += 1  # the value is the next argument
                break
            if flag in _SKIP and flag not in found:
                found.append(flag)
        i += 1
    return found


def _shebang(path: str) -> list[str] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    if line and os.path.basename(line[0]) == "env":
        line = line[1:]  # `#!/usr/bin/env -S python3 -E`: the interpreter follows env's options
        while line and line[0].startswith("-"):
            line = line[1:]
    return line


def _embeds_python(path: str) -> bool:
    """Whether an executable runs Python inside (uWSGI does): it names Py_Initialize."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"Py_Initialize") != -1
    except (OSError, ValueError):
        return False


def warnings_for(argv: list[str], path: str) -> list[str]:
    """What will keep the bootstrap out of the command's interpreter, as far as can be told."""
    name = argv[0]
    shebang = _shebang(path)
    if shebang is not None:
        interpreter = os.path.basename(shebang[0]) if shebang else ""
        if _PYTHON_NAME.match(interpreter):
            flags = python_flags(shebang[1:])
            return [
                f"{name}: its #! line runs Python with -{f} ({_SKIP[f]}): {_INSTEAD}" for f in flags
            ]
        if interpreter in _SHELLS:
            return []  # a shell script: the variables pass down to the Pythons it starts
        return [
            f"{name} is a {interpreter or 'script'} program, not Python: only Python "
            "processes it starts are guarded"
        ]
    real = os.path.basename(os.path.realpath(path))
    if _PYTHON_NAME.match(real) or _PYTHON_NAME.match(os.path.basename(path)):
        return [f"{name} -{f}: {_SKIP[f]}: {_INSTEAD}" for f in python_flags(argv[1:])]
    if _embeds_python(path):
        return []
    return [f"{name} is not a Python program: only Python processes it starts are guarded"]


def main(command: list[str], mode: str | None) -> Outcome:
    """Exec ``command`` guarded; returns only when it cannot (the CLI exits 127 or 126)."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("a command is required: tokguard run [--mode MODE] -- CMD [ARGS...]")
    if mode is not None:
        try:
            mode = _config.validate_mode(mode.strip().lower(), "--mode")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    name = command[0]
    path = resolve(name)
    if path is None:
        sys.stderr.write(f"tokguard run: {name}: command not found\n")
        return "command-not-found"
    if os.path.isdir(path):
        sys.stderr.write(f"tokguard run: {name}: Is a directory\n")
        return "cannot-execute"
    if not os.stat(path).st_mode & 0o111 or not os.access(path, os.X_OK):
        sys.stderr.write(f"tokguard run: {name}: Permission denied\n")
        return "cannot-execute"
    for line in warnings_for(command, path):
        sys.stderr.write(f"tokguard run: warning: {line}\n")
    env = environment(os.environ, mode)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(path, command, env)
    except OSError as exc:
        sys.stderr.write(f"tokguard run: {name}: {exc.strerror or exc}\n")
    return "cannot-execute"
