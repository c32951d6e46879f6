"""Fork children and tell ok / failed / hung apart, never waiting forever.

A fork hazard shows up as a child that blocks forever on a lock or barrier
owned by a thread that does not exist in the child.  ``waitpid`` without a
deadline would hang the measurement with it, so the parent polls with
``WNOHANG`` and SIGKILLs whatever is still alive at the deadline.

Waiting out the deadline is slow, so the parent also *recognises* a hang
(``HangMonitor``): a child whose every thread is blocked in an untimed,
process-private futex wait, with no CPU progress for ``SETTLE`` seconds, is hung.
Nothing can end such a wait but a signal: a private futex can only be woken by
a thread of the same process, and every one of them is itself waiting.  That
is what a wait on a dead OpenMP barrier or rayon latch looks like, and on a
pure-Python lock whose owner did not survive the fork too.  It is not what a
busy child (CPU progress), a sleeping one (``clock_nanosleep``), a child
reading a pipe or a socket, waiting for its own child, waiting with a timeout
(``queue.get(timeout=...)``, CPython's GIL hand-off), or waiting on a
process-shared lock (``multiprocessing``) looks like: those are left to the
deadline.  So are three kinds of hang: OpenMP workers that spin
(``OMP_WAIT_POLICY=ACTIVE``: hung at 100 % CPU), an event loop waiting in
``epoll_wait`` for an answer from a thread that did not survive the fork
(hang-table row 9), and a thread that holds the GIL while it waits (the others
poll for the GIL with a timeout).  Where ``/proc`` cannot be read (another OS,
a restricted ``/proc``), the deadline alone decides.

All children are started first and then share one deadline: the total time is
bounded by ``timeout`` (plus reaping), however many forks hang, and every child
is forked from the same parent state, like the docs' "20 of 20 forks hung".

Stdlib only, like the whole lab (see ``standalone``): unguarded baselines
import it without ``tokguard/__init__.py`` ever running.  ``os.fork`` is called through the module attribute because tokguard
wraps ``os.fork``; ``from os import fork`` would bypass the guard.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import NamedTuple

__all__ = [
    "SETTLE",
    "HangMonitor",
    "PoolMonitor",
    "WatchResult",
    "blocked_state",
    "fork_and_watch",
]

_ERROR_BYTES = 400  # one short line per failed child; stays below PIPE_BUF

#: Seconds a process must stay blocked, unchanged, before it is called hung.  The
#: evidence is near-proof already; the window only covers reading the threads one by
#: one (a thread can wake another between two reads).
SETTLE = 0.3

PROC = "/proc"  # a module attribute so that tests can point it somewhere unreadable

# The futex syscall's number by machine (`os.uname().machine`); 32-bit ABIs also have
# futex_time64.  An unknown machine gets no recognition: the deadline decides.
_FUTEX_SYSCALLS: dict[str, frozenset[int]] = {
    "x86_64": frozenset({202}),
    "aarch64": frozenset({98}),
    "arm64": frozenset({98}),
    "riscv64": frozenset({98}),
    "loongarch64": frozenset({98}),
    "ppc64le": frozenset({221}),
    "ppc64": frozenset({221}),
    "s390x": frozenset({238}),
    "i686": frozenset({240, 422}),
    "i386": frozenset({240, 422}),
    "armv7l": frozenset({240, 422}),
}
# FUTEX_WAIT, FUTEX_LOCK_PI, FUTEX_WAIT_BITSET, FUTEX_WAIT_REQUEUE_PI, FUTEX_LOCK_PI2:
# the commands that block, all with their timeout pointer as the fourth argument.
_FUTEX_WAITS = frozenset({0, 6, 9, 11, 13})
_FUTEX_PRIVATE = 128
_FUTEX_CMD_MASK = 127  # drops FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME (256) too


def _futex_numbers() -> frozenset[int]:
    try:
        return _FUTEX_SYSCALLS.get(os.uname().machine, frozenset())
    except AttributeError:  # no os.uname: not a POSIX system
        return frozenset()


_FUTEX = _futex_numbers()


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("ascii", "replace")


def _untimed_private_futex_wait(syscall: str) -> bool:
    """True for a ``/proc/.../syscall`` line of a blocked, untimed, private futex wait.

    The line is ``NR arg1 ... arg6 sp pc`` while the thread is in a syscall,
    ``running`` or ``-1 sp pc`` otherwise.
    """
    fields = syscall.split()
    if len(fields) < 7 or not fields[0].isdigit() or int(fields[0]) not in _FUTEX:
        return False
    try:
        op, timeout = int(fields[2], 16), int(fields[4], 16)
    except ValueError:
        return False
    return bool(op & _FUTEX_PRIVATE) and (op & _FUTEX_CMD_MASK) in _FUTEX_WAITS and timeout == 0


def blocked_state(pid: int) -> tuple[str, ...] | None:
    """The exact state of ``pid`` when every thread is stuck in a futex wait, else None.

    Stuck means: state ``S`` (interruptible sleep) in an untimed private futex
    wait.  The returned tuple holds each thread's wait (its whole syscall line:
    futex address, stack and program counters) and its CPU counters (utime and
    stime ticks, and the scheduler's run time in ns and run count where the
    kernel keeps them), so two equal snapshots mean that nothing ran in
    between.  None when any thread is doing anything else, or when ``/proc``
    cannot tell (no such process, no permission, unknown machine).  Cheap: a
    process that is running is recognised from its first file.
    """
    if not _FUTEX:
        return None
    base = f"{PROC}/{pid}"
    try:
        stat = _read(f"{base}/stat")
        # The command name may hold spaces and parentheses: the fields start after the last ")".
        if stat[stat.rindex(")") + 2 :].split(" ", 1)[0] != "S":
            return None
        tids = sorted(os.listdir(f"{base}/task"), key=int)
        state = [str(len(tids))]
        for tid in tids:
            task = f"{base}/task/{tid}"
            fields = _read(f"{task}/stat")
            fields_after = fields[fields.rindex(")") + 2 :].split()
            # state is field 3, utime and stime fields 14 and 15 (1-based, in proc(5)).
            if fields_after[0] != "S":
                return None
            syscall = _read(f"{task}/syscall").strip()
            if not _untimed_private_futex_wait(syscall):
                return None
            try:
                runs = _read(f"{task}/schedstat").strip()
            except OSError:  # CONFIG_SCHED_INFO off: the ticks alone must do
                runs = ""
            state += [tid, syscall, fields_after[11], fields_after[12], runs]
    except (OSError, ValueError, IndexError):
        return None
    return tuple(state)


class HangMonitor:
    """Watches one process; ``hung()`` turns True once it has been stuck for ``settle`` s.

    Call ``hung()`` repeatedly while waiting for the process (every few ms to
    every few hundred ms).  Any change (a thread that ran, woke, appeared or
    left) starts the window again.
    """

    def __init__(self, pid: int, settle: float = SETTLE) -> None:
        self.pid = pid
        self.settle = settle
        self._state: tuple[str, ...] | None = None
        self._since = 0.0

    def hung(self) -> bool:
        now = time.monotonic()
        state = blocked_state(self.pid)
        if state is None or state != self._state:
            self._state, self._since = state, now
            return False
        return now - self._since >= self.settle


class PoolMonitor:
    """``hung()`` turns True once every worker of a pool is hung (and there is one).

    For waits on a pool's answer (``multiprocessing.Pool``, a DataLoader): when
    every worker is stuck, no answer can come.  ``workers()`` is asked for the
    pids at every call, because pools replace and add workers.
    """

    def __init__(self, workers: Callable[[], Iterable[int]], settle: float = SETTLE) -> None:
        self.workers = workers
        self.settle = settle
        self._monitors: dict[int, HangMonitor] = {}

    def hung(self) -> bool:
        pids = list(self.workers())
        # Every monitor is updated on every call: each one's window runs on its own.
        verdicts = [self._monitors.setdefault(p, HangMonitor(p, self.settle)).hung() for p in pids]
        return bool(verdicts) and all(verdicts)


class WatchResult(NamedTuple):
    """Outcome of ``fork_and_watch``.

    ``refused`` counts ``os.fork()`` calls that raised in the parent (a guard in
    "raise" mode refuses before forking); ``errors`` holds one short string per
    failed or refused fork, in fork order; ``recognised`` counts the hung
    children that ``HangMonitor`` recognised before the deadline (the others
    were still alive at the deadline).
    """

    forks: int
    ok: int
    failed: int
    hung: int
    refused: int
    elapsed: float
    errors: list[str]
    recognised: int = 0


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


def _kill(pid: int, read_fd: int, tally: dict[str, int], errors: dict[int, str]) -> bool:
    """SIGKILL and reap ``pid``; True when the kill ended it (it was still hanging)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        os.close(read_fd)
        tally["hung"] += 1
        return True
    tally[_classify(status, read_fd, errors, pid)] += 1  # it exited between poll and kill
    return False


