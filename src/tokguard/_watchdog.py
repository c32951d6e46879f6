"""Fork children and tell ok / failed / hung apart, never waiting forever.

A fork hazard shows up as a child that blocks forever on a lock or barrier
owned by a thread that does not exist in the child.  ``waitpid`` without a
deadline would hang the measurement with it, so the parent polls with
``WNOHANG`` and SIGKILLs whatever is still alive at the deadline.

All children are started first and then share one deadline: the total time is
bounded by ``timeout`` (plus reaping), however many forks hang, and every child
is forked from the same parent state, like the docs' "20 of 20 forks hung".

Standalone on purpose (stdlib only, no relative imports): the unguarded
scenario runner loads this file by path so that ``tokguard/__init__.py`` never
runs.  ``os.fork`` is called through the module attribute because tokguard
wraps ``os.fork``; ``from os import fork`` would bypass the guard.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from typing import Callable, NamedTuple

__all__ = ["WatchResult", "fork_and_watch"]

_ERROR_BYTES = 400  # one short line per failed child; stays below PIPE_BUF


class WatchResult(NamedTuple):
    """Outcome of ``fork_and_watch``.

    ``refused`` counts ``os.fork()`` calls that raised in the parent (a guard in
    "raise" mode refuses before forking); ``errors`` holds one short string per
    failed or refused fork, in fork order.
    """

    forks: int
    ok: int
    failed: int
    hung: int
    refused: int
    elapsed: float
    errors: list[str]


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:_ERROR_BYTES]


def _run_child(child: Callable[[], object], write_fd: int, timeout: float) -> None:
    """Body of a forked child: never returns, always ``os._exit``.

    ``os._exit`` skips atexit handlers and buffer flushing that belong to the
    parent.  The alarm is an orphan backstop: if the parent dies before its
    deadline, a hung child still goes away on its own (SIGALRM's default
    action terminates; the parent normally kills it long before).
    """
    code = 0
    try:
        signal.alarm(int(timeout) + 10)
        child()
    except BaseException as exc:  # report anything, even SystemExit
        code = 1
        try:
            traceback.print_exc()
            sys.stderr.flush()
            os.write(write_fd, _short(exc).encode("utf-8", "replace")[:_ERROR_BYTES])
        except BaseException:  # the exit code still says "failed"
            pass
    os._exit(code)


def _read_error(fd: int) -> str:
    try:
        return os.read(fd, _ERROR_BYTES * 2).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _classify(status: int, read_fd: int, errors: dict[int, str], pid: int) -> str:
    """Return "ok" or "failed" for a reaped child; keep a failed child's message."""
    message = _read_error(read_fd)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return "ok"
    if os.WIFSIGNALED(status):
        message = message or f"killed by signal {os.WTERMSIG(status)}"
    errors[pid] = message or f"exit status {os.WEXITSTATUS(status)}"
    return "failed"


def fork_and_watch(child: Callable[[], object], forks: int, timeout: float) -> WatchResult:
    """Fork ``forks`` children running ``child()``; wait at most ``timeout`` s overall.

    A child that returns exits 0 (ok); one that raises prints its traceback to
    stderr and exits 1 (failed, with the short error kept in ``errors``); one
    killed by a signal of its own is failed too; one still alive at the
    deadline is SIGKILLed, reaped and counted as hung.
    """
    start = time.monotonic()
    # Anything still buffered would be written twice if a child flushed it.
    sys.stdout.flush()
    sys.stderr.flush()

    running: dict[int, int] = {}  # pid -> read end of its error pipe
    order: list[int] = []
    errors: dict[int, str] = {}
    refused_errors: list[str] = []
    for _ in range(forks):
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
        except Exception as exc:  # a refusal is a result, not a crash
            os.close(read_fd)
            os.close(write_fd)
            refused_errors.append("refused: " + _short(exc))
            continue
        if pid == 0:
            os.close(read_fd)
            _run_child(child, write_fd, timeout)
        os.close(write_fd)
        running[pid] = read_fd
        order.append(pid)

    tally = {"ok": 0, "failed": 0, "hung": 0}
    deadline = start + timeout
    pause = 0.001
    while True:
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                tally[_classify(status, running.pop(pid), errors, pid)] += 1
        if not running or time.monotonic() >= deadline:
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.02)

    for pid, read_fd in running.items():  # alive at the deadline
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            os.close(read_fd)
            tally["hung"] += 1
        else:  # it exited by itself between the last poll and the kill
            tally[_classify(status, read_fd, errors, pid)] += 1

    return WatchResult(
        forks=forks,
        ok=tally["ok"],
        failed=tally["failed"],
        hung=tally["hung"],
        refused=len(refused_errors),
        elapsed=time.monotonic() - start,
        errors=refused_errors + [errors[pid] for pid in order if pid in errors],
    )
