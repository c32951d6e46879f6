"""Shared fixtures: fresh interpreters with a deadline, a prelude for fork scenarios, a tiny model.

Everything that forks or changes process-wide state runs in a fresh interpreter started by
``run_py``: the pytest process itself never forks with a pool running. Each interpreter gets
its own session, and the whole group is SIGKILLed at the end, so a hung grandchild (a
forked worker blocked forever on a dead pool) never outlives its test. An interpreter that
tokguard's watchdog recognises as hung is killed then, not at its deadline.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

pytest_plugins = ["pytester"]

# Found without importing tokguard: importing it would install the guard in this process.
_spec = importlib.util.find_spec("tokguard")
assert _spec is not None
assert _spec.submodule_search_locations is not None
TOKGUARD_DIR = str(Path(next(iter(_spec.submodule_search_locations))).resolve())

# tokguard's lab (models, watchdog, scenarios) without the guard: the one way to load it,
# in this process and, through LAB / PRELUDE, in every unguarded interpreter a test starts.
STANDALONE = os.path.join(TOKGUARD_DIR, "_lab", "standalone.py")
LAB = f"import runpy\nlab = runpy.run_path({STANDALONE!r})['load']()\n"
lab = runpy.run_path(STANDALONE)["load"]()
watchdog = lab.watchdog
_POLL = 0.25  # s between two looks at a run_py interpreter that has not finished

# Variables a test's parent shell may hold that would change what the child does.
_SCRUBBED = ("TOKENIZERS_PARALLELISM", "TOKGUARD_MODE", "RAYON_NUM_THREADS", "OMP_NUM_THREADS")
_SCRUBBED_PREFIXES = ("PYTEST_", "COV_")


class Result(NamedTuple):
    """What a fresh interpreter did."""

    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"rc={self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


# tokguard's lab, as `_lab` and `_watchdog`: from the package when guarded, through
# `standalone` when not, so that an unguarded scenario never executes tokguard/__init__.py.
PRELUDE = """\
import os, runpy, sys
GUARD = {guard!r}
if GUARD:
    import tokguard
    from tokguard import _lab
else:
    _lab = runpy.run_path({standalone!r})["load"]()
_watchdog = _lab.watchdog
def watch(child, forks=10, timeout=10.0):
    result = _watchdog.fork_and_watch(child, forks, timeout)
    print("RESULT", result.forks, result.ok, result.failed, result.hung, result.refused, flush=True)
    for error in result.errors[:3]:
        print("ERROR", error, flush=True)
    return result