def fork_and_watch(
    child: Callable[[], object], forks: int, timeout: float, settle: float = SETTLE
) -> WatchResult:
    """Fork ``forks`` children running ``child()``; wait at most ``timeout`` s overall.

    A child that returns exits 0 (ok); one that raises prints its traceback to
    stderr and exits 1 (failed, with the short error kept in ``errors``); one
    killed by a signal of its own is failed too.  A child recognised as hung
    (``HangMonitor`` with ``settle``) is SIGKILLed at once, one still alive at
    the deadline is SIGKILLed then: both are reaped and counted as hung.
    """
    start = time.monotonic()
    # Anything still buffered would be written twice if a child flushed it.
    sys.stdout.flush()
    sys.stderr.flush()

    running: dict[int, int] = {}  # pid -> read end of its error pipe
    monitors: dict[int, HangMonitor] = {}
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
        monitors[pid] = HangMonitor(pid, settle)
        order.append(pid)

    tally = {"ok": 0, "failed": 0, "hung": 0}
    recognised = 0
    deadline = start + timeout
    pause = 0.001
    while True:
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                tally[_classify(status, running.pop(pid), errors, pid)] += 1
            elif monitors[pid].hung():
                recognised += _kill(pid, running.pop(pid), tally, errors)
        if not running or time.monotonic() >= deadline:
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.02)

    for pid, read_fd in running.items():  # alive at the deadline
        _kill(pid, read_fd, tally, errors)

    return WatchResult(
        forks=forks,
        ok=tally["ok"],
        failed=tally["failed"],
        hung=tally["hung"],
        refused=len(refused_errors),
        elapsed=time.monotonic() - start,
        errors=refused_errors + [errors[pid] for pid in order if pid in errors],
        recognised=recognised,
    )
