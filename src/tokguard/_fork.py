"""The fork hooks: judge a fork before it happens, refuse or report it, repair the child.

Two ways in, because ``os.register_at_fork`` hooks cannot stop a fork (an exception in one
is printed and ignored):

- ``os.fork`` and ``os.forkpty`` are replaced by a wrapper that judges the fork before the
  child exists, so ``raise`` mode can refuse it. multiprocessing, gunicorn, billiard and
  pytest-forked all call ``os.fork()`` through the module attribute.
- the ``before`` hook judges forks that bypass the wrapper (C code, ``from os import fork``
  before tokguard was imported) and reports them; ``after_in_child`` applies the repairs.

This module makes the only ``os.register_at_fork`` call of tokguard. The other parts that
act at a fork (master mode, ``single_threaded()``, lazy models, the pytest plugin) join
through ``at_fork(stage, ...)``, and ``STAGES`` fixes the order in which they run.
"""

import _thread
import os
import sys

from . import _config, pools

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import FrameType
    from typing import Any

    from . import _report
    from ._report import Hazard
    from ._threads import Census

# _report, _forkers and _sites are imported where a fork is found unsafe (or something
# fails), not at ``import tokguard``: most processes never need them, and each module costs
# about 0.1 ms of the import.

# What runs in a forked child, in this order (and in the parent after a fork, the same order):
# 1. "master", then "single_threaded": master mode and single_threaded() blocks put back the
#    settings they kept cold in the parent, so the workers of a preforking master run at
#    full parallel speed;
# 2. "repairs": each pool judged unsafe in the parent repairs itself (``pools``); where a pool
#    ran after all, this overrides step 1, so a defeated master's children cannot hang;
# 3. "lazy": lazy models forget the parent's instances (they may already use torch);
# 4. "pytest": the pytest plugin's own bookkeeping, last.
STAGES = ("master", "single_threaded", "repairs", "lazy", "pytest")
REPAIRS = "repairs"
"""The stage this module runs itself; nothing else joins it."""

generation = 0
"""How many forks separate this process from the one that imported tokguard."""
repaired: tuple[str, ...] = ()
"""Pools repaired in this process at the fork that created it (empty in the parent)."""
unsafe_at_fork: frozenset[str] = frozenset()
"""Pools judged unsafe at the fork that created this process (set before any child hook)."""

# Kept across importlib.reload of this module: the hooks registered with the interpreter at
# the first import read this module's globals, and what joined them must not be lost.
_stage_hooks: "dict[str, tuple[list[Callable[[], None]], list[Callable[[], None]]]]" = (
    globals().get("_stage_hooks") or {stage: ([], []) for stage in STAGES}
)
"""Stage -> (child hooks, parent hooks), each list in the order they joined."""

# The same hooks flattened in stage order, rebuilt by ``at_fork``: the fork hooks read only
# these. A fork's cost is mostly the memory pages written after it (each is copied, in the
# parent or the child, about 0.3 us apiece), and every Python object a hook touches writes
# its page: a loop over five stages and their lists touched a dozen objects per fork.
_child_before_repairs: "tuple[Callable[[], None], ...]" = ()
_child_after_repairs: "tuple[Callable[[], None], ...]" = ()
_parent_hooks: "tuple[Callable[[], None], ...]" = ()

# The common fork is one the wrapper finds nothing to do for: nothing joined the hooks, no
# earlier fork left anything to undo, and either the mode is off or the caller is the
# process's only thread and no loaded pool with evidence other than threads finds any (torch's
# CUDA pool, where torch is imported). The wrapper tells that from a few globals, one
# ``fstat`` and those pools, and sets ``_quiet``; each hook returns on reading it. A fork runs
# cold (caches and TLB emptied, every page written faulted in again), so each object touched
# costs far more than in a loop: judging a fork with nothing active cost 61 to 120 us per fork
# on a 2-core virtual machine before this path, and 17 to 18 us with it, nearly all of that the
# ``fstat`` (docs/benchmarks.md).
_idle = True
"""Nothing joined the hooks and this process was not born of an unsafe fork."""
_quiet = False
"""True while the wrapper makes a fork it found nothing to do for."""
_lone_check = (-1, -1, 0, 0)
"""(generation, descriptor, st_dev, st_ino) of the task directory the thread census holds
open, taken at a judged fork that found the caller alone. Keyed by the fork generation, not
the pid: a child counts its generation in a hook that runs anyway, where ``os.getpid()``
would be one more system call before each fork (5 to 9 us of a cold fork here)."""

