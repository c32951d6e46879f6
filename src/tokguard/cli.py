"""The ``tokguard`` command (also ``python -m tokguard``): ``doctor``, ``check``, ``demo``, ``run``.

Exit statuses are part of the interface, because ``tokguard check`` is meant as a CI gate
and a gate must tell "your app is unsafe" apart from "the gate itself was called wrongly".
argparse's own status 2 for a usage error would collide with "the app failed to import",
so usage errors use 64 (``EX_USAGE`` of sysexits.h) instead.

This module alone knows the statuses: each command returns an outcome (``_outcome``) and
``EXIT_FOR`` maps it, so the commands never import ``cli`` and ``cli`` imports each command
only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from ._outcome import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from ._outcome import Outcome

__all__ = ["EXIT_FOR", "EXIT_STATUSES", "UsageError", "build_parser", "main", "run"]

# Exit statuses, documented in docs/cli.md; keep the two in step. `run` has no status of
# its own when it works: it becomes the command. When it cannot, it exits as a shell would.
EXIT_OK = 0
"""doctor ran; check found the app safe; demo: every row behaved as expected with tokguard."""
EXIT_UNSAFE = 1
"""check: a worker forked now would hang; demo: a row still hung or failed with tokguard."""
EXIT_IMPORT_FAILED = 2
"""check: the app raised while being imported (its traceback is printed)."""
EXIT_NOT_FOUND = 3
"""check: the module, or the attribute after the colon, does not exist."""
EXIT_TIMEOUT = 4
"""check: importing the app did not finish within --timeout seconds."""
EXIT_USAGE = 64
"""An unknown command or option, or a bad option value."""
EXIT_INTERNAL = 70
"""A bug in tokguard itself (the message says where)."""
EXIT_CANNOT_EXECUTE = 126
"""run: the command was found but cannot be executed (as a shell says it)."""
EXIT_COMMAND_NOT_FOUND = 127
"""run: the command was not found (as a shell says it)."""

EXIT_STATUSES = {
    EXIT_OK: "ok / safe",
    EXIT_UNSAFE: "unsafe",
    EXIT_IMPORT_FAILED: "the app failed to import",
    EXIT_NOT_FOUND: "module or attribute not found",
    EXIT_TIMEOUT: "the app's import timed out",
    EXIT_USAGE: "usage error",
    EXIT_INTERNAL: "internal error",
    EXIT_CANNOT_EXECUTE: "run: the command cannot be executed",
    EXIT_COMMAND_NOT_FOUND: "run: the command was not found",
}

EXIT_FOR: dict[Outcome, int] = {
    "ok": EXIT_OK,
    "safe": EXIT_OK,
    "unsafe": EXIT_UNSAFE,
    "import-failed": EXIT_IMPORT_FAILED,
    "module-not-found": EXIT_NOT_FOUND,
    "attribute-not-found": EXIT_NOT_FOUND,
    "timeout": EXIT_TIMEOUT,
    "error": EXIT_INTERNAL,
    "cannot-execute": EXIT_CANNOT_EXECUTE,
    "command-not-found": EXIT_COMMAND_NOT_FOUND,
}

_EPILOG = "exit statuses: " + ", ".join(f"{code} {what}" for code, what in EXIT_STATUSES.items())


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits with EXIT_USAGE (argparse's 2 means "import failed")."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and under 86400 seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tokguard",
        description=(
            "Find and explain fork hazards of tokenizers, transformers and torch: "
            "doctor (this environment), check (your app, as gunicorn --preload imports it), "
            "demo (the measured hangs, without and with tokguard), "
            "run (start a command with every Python process of it guarded)."
        ),
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="store_true", help="print tokguard's version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    doctor = commands.add_parser(
        "doctor",
        help="versions, environment variables, thread pools, start method, advice",
        description=(
            "Inspect this environment: library versions, TOKENIZERS_PARALLELISM as Python "
            "and as the C library see it, misspelled variables, the multiprocessing start "
            "method, OpenMP/BLAS runtimes and thread counts, and advice."
        ),
        epilog=_EPILOG,
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.add_argument(
        "--no-import",
        action="store_true",
        help="do not import torch and threadpoolctl (versions are still read from metadata)",
    )

    check = commands.add_parser(
        "check",
        help="import MODULE[:ATTR] like gunicorn --preload; exit 1 if a fork would be unsafe",
        description=(
            "Import the application in a fresh interpreter the way gunicorn --preload does "
            "(current directory on sys.path, tokguard imported first), then report what "
            "would be unsafe if a worker forked now. Meant as a CI gate: "
            "`tokguard check myapp.main:app` exits 0 when safe and 1 when unsafe."
        ),
        epilog=_EPILOG,
    )
    check.add_argument("target", metavar="MODULE[:ATTR]", help="e.g. myapp.main:app")
    check.add_argument(
        "--timeout",
        type=_positive,
        default=120.0,
        help="seconds the import may take (default: %(default)s)",
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")

    demo = commands.add_parser(
        "demo",
        help="reproduce the measured hangs without tokguard, then run them with it",
        description=(
            "Run each hang of the 'What actually hangs' table in tokguard's docs in its own "
            "subprocess twice: without tokguard (a "
            "watchdog kills the hung children) and with it. Needs no network: the tokenizer "
            "and the tiny CrossEncoder are built locally."
        ),
        epilog=_EPILOG,
    )
    demo.add_argument(
        "--rows",
        default=None,
        help="comma-separated rows to run (default: all that can run here); see --list",
    )
    demo.add_argument("--list", action="store_true", help="list the rows and exit")
    demo.add_argument(
        "--timeout",
        type=_positive,
        default=None,
        help="watchdog seconds before a child counts as hung (default: 3, 5 for torch rows)",
    )
    demo.add_argument(
        "--forks", type=_count, default=2, help="children per scenario (default: %(default)s)"
    )
    demo.add_argument(
        "--jobs",
        type=_count,
        default=None,
        help="scenarios run at once (default: 2 x cores, max 4)",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object")

    run = commands.add_parser(
        "run",
        help="run a command with tokguard imported first in every Python process it starts",
        description=(
            "Run CMD with tokguard imported at the start of every Python interpreter of its "
            "process tree, without editing its code: tokguard's bootstrap sitecustomize goes "
            "first on PYTHONPATH, and CMD replaces this process (same pid; its exit status "
            "and signals are CMD's own). An existing sitecustomize still runs."
        ),
        epilog="exit statuses: CMD's own; 126 CMD cannot be executed, 127 CMD not found, "
        "64 usage error. Example: tokguard run -- gunicorn --preload -w 4 app:app",
    )
    run.add_argument(
        "--mode",
        default=None,
        help="the guard's mode in the command, sets TOKGUARD_MODE: warn, raise or off "
        "(default: TOKGUARD_MODE as set, else warn)",
    )
    run.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokguard`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import tokguard

        print(f"tokguard {tokguard.__version__}")
        return EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        sys.stderr.write("tokguard: error: a command is required: doctor, check, demo or run\n")
        return EXIT_USAGE
    try:
        return EXIT_FOR[_dispatch(args)]
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"tokguard {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("tokguard: interrupted\n")
        return 130
    except BrokenPipeError:
        # `tokguard doctor | head`: the reader went away; nothing left to say.
        return EXIT_OK
    except Exception:
        # A bug of ours must not read as "unsafe" (1) to a CI gate: say so, with its own status.
        import traceback

        traceback.print_exc()
        sys.stderr.write("tokguard: internal error; please report it with the traceback above\n")
        return EXIT_INTERNAL


def _dispatch(args: argparse.Namespace) -> Outcome:
    """Run the command ``args`` names; its outcome (``check`` adds its exit status to its JSON)."""
    if args.command == "doctor":
        from . import _doctor

        return _doctor.main(json_output=args.json, import_libraries=not args.no_import)
    if args.command == "check":
        from . import _check

        result = _check.run_check(args.target, timeout=args.timeout)
        outcome: Outcome = result["status"]
        result["exit_status"] = EXIT_FOR.get(outcome, EXIT_INTERNAL)
        _check.report(result, json_output=args.json)
        return outcome if outcome in EXIT_FOR else "error"
    if args.command == "run":
        from . import _run

        return _run.main(args.command_args, mode=args.mode)
    from ._lab import demo

    return demo.main(
        rows=args.rows,
        list_rows=args.list,
        timeout=args.timeout,
        forks=args.forks,
        jobs=args.jobs,
        json_output=args.json,
    )


def run() -> None:
    """For ``python -m tokguard``: main() with its status as the process's exit status."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
