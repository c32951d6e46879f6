"""A census of the process's OS threads, and which of them belong to GNU OpenMP.

Why not just count threads: ``import torch`` and ``import scipy`` each start an OpenBLAS
server thread that is harmless at a fork (OpenBLAS has its own atfork handlers), so a count
alone cries wolf on every torch user (docs/how-it-works.md). What hangs a child
is a GNU OpenMP (libgomp) team that already ran in the parent. Its idle workers sit in a
futex system call issued from inside libgomp itself, so ``/proc/self/task/TID/syscall``
shows an instruction pointer inside libgomp's code; an OpenBLAS or rayon thread waits
inside libc instead. That pointer is the evidence used here.

libgomp issues that system call itself only on the architectures where it has an inline
futex (x86, POWER, s390, SPARC); on others (aarch64) it goes through libc and the pointer
says nothing. There, and where /proc or the syscall file cannot be read (a hardened
kernel), ``census()`` returns None and the probes fall back on what the
instrumentation recorded. Each thread is classified once and cached by thread id, so a
fork costs a directory listing plus one small read per new thread.

A worker that is running shows no pointer ("running"). libgomp's idle workers spin for a
moment before they block, so the census waits a few milliseconds for them to settle; under
``OMP_WAIT_POLICY=ACTIVE`` they spin for good. Threads still running after the window are
counted as ``busy`` and remembered, so a later fork does not wait for them again; the
probe decides with other evidence (the wait policy, a recorded first use) whether they are
an OpenMP team.
"""

from __future__ import annotations

import _thread
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

_TASKS = "/proc/self/task"
# libgomp/config/linux/*/futex.h: the architectures where libgomp makes the futex call inline.
_INLINE_FUTEX_MACHINES = ("x86_64", "i386", "i686", "ppc64", "ppc64le", "s390x", "sparc64")
_readable = hasattr(os, "uname") and os.uname().machine in _INLINE_FUTEX_MACHINES
"""False where the instruction pointers cannot be read or cannot be attributed."""

# Runtimes whose worker threads do not survive a fork and whose child then hangs.
# LLVM's libomp and Intel's libiomp5 reset themselves in a pthread_atfork handler.
_HANGING_RUNTIMES = ("libgomp",)
_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp")

_ranges: list[tuple[int, int, str]] = []  # executable mappings of OpenMP runtimes
_classified: dict[int, str | None] = {}  # tid -> OpenMP library path, or None
_spinning: set[int] = set()  # tids that kept running through a whole settle window
_SETTLE_TRIES = 30
_SETTLE_WAIT = 0.001
_SETTLE_TRIES_SPINNING = 3

# Values of OMP_WAIT_POLICY / GOMP_SPINCOUNT under which libgomp's idle workers spin (for
# minutes or for ever) instead of blocking in a futex, so they never show a pointer.
# libgomp/env.c: "active" makes the default spin count 300 billion.
_SPIN_LIMIT = 10**9


class Census:
    """What the OS says about this process's threads at one moment."""

    __slots__ = ("busy", "native", "openmp", "os_threads", "python_threads")

    def __init__(
        self,
        os_threads: int,
        python_threads: int,
        openmp: dict[str, int],
        busy: int = 0,
        native: tuple[int, ...] = (),
    ) -> None:
        self.os_threads = os_threads
        self.python_threads = python_threads
        self.openmp = openmp
        """OpenMP library path -> number of its worker threads alive now."""
        self.busy = busy
        """Native threads that kept running through the settle window, so could not be
        classified: GNU OpenMP workers under ``OMP_WAIT_POLICY=ACTIVE`` look like this."""
        self.native = native
        """The ids of the threads Python does not know about, for ``native_names``."""

    @property
    def native_threads(self) -> int:
        """Threads Python does not know about (native pools, library helpers)."""
        return max(0, self.os_threads - self.python_threads)

    def hanging_openmp(self) -> dict[str, int]:
        """The OpenMP teams whose presence makes a forked child hang."""
        return {p: n for p, n in self.openmp.items() if _runtime(p) in _HANGING_RUNTIMES}

    def __repr__(self) -> str:
        return (
            f"Census(os_threads={self.os_threads}, python_threads={self.python_threads}, "
            f"openmp={self.openmp}, busy={self.busy})"
        )


ALONE = Census(1, 1, {})
"""The census of a process whose only thread is the one asking (shared: never change it)."""


def _runtime(path: str) -> str | None:
    name = os.path.basename(path)
    for runtime in _OPENMP_RUNTIMES:
        if name.startswith(runtime):
            return runtime
    return None


def _load_ranges() -> None:
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "omp" not in line:
                continue
            fields = line.split(None, 5)
            if len(fields) < 6 or "x" not in fields[1] or _runtime(fields[5].strip()) is None:
                continue
            start, _, end = fields[0].partition("-")
            found.append((int(start, 16), int(end, 16), fields[5].strip()))
    _ranges[:] = found