_handoff: "dict[int, _report.ForkReport | None]" = {}  # thread -> judged by the os.fork wrapper
_plans: "dict[int, Sequence[Hazard]]" = {}  # thread -> hazards the child must repair
note_providers: "list[Callable[[], list[str]]]" = []
"""Functions adding lines to a report (lazy models register one)."""


def at_fork(
    stage: str,
    after_in_child: "Callable[[], None] | None" = None,
    after_in_parent: "Callable[[], None] | None" = None,
) -> None:
    """Run these functions after every fork, at ``stage`` (one of ``STAGES``); idempotent.

    Each runs inside tokguard's own hooks: an exception is reported once on stderr and the
    next hook still runs.
    """
    if stage not in STAGES or stage == REPAIRS:
        valid = ", ".join(repr(s) for s in STAGES if s != REPAIRS)
        raise ValueError(f"_fork.at_fork(stage={stage!r}): valid stages are {valid}")
    for hook, hooks in zip((after_in_child, after_in_parent), _stage_hooks[stage], strict=True):
        if hook is not None and hook not in hooks:
            hooks.append(hook)
    _flatten()


def _flatten() -> None:
    global _child_before_repairs, _child_after_repairs, _parent_hooks
    middle = STAGES.index(REPAIRS)
    _child_before_repairs = tuple(h for s in STAGES[:middle] for h in _stage_hooks[s][0])
    _child_after_repairs = tuple(h for s in STAGES[middle + 1 :] for h in _stage_hooks[s][0])
    _parent_hooks = tuple(h for s in STAGES for h in _stage_hooks[s][1])
    _update_idle()


def _update_idle() -> None:
    global _idle
    _idle = (
        not (_child_before_repairs or _child_after_repairs or _parent_hooks or repaired)
        and not unsafe_at_fork
    )


_flatten()  # after an importlib.reload too: _stage_hooks was kept, these were not


def judged_by_wrapper(ident: int, default: object = None) -> object:
    """The report the os.fork wrapper judged for the fork thread ``ident`` is making now.

    ``default`` where that fork did not go through the wrapper (C code, an old reference to
    the real ``os.fork``). Valid in after-fork parent hooks, before the wrapper returns.
    """
    return _handoff.get(ident, default)


def _internal_error(where: str, exc: BaseException) -> None:
    try:
        from ._report import internal_error
    except Exception:
        # A fork at interpreter shutdown (a __del__ that forks): nothing can be imported any
        # more, and the fork must still reach the interpreter, which refuses it with its own
        # error on 3.12+ ("can't fork at interpreter shutdown") and lets it happen on 3.11.
        return
    internal_error(where, exc)


def _run(hook: "Callable[[], None]") -> None:
    try:
        hook()
    except Exception as exc:
        _internal_error(f"the after-fork hook {hook.__qualname__}", exc)


def _judge(refusable: bool, depth: int) -> "_report.ForkReport | None":
    hazards, census = pools.assess()
    if not hazards:
        return None
    return _make_report(hazards, census, refusable, depth + 1)


def _make_report(
    hazards: "list[Hazard]", census: "Census | None", refusable: bool, depth: int
) -> "_report.ForkReport | None":
    from . import _forkers, _report, _sites

    # What the forking library makes safe itself is neither reported nor repaired.
    hazards, notes = _forkers.split(hazards, depth + 1)
    if not hazards:
        return None
    for provider in note_providers:
        try:
            notes.extend(provider())
        except Exception as exc:
            _internal_error(f"report notes {provider!r}", exc)
    return _report.ForkReport(
        hazards,
        _sites.user_site(_sites.FORK_LIBRARIES, depth=depth + 1),
        _config.mode,
        refusable and _config.mode == "raise",
        census,
        notes,
        _report.fixes_for(hazards, forkserver=_forkers.from_forkserver(depth + 1)),
    )


