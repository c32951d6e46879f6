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
    from collections.abc import Callable
    from types import FrameType
    from typing import Any

    from . import _report
    from ._report import Hazard

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

_handoff: "dict[int, _report.ForkReport | None]" = {}  # thread -> judged by the os.fork wrapper
_plans: "dict[int, list[Hazard]]" = {}  # thread -> hazards the child must repair
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
    )


def _guard(real: "Callable[[], Any]") -> "Callable[[], Any]":
    def fork() -> "Any":
        ident = _thread.get_ident()
        if _config.mode != "off":
            try:
                report = _judge(refusable=True, depth=1)
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
            if _ATTRIBUTE_FORK_WARNING:
                return _as_caller(sys._getframe(1))(real)
            return real()
        finally:
            _handoff.pop(ident, None)

    fork.__name__ = real.__name__
    fork.__qualname__ = real.__name__
    fork.__doc__ = real.__doc__
    fork.__tokguard_original__ = real  # type: ignore[attr-defined]
    return fork


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
    try:
        ident = _thread.get_ident()
        if _config.mode == "off" or (ident not in _handoff and _from_subprocess()):
            _plans.pop(ident, None)
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
        _plans[ident] = report.hazards if report is not None else []
    except Exception as exc:
        _internal_error("the before-fork hook", exc)


def _after_in_parent() -> None:
    _plans.pop(_thread.get_ident(), None)
    for stage in STAGES:
        for hook in list(_stage_hooks[stage][1]):
            _run(hook)


def _after_in_child() -> None:
    global generation, repaired, unsafe_at_fork
    generation += 1
    try:
        threads = sys.modules.get(f"{__package__}._threads")
        if threads is not None:  # no census was taken otherwise: nothing to forget
            threads.forget()
        hazards = _plans.pop(_thread.get_ident(), [])
        _plans.clear()
        _handoff.clear()
        unsafe_at_fork = frozenset(h.pool for h in hazards)
    except Exception as exc:
        _internal_error("the after-fork hook in the child", exc)
        hazards = []
    for stage in STAGES:
        if stage == REPAIRS:
            repaired = _repair(hazards)
            continue
        for hook in list(_stage_hooks[stage][0]):
            _run(hook)


def _repair(hazards: "list[Hazard]") -> tuple[str, ...]:
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