"""


def prelude(guard: bool) -> str:
    """``PRELUDE`` for a guarded or unguarded interpreter."""
    return PRELUDE.format(guard=guard, standalone=STANDALONE)


def run_py(
    code: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    args: tuple[str, ...] = (),
    guard: bool | None = None,
    python: str = sys.executable,
    cwd: str | None = None,
    path: str | os.PathLike[str] | None = None,
    monitor: Callable[[int], watchdog.HangMonitor | watchdog.PoolMonitor] | None = None,
) -> Result:
    """Run ``code`` in a fresh interpreter with HF_HUB_OFFLINE=1 and a deadline.

    ``guard`` True/False prepends ``PRELUDE`` (tokguard imported, or not at all). ``env``
    entries are added to a scrubbed copy of this environment; a value of None removes one.
    ``path``: write the code to this file and run it as a script (so reports name its lines).
    On timeout, when the interpreter is recognised as hung (``watchdog.HangMonitor``: every
    thread stuck in a futex wait), and always at the end, its whole process group is killed.
    ``monitor(pid)`` replaces that recognition, for a run whose main process keeps waking while
    the processes it waits on are stuck (``descendant_workers``).
    """
    source = textwrap.dedent(code)
    if guard is not None:
        source = prelude(guard) + source
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)
    }
    full_env["HF_HUB_OFFLINE"] = "1"
    full_env["PYTHONDONTWRITEBYTECODE"] = "1"
    full_env["PYTHONUNBUFFERED"] = "1"
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    if path is not None:
        Path(path).write_text(source)
        command = [python, *args, str(path)]
    else:
        command = [python, *args, "-c", source]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=cwd,
        text=True,
        start_new_session=True,
    )
    watcher = (monitor or watchdog.HangMonitor)(proc.pid)
    start = time.monotonic()
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=_POLL)
                break
            except subprocess.TimeoutExpired:
                pass
            # The interpreter itself stuck (every thread in a futex wait, no CPU): waiting
            # longer cannot change anything, so stop now instead of at the deadline.
            hung = watcher.hung()
            if hung or time.monotonic() - start >= timeout:
                _kill_group(proc.pid)
                out, err = proc.communicate()
                why = (
                    "hung (recognised: stuck in futex waits, no CPU progress)"
                    if hung
                    else "timeout"
                )
                waited = time.monotonic() - start
                return Result(-9, out, err + f"\n[run_py: {why}, killed after {waited:.1f} s]")
    finally:
        _kill_group(proc.pid)
    return Result(proc.returncode, out, err)


def run_py_timed(name: str, code: str, **kwargs: Any) -> Result:
    """``run_py``, printing its wall and CPU seconds (peers report their cost with ``-rP``)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    result = run_py(code, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"{name}: {time.monotonic() - start:.1f} s wall, {cpu:.1f} CPU-s")
    return result


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (none once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except (OSError, ValueError):
        return []


def descendant_workers(pid: int) -> watchdog.PoolMonitor:
    """A ``run_py`` monitor: hung once every grandchild of ``pid`` is hung (and there is one).

    For a process that waits on a pool whose workers a server of its own forked (the
    forkserver's): the pool's handler threads wake the main process every 0.1 s, so only
    its workers can be seen stuck. An idle worker waits on a pipe or a process-shared lock,
    which is not a hang.
    """
    return watchdog.PoolMonitor(lambda: [g for child in children(pid) for g in children(child)])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def watch_result(result: Result) -> tuple[int, int, int, int, int]:
    """(forks, ok, failed, hung, refused) from the last RESULT line the prelude's watch printed."""
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line:\n{result}"
    forks, ok, failed, hung, refused = (int(x) for x in lines[-1].split()[1:])
    return forks, ok, failed, hung, refused


def values(result: Result) -> dict[str, str]:
    """``KEY=value`` lines a snippet printed, as a dict (later lines win)."""
    found = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            found[key] = value
    return found


def needs(*modules: str) -> None:
    """Skip the calling test unless every module is installed: found, not imported.

    ``pytest.importorskip`` imports: torch, sentence-transformers or scikit-learn would then
    load into every pytest-xdist worker (seconds of CPU each) for tests that use them only
    in the fresh interpreters they start.
    """
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="session")
def cross_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny BERT CrossEncoder saved locally, built in a fresh interpreter (needs torch).

    Built once per run: under pytest-xdist the workers share one copy (the first builds it
    under a file lock in the run's common temporary directory, the others wait and reuse it).
    """
    needs("torch", "sentence_transformers")
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # common to every worker of this run
    path = root / "cross-encoder"
    with open(root / "cross-encoder.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (path / "BUILT").exists():
            path.mkdir(exist_ok=True)
            result = run_py(
                f"from tokguard._lab import build_cross_encoder\nbuild_cross_encoder({str(path)!r})\n",
                timeout=300,
            )
            assert result.returncode == 0, str(result)
            (path / "BUILT").touch()
    return str(path)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto`: three workers per core, not one.

    Much of a test here is waiting at 0 % CPU: on a hung child until the watchdog calls it
    hung, on a server to start and stop, on a deadline that the test shows is needed. One
    worker per core left a third of the cores' time idle (584 CPU-seconds in 412 s on 2
    cores); two per core still kept only 1.3 of 2 cores busy (the 3.11 suite: 684 CPU-s in
    518 s), three keep 1.6 (683 CPU-s in 430 s). xdist's own PYTEST_XDIST_AUTO_NUM_WORKERS
    still wins when set.
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 3 * (cores or 1)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the peers mark must be on by then
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests (servers, models) first: pytest-xdist then ends on short tests, not a long tail.

    Every test under tests/peers/ (other projects' suites, run with and without tokguard) is
    marked ``peers`` here, so that no module there can forget it: ``nox -s peers`` runs them,
    and the other sessions leave them out.
    """
    peers = Path(__file__).parent / "peers"
    for item in items:
        if peers in item.path.parents:
            item.add_marker(pytest.mark.peers)
    items.sort(
        key=lambda item: (
            item.get_closest_marker("slow") is None,
            "cross_encoder_path" not in getattr(item, "fixturenames", ()),
        )
    )


def line_of(source: str, marker: str) -> int:
    """1-based line number of the only line of ``source`` (after dedent) holding ``marker``."""
    lines = [i for i, line in enumerate(textwrap.dedent(source).splitlines(), 1) if marker in line]
    assert len(lines) == 1, f"{marker!r} found on lines {lines}"
    return lines[0]


def prelude_lines(guard: bool) -> int:
    """How many lines ``PRELUDE`` adds in front of a snippet."""
    return len(prelude(guard).splitlines())