def _guard(real: "Callable[[], Any]") -> "Callable[[], Any]":
    def fork() -> "Any":
        global _quiet
        if _idle and (
            _config.mode == "off"
            or (_lone() and (not pools.asked_when_alone or pools.nothing_when_alone()))
        ):
            _quiet = True
            try:
                if _ATTRIBUTE_FORK_WARNING and _config.mode == "off":
                    return _as_caller(sys._getframe(1))(real)  # other threads may exist
                return real()  # alone: no multi-threaded warning to attribute on 3.12+
            finally:
                _quiet = False
        return _judged_fork(real)

    fork.__name__ = real.__name__
    fork.__qualname__ = real.__name__
    fork.__doc__ = real.__doc__
    fork.__tokguard_original__ = real  # type: ignore[attr-defined]
    return fork


def _lone() -> bool:
    """Whether the caller is the only thread, from one ``fstat`` (see ``_lone_check``).

    The same check as ``_threads.alone()``, written out here on purpose: calling one shared
    helper in ``_threads`` from here cost 3 page faults and 3 to 8 us more per fork (its
    function, module and globals are touched on the hot path).
    """
    held_generation, fd, dev, ino = _lone_check
    if held_generation != generation:
        return False  # no judged fork yet in this process
    try:
        stat = os.fstat(fd)
    except OSError:
        return False
    # The inode: someone may have closed the descriptor and opened a file of theirs in its place.
    return stat.st_nlink == 3 and stat.st_ino == ino and stat.st_dev == dev


def _judged_fork(real: "Callable[[], Any]") -> "Any":
    """A fork the quick check could not clear: judge it, refuse or report it, then make it."""
    global _lone_check
    ident = _thread.get_ident()
    alone = False
    if _config.mode != "off":
        try:
            hazards, census = pools.assess()
            # The caller is the only thread: no pool's workers and no other thread exist.
            alone = census is not None and census.os_threads == 1
            if alone:
                from . import _threads  # loaded by the census just taken

                pid, fd, dev, ino = _threads.held()
                if pid == os.getpid():
                    _lone_check = (generation, fd, dev, ino)
            report = _make_report(hazards, census, True, 2) if hazards else None
        except Exception as exc:  # never let a tokguard bug stop a fork
            _internal_error("judging a fork", exc)
            report = None
        if report is not None:
            from . import _report

            _report.publish(report)  # may raise under -W error: then no child exists
            if report.refused:
                raise _report.UnsafeForkError(report.message, report)
        _handoff[ident] = report
    try:
        # The interpreter warns only where another thread exists: none does when alone.
        if _ATTRIBUTE_FORK_WARNING and not alone:
            return _as_caller(sys._getframe(2))(real)
        return real()
    finally:
        _handoff.pop(ident, None)


# CPython 3.12+ warns "This process is multi-threaded, use of fork() may lead to deadlocks"
# from inside os.fork, attributed to the Python frame that called it: with the wrapper in
# between, that frame would be tokguard's and every user with a thread would see our file
# blamed (and their per-module filters would not match). So the wrapper calls the real fork
# from a one-line trampoline compiled with the caller's file name and line, and run with the
# caller's globals: the interpreter then attributes the warning exactly as it would without
# tokguard (file, line, module, warnings registry), and swallows it under -W error as usual.
_ATTRIBUTE_FORK_WARNING = sys.version_info >= (3, 12)
_trampoline_code = (lambda real: real()).__code__
# types.FunctionType without importing types (0.2 ms of the import budget).
_function_type: "Any" = type(lambda: None)
_trampolines: "dict[tuple[object, int], Callable[[Callable[[], Any]], Any]]" = {}