def openmp_libraries() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process now (the mappings read afresh)."""
    try:
        _load_ranges()
    except OSError:
        return set()
    return {path for _, _, path in _ranges}


def _library_at(pc: int) -> str | None:
    for start, end, path in _ranges:
        if start <= pc < end:
            return path
    return None


def _classify(tid: int, reload_ranges: list[bool]) -> tuple[bool, str | None]:
    """(settled, OpenMP library) for one thread; unsettled while it is running.

    ``reload_ranges`` is a one-shot permission shared by one census: /proc/self/maps of a
    torch process is long, so it is read again at most once per census.
    """
    global _readable
    try:
        with open(f"{_TASKS}/{tid}/syscall") as f:
            fields = f.read().split()
    except PermissionError:
        _readable = False  # a hardened kernel: no use retrying, on this fork or any other
        return True, None
    except OSError:  # the thread has just exited
        return True, None
    if not fields or fields[0] == "running":
        return False, None
    pc = int(fields[-1], 16)
    library = _library_at(pc)
    if library is None and pc and reload_ranges[0]:
        # An OpenMP runtime loaded since the ranges were read (a scikit-learn import, say).
        reload_ranges[0] = False
        _load_ranges()
        library = _library_at(pc)
    return True, library


def spin_policy() -> str | None:
    """``NAME=value`` of the setting that keeps GNU OpenMP workers spinning, or None.

    libgomp reads these once, when it is loaded; a process rarely changes them later, and
    the value read now is the best evidence left.
    """
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    count = os.environ.get("GOMP_SPINCOUNT", "")
    if count:
        spins = count.strip().lower()
        if spins in ("infinite", "infinity"):
            return f"GOMP_SPINCOUNT={count}"
        if spins.isdigit():
            # An explicit count wins over the policy: a small one lets workers block.
            return f"GOMP_SPINCOUNT={count}" if int(spins) >= _SPIN_LIMIT else None
    if policy.strip().lower() == "active":
        return f"OMP_WAIT_POLICY={policy}"
    return None


def python_thread_ids() -> set[int]:
    threading = sys.modules.get("threading")
    if threading is None:
        return {_thread.get_native_id()}
    return {t.native_id for t in threading.enumerate() if t.native_id is not None}


def _thread_count() -> int | None:
    """The number of OS threads from one ``stat``, or None where /proc does not say so.

    Linux gives the task directory a link count of 2 + threads: one ``stat`` costs less than
    half a listing, and a fork with nothing running (the common case) needs no more. The
    first call checks that against a listing (a /proc emulation may not count), and a
    mismatch (also a thread that started in between) turns the shortcut off for good.
    """
    global _count_by_links, _task_dir, _task_pid
    # /proc/self/task is no substitute: asked from another thread, its link count is off.
    pid = os.getpid()
    if pid != _task_pid:  # the first call, or the first in a forked child
        # Checked here, not in a fork hook: a safe fork's child then runs none of this module.
        forget()
        _task_dir, _task_pid = f"/proc/{pid}/task", pid
    if _count_by_links is False:
        return None
    count = os.stat(_task_dir).st_nlink - 2
    if _count_by_links is None:
        _count_by_links = count == len(os.listdir(_TASKS))
        if not _count_by_links:
            return None
    if _held[0] != pid:
        _hold_task_dir(pid)
    return count


_count_by_links: bool | None = None
_task_dir = ""
_task_pid = 0

_NOT_HELD = (0, -1, 0, 0)
_held = _NOT_HELD
"""(pid, descriptor, st_dev, st_ino) of the task directory held open for ``alone()``; one
tuple, replaced whole, so that no thread reads a descriptor with another process's pid."""


