"""The recognising watchdog: a hung child is told from a busy, sleeping or waiting one.

``fork_and_watch`` kills a child as soon as ``HangMonitor`` sees every one of its threads
stuck in an untimed private futex wait with no CPU progress, and keeps the fixed deadline
as the outer bound. Each case runs in a fresh interpreter (``run_py``) with the watchdog
loaded by file path, so tokguard's guard is not installed there. The deadlines are long on
purpose: a hung child that is ``recognised`` was killed before its deadline; a child that
finished ``ok`` was not killed early.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs, run_py, watchdog

DEADLINE = 60.0  # the outer bound of the "hung" cases: far beyond any recognition
WAIT = 1.0  # how long the healthy children busy-loop, sleep or wait: over 3 settle windows


def watched(
    setup: str,
    child: str,
    forks: int = 2,
    timeout: float = DEADLINE,
    env: dict[str, str] | None = None,
) -> dict:
    """Run ``setup`` in a fresh interpreter, then ``fork_and_watch(child)``; its result as a dict."""
    code = f"""
import json, os, threading, time
{setup}
result = _watchdog.fork_and_watch({child}, {forks}, {timeout})
print("WATCH " + json.dumps(result._asdict()), flush=True)
"""
    result = run_py(code, guard=False, timeout=timeout + 120, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("WATCH ")]
    assert result.returncode == 0, str(result)
    assert lines, str(result)
    outcome: dict = json.loads(lines[-1][len("WATCH ") :])
    print(outcome)  # the timings, for -s / the report: never asserted
    return outcome


# --- hung children: recognised long before the deadline -------------------------------------

DEAD_LOCK_OWNER = """
lock = threading.Lock()
taken, release = threading.Event(), threading.Event()
def owner():  # holds the lock across the fork; the child has no such thread
    with lock:
        taken.set()
        release.wait(120)
threading.Thread(target=owner, daemon=True).start()
taken.wait(30)
def child():
    with lock:
        pass
"""


def test_pure_python_deadlock_is_recognised() -> None:
    """A child waiting for a lock whose owner thread did not survive the fork is hung."""
    r = watched(DEAD_LOCK_OWNER, "child", forks=3)
    assert (r["hung"], r["recognised"], r["ok"], r["failed"]) == (3, 3, 0, 0), r


def test_tokenizers_pool_child_is_recognised() -> None:
    """Hang-table row 2: the child's encode_batch waits on a rayon pool that is not there."""
    setup = """
os.environ["TOKENIZERS_PARALLELISM"] = "true"
tok = _lab.train_tokenizer()
tok.encode_batch(_lab.corpus(64))
child = lambda: tok.encode_batch(_lab.corpus(8))
"""
    r = watched(setup, "child")
    assert (r["hung"], r["recognised"]) == (2, 2), r


@pytest.mark.torch
def test_torch_pool_child_is_recognised() -> None:
    """Hang-table row 4: a forked child of a parent whose OpenMP pool ran waits in its barrier."""
    needs("torch")
    setup = """
import torch
torch.set_num_threads(2)
a = torch.ones(256, 256)
a @ a
child = lambda: torch.ones(512, 512) @ torch.ones(512, 512)
"""
    r = watched(setup, "child")
    assert (r["hung"], r["recognised"]) == (2, 2), r


# --- healthy children: never called hung ---------------------------------------------------


def test_busy_child_is_not_hung() -> None:
    """A child burning CPU makes progress: it finishes, nobody kills it."""
    setup = f"""
def child():
    end = time.monotonic() + {WAIT}
    while time.monotonic() < end:
        pass
"""
    r = watched(setup, "child", forks=1)  # one: a second would only burn more of the CPU
    assert (r["ok"], r["hung"]) == (1, 0), r


def test_sleeping_child_is_not_hung() -> None:
    """time.sleep waits in clock_nanosleep, not in a futex: not a hang."""
    r = watched("", f"lambda: time.sleep({WAIT})")
    assert (r["ok"], r["hung"]) == (2, 0), r


def test_child_reading_a_pipe_is_not_hung() -> None:
    """A child blocked reading a pipe waits for another process: not a hang."""
    setup = f"""
read_end, write_end = os.pipe()
def feed():  # the parent answers later, once the children are waiting
    time.sleep({WAIT})
    os.write(write_end, b"xx")
threading.Thread(target=feed, daemon=True).start()
def child():
    assert os.read(read_end, 1) == b"x"
"""
    r = watched(setup, "child")
    assert (r["ok"], r["hung"]) == (2, 0), r


def test_child_waiting_with_a_timeout_is_not_hung() -> None:
    """A futex wait with a timeout (queue.get(timeout=...)) ends by itself: not a hang."""
    setup = f"""
import queue
def child():
    try:
        queue.Queue().get(timeout={WAIT})
    except queue.Empty:
        pass
"""
    r = watched(setup, "child")
    assert (r["ok"], r["hung"]) == (2, 0), r


def test_child_joining_a_sleeping_thread_is_not_hung() -> None:
    """The main thread in an untimed futex wait while another thread sleeps: not every thread is stuck."""
    setup = f"""
def child():
    worker = threading.Thread(target=time.sleep, args=({WAIT},))
    worker.start()
    worker.join()
"""
    r = watched(setup, "child")
    assert (r["ok"], r["hung"]) == (2, 0), r