def _as_caller(frame: "FrameType") -> "Callable[[Callable[[], Any]], Any]":
    """A function that calls its argument from a frame that looks like ``frame``'s line."""
    key = (frame.f_code, frame.f_lineno)
    trampoline = _trampolines.get(key)
    if trampoline is None:
        code = _trampoline_code.replace(
            co_filename=frame.f_code.co_filename,
            co_firstlineno=frame.f_lineno,
            co_name=frame.f_code.co_name,
        )
        trampoline = _function_type(code, frame.f_globals)
        if (
            len(_trampolines) < 1024
        ):  # fork sites are few; a bound keeps a pathological caller cheap
            _trampolines[key] = trampoline
    return trampoline


def _from_subprocess() -> bool:
    """Whether this fork is subprocess's fork+exec (``preexec_fn``): the child execs at once."""
    try:
        frame: FrameType | None = sys._getframe(2)
    except ValueError:
        return False  # a fork from C with no Python caller (uWSGI's fork hooks)
    for _ in range(8):
        if frame is None:
            return False
        if (
            frame.f_code.co_name == "_execute_child"
            and frame.f_globals.get("__name__") == "subprocess"
        ):
            return True
        frame = frame.f_back
    return False


def _before() -> None:
    if _quiet:
        return
    try:
        ident = _thread.get_ident()
        if _plans:  # left by a fork that never reached its after-fork hooks
            _plans.pop(ident, None)
        if _config.mode == "off" or (ident not in _handoff and _from_subprocess()):
            return
        if ident in _handoff:
            report = _handoff[ident]
        else:
            report = _judge(refusable=False, depth=1)
            if report is not None:
                from . import _report

                try:
                    _report.publish(report)
                except Warning:
                    # A warnings filter made it an error; a hook cannot raise, so say it here.
                    sys.stderr.write(f"{report.message}\n")
        if report is not None:  # a safe fork leaves no entry: its child finds nothing to repair
            _plans[ident] = report.hazards
    except Exception as exc:
        _internal_error("the before-fork hook", exc)


def _after_in_parent() -> None:
    if _quiet:
        return
    if _plans:
        _plans.pop(_thread.get_ident(), None)
    for hook in _parent_hooks:
        _run(hook)


def _after_in_child() -> None:
    global generation, repaired, unsafe_at_fork
    generation += 1
    if _quiet:
        return
    hazards: Sequence[Hazard] = ()
    try:
        ident = _thread.get_ident()
        if _plans:
            hazards = _plans.pop(ident, ())
            _plans.clear()
        # Other threads' entries (they do not exist here); this thread's, the wrapper pops.
        if _handoff and (len(_handoff) > 1 or ident not in _handoff):
            _handoff.clear()
        if hazards or unsafe_at_fork:
            unsafe_at_fork = frozenset(h.pool for h in hazards)
    except Exception as exc:
        _internal_error("the after-fork hook in the child", exc)
    for hook in _child_before_repairs:
        _run(hook)
    if hazards or repaired:
        repaired = _repair(hazards)
    for hook in _child_after_repairs:
        _run(hook)
    _update_idle()


def _repair(hazards: "Sequence[Hazard]") -> tuple[str, ...]:
    """Stage "repairs": each unsafe pool that has a child repair applies it."""
    done = []
    for hazard in hazards:
        try:
            pool = pools.get(hazard.pool)
            if pool.repair is None:
                continue
            pool.repair_child()
            done.append(hazard.pool)
        except Exception as exc:
            _internal_error(f"repairing {hazard.pool} in the child", exc)
    return tuple(done)


def install() -> None:
    """Wrap os.fork / os.forkpty and register the hooks, once per process."""
    if hasattr(os.fork, "__tokguard_original__"):
        return  # a reload of tokguard: hooks from the first import are still registered
    os.register_at_fork(
        before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
    )
    os.fork = _guard(os.fork)
    if hasattr(os, "forkpty"):
        os.forkpty = _guard(os.forkpty)