def _hold_task_dir(pid: int) -> None:
    """Hold this process's task directory open for ``alone()``.

    A fork's cost is mostly what runs cold around it: a ``stat`` of the path just before a
    fork added about 17 us to it here, an ``fstat`` of an open descriptor about 8 (the lookup
    in /proc is the difference). The descriptor is closed on exec. A forked child holds its
    parent's until its first census, which closes it, only if it still is that directory,
    and opens its own.
    """
    global _held
    inherited, _held = _held, _NOT_HELD
    if inherited[1] >= 0:
        try:
            if _file_id(os.fstat(inherited[1])) == inherited[2:]:
                os.close(inherited[1])
        except OSError:
            pass  # closed meanwhile (a daemon that closes every descriptor): not ours now
    try:
        fd = os.open(_task_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # out of descriptors, say: forks take the census, as without this
    try:
        _held = (pid, fd, *_file_id(os.fstat(fd)))
    except OSError:
        os.close(fd)


def _file_id(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def held() -> tuple[int, int, int, int]:
    """(pid, descriptor, st_dev, st_ino) of the task directory held open, or (0, -1, 0, 0)."""
    return _held


def alone() -> bool:
    """Whether the caller is this process's only thread, from one ``fstat``; False also
    where that cannot be told this way (then a census tells)."""
    global _held
    pid, fd, dev, ino = _held
    if pid != os.getpid():
        return False  # nothing held yet, or held by the parent of this forked child
    try:
        stat = os.fstat(fd)
    except OSError:
        _held = _NOT_HELD  # closed by someone else; the next census opens another
        return False
    if stat.st_ino != ino or stat.st_dev != dev:
        # Closed by someone else and the number reused for a file of theirs: never close it.
        _held = _NOT_HELD
        return False
    return stat.st_nlink == 3


def census() -> Census | None:
    """Count and classify this process's threads, or None where that cannot be done."""
    if not _readable:
        return None
    try:
        if alone() or _thread_count() == 1:
            # Only the thread that asks: nothing else can hold a lock or a pool.
            if _classified or _spinning or _names:
                forget()
            return ALONE
        tids = [int(t) for t in os.listdir(_TASKS)]
    except OSError:
        return None
    known = python_thread_ids()
    openmp: dict[str, int] = {}
    alive = set(tids)
    for cache in (_classified, _names):
        for tid in [t for t in cache if t not in alive]:
            del cache[tid]
    _spinning.intersection_update(alive)
    reload_ranges = [True]
    pending = [tid for tid in tids if tid not in known and tid not in _classified]
    # OpenMP workers spin for a moment after a parallel region before they block; a few
    # short rounds (one sleep each, for all of them at once) let them settle. A thread
    # that already ran through a whole window at an earlier fork and still runs is not
    # waited for again: under OMP_WAIT_POLICY=ACTIVE that is a worker spinning for good,
    # and waiting for it would cost every fork the whole window.
    spun: list[int] = []
    # Where libgomp was told to spin, its workers will not settle: a few rounds let other
    # threads settle, and the whole window would only delay the fork.
    tries = _SETTLE_TRIES_SPINNING if pending and spin_policy() else _SETTLE_TRIES
    for attempt in range(tries + 1):
        if attempt:
            time.sleep(_SETTLE_WAIT)
        running = []
        for tid in pending:
            settled, library = _classify(tid, reload_ranges)
            if settled:
                _classified[tid] = library
                _spinning.discard(tid)
            elif tid in _spinning and not attempt:
                spun.append(tid)
            else:
                running.append(tid)
        pending = running
        if not pending:
            break
    _spinning.update(pending)
    busy = len(pending) + len(spun)
    for tid in tids:
        library = _classified.get(tid)
        if tid not in known and library:
            openmp[library] = openmp.get(library, 0) + 1
    if not _readable:
        return None
    native = tuple(tid for tid in tids if tid not in known)
    return Census(len(tids), len(known & alive), openmp, busy, native)


# --- thread names: the evidence of runtimes that name their threads (gRPC, tokio) ----------

_names: dict[int, tuple[str, bool]] = {}
"""tid -> (its name, read alike twice). A new thread carries its creator's name until it
sets its own, a moment after it starts: a name is trusted once two censuses read it alike."""


def _name_of(tid: int) -> str | None:
    cached = _names.get(tid)
    if cached is not None and cached[1]:
        return cached[0]
    try:
        with open(f"{_TASKS}/{tid}/comm", "rb") as f:
            name = f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:  # the thread has just exited
        return None
    _names[tid] = (name, cached is not None and cached[0] == name)
    return name


def native_names(census: Census | None) -> list[str]:
    """The names (``comm``: 15 characters at most) of the threads Python does not know about.

    Read from ``census`` where there is one (no second listing of /proc/self/task); where
    there is none (a machine whose OpenMP census cannot be read), from a listing of its own,
    so the runtimes found by name are found on every Linux. Each name is read at most twice.
    """
    if census is not None:
        tids: Iterable[int] = census.native
    else:
        try:
            listed = [int(t) for t in os.listdir(_TASKS)]
        except OSError:
            return []
        known = python_thread_ids()
        alive = set(listed)
        for tid in [t for t in _names if t not in alive]:
            del _names[tid]
        tids = (tid for tid in listed if tid not in known)
    names = []
    for tid in tids:
        name = _name_of(tid)
        if name is not None:
            names.append(name)
    return names


def forget() -> None:
    """Child side of a fork: no thread of the parent exists here any more (``census`` calls
    this at its first use in a new process)."""
    if _classified:
        _classified.clear()
    if _spinning:
        _spinning.clear()
    if _names:
        _names.clear()