def test_child_waiting_on_a_process_shared_semaphore_is_not_hung() -> None:
    """A multiprocessing semaphore is a shared futex another process can post: not a hang."""
    setup = f"""
import multiprocessing
sem = multiprocessing.get_context("fork").Semaphore(0)
def post():  # one release per child, from the parent, once they are waiting
    time.sleep({WAIT})
    sem.release()
    sem.release()
threading.Thread(target=post, daemon=True).start()
"""
    r = watched(setup, "sem.acquire")
    assert (r["ok"], r["hung"]) == (2, 0), r


# --- the outer bound ------------------------------------------------------------------------


@pytest.mark.torch
def test_spinning_openmp_workers_are_left_to_the_deadline() -> None:
    """OMP_WAIT_POLICY=ACTIVE: the hung child spins at 100 % CPU, so only the deadline ends it."""
    needs("torch")
    setup = """
import torch
torch.set_num_threads(2)
a = torch.ones(256, 256)
a @ a
child = lambda: torch.ones(512, 512) @ torch.ones(512, 512)
"""
    # One child and a short deadline: it, and the parent's idle worker, spin on the CPU.
    r = watched(setup, "child", forks=1, timeout=2.0, env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert (r["hung"], r["recognised"]) == (1, 0), r


def test_unreadable_proc_falls_back_to_the_deadline() -> None:
    """Where /proc cannot be read, a deadlocked child is still killed, at the deadline."""
    r = watched('_watchdog.PROC = "/nonexistent"\n' + DEAD_LOCK_OWNER, "child", timeout=2.0)
    assert (r["hung"], r["recognised"]) == (2, 0), r


# --- the evidence, line by line --------------------------------------------------------------

FUTEX = min(watchdog._FUTEX) if watchdog._FUTEX else 202


@pytest.mark.parametrize(
    ("line", "stuck"),
    [
        (
            f"{FUTEX} 0x55c3a490bf20 0x189 0x0 0x0 0x0 0xffffffff 0x7fff17bb0640 0x7f42d8aa3e96",
            True,
        ),
        (f"{FUTEX} 0x55c3a490bf20 0x80 0x0 0x0 0x0 0x0 0x7fff17bb0640 0x7f42d8aa3e96", True),
        # a timeout pointer: the wait ends by itself
        (f"{FUTEX} 0x55c3a490bf20 0x189 0x0 0x7f04870fedf0 0x0 0xffffffff 0x7ff 0x7f4", False),
        # no FUTEX_PRIVATE_FLAG: another process may wake it
        (f"{FUTEX} 0x7f04870fe000 0x9 0x0 0x0 0x0 0xffffffff 0x7fff17bb0640 0x7f42d8aa3e96", False),
        # FUTEX_WAKE (1): the thread is waking others, not waiting
        (f"{FUTEX} 0x55c3a490bf20 0x81 0x1 0x0 0x0 0x0 0x7fff17bb0640 0x7f42d8aa3e96", False),
        ("230 0x1 0x1 0x7ffe9d5d3e10 0x0 0x0 0x0 0x7ffe9d5d3dd0 0x7f04", False),  # nanosleep
        ("running", False),
        ("-1 0x7ffe9d5d3dd0 0x7f04", False),
        ("", False),
    ],
)
def test_futex_wait_evidence(line: str, stuck: bool) -> None:
    """Only an untimed, private futex wait counts as stuck."""
    if not watchdog._FUTEX:
        pytest.skip(f"no futex syscall number known for {os.uname().machine}")
    assert watchdog._untimed_private_futex_wait(line) is stuck


def test_blocked_state_of_a_running_or_missing_process_is_none() -> None:
    """This process is running, a dead pid has no /proc entry: neither is stuck."""
    assert watchdog.blocked_state(os.getpid()) is None
    assert watchdog.blocked_state(2**22 + 12345) is None


def test_run_py_recognises_a_hung_interpreter() -> None:
    """The suite's own run_py stops an interpreter that deadlocked, long before its deadline."""
    result = run_py(
        "import threading\nlock = threading.Lock()\nlock.acquire()\nprint('stuck', flush=True)\nlock.acquire()\n",
        timeout=DEADLINE,
    )
    assert result.returncode == -9, str(result)
    assert "stuck" in result.stdout
    assert (
        "[run_py: hung (recognised: stuck in futex waits, no CPU progress), killed after"
        in result.stderr
    )


def test_check_recognises_an_import_that_hangs(tmp_path: Path) -> None:
    """`tokguard check` stops an app whose import deadlocked, long before --timeout."""
    (tmp_path / "stuck.py").write_text(
        "import threading\nlock = threading.Lock()\nlock.acquire()\nlock.acquire()\napp = None\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tokguard", "check", "stuck:app", "--timeout", str(DEADLINE)],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=DEADLINE + 60,
    )
    assert proc.returncode == 4, proc.stdout + proc.stderr  # EXIT_TIMEOUT: the import never ends
    output = proc.stdout + proc.stderr
    assert "importing 'stuck:app' hung: after" in output, output
    assert "stopped without waiting for --timeout" in output
