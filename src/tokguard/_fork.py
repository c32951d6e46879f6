"""The fork hooks: judge a fork before it happens, refuse or report it, repair the child.

Two ways in, because ``os.register_at_fork`` hooks cannot stop a fork (an exception in one
is printed and ignored):

- ``os.fork`` and ``os.forkpty`` are replaced by a wrapper that judges the fork before the
  child exists, so ``raise`` mode can refuse it. multiprocessing, gunicorn, billiard and
  pytest-forked all call ``os.fork()`` through the module attribute.
- the ``before`` hook judges forks that bypass the wrapper (C code, ``from os import fork``
  before tokguard was imported) and reports them; ``after_in_child`` applies the repairs.
"""

from __future__ import annotations

import _thread
import os
import sys

from . import _config, _env, _forkers, _instrument, _probes, _report, _sites, _threads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import Any

    from ._probes import Hazard

generation = 0
"""How many forks separate this process from the one that imported tokguard."""
repaired: tuple[str, ...] = ()
"""Pools repaired in this process at the fork that created it (empty in the parent)."""

_handoff: dict[int, _report.ForkReport | None] = {}  # thread -> judged by the os.fork wrapper
_plans: dict[int, list[Hazard]] = {}  # thread -> hazards the child must repair
note_providers: list[Callable[[], list[str]]] = []
"""Functions adding lines to a report (lazy models register one)."""


def _judge(refusable: bool, depth: int) -> _report.ForkReport | None:
    hazards, census = _probes.assess()
    if not hazards:
        return None
    # What the forking library makes safe itself is neither reported nor repaired.
    hazards, notes = _forkers.split(hazards, depth + 1)
    if not hazards:
        return None
    for provider in note_providers:
        try:
            notes.extend(provider())
        except Exception as exc:
            _report.internal_error(f"report notes {provider!r}", exc)
    return _report.ForkReport(
        hazards,
        _sites.user_site(_sites.FORK_LIBRARIES, depth=depth + 1),
        _config.mode,
        refusable and _config.mode == "raise",
        census,
        notes,
    )


def _guard(real: Callable[[], Any]) -> Callable[[], Any]:
    def fork() -> Any:
        ident = _thread.get_ident()
        if _config.mode != "off":
            try:
                report = _judge(refusable=True, depth=1)
            except Exception as exc:  # never let a tokguard bug stop a fork
                _report.internal_error("judging a fork", exc)
                report = None
            if report is not None:
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
_function_type: Any = type(lambda: None)
_trampolines: dict[tuple[object, int], Callable[[Callable[[], Any]], Any]] = {}


def _as_caller(frame: FrameType) -> Callable[[Callable[[], Any]], Any]:
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
                try:
                    _report.publish(report)
                except Warning:
                    # A warnings filter made it an error; a hook cannot raise, so say it here.
                    sys.stderr.write(f"{report.message}\n")
        _plans[ident] = report.hazards if report is not None else []
    except Exception as exc:
        _report.internal_error("the before-fork hook", exc)


def _after_in_parent() -> None:
    _plans.pop(_thread.get_ident(), None)


def _after_in_child() -> None:
    global generation, repaired
    generation += 1
    try:
        _threads.forget()
        hazards = _plans.pop(_thread.get_ident(), [])
        _plans.clear()
        _handoff.clear()
        _restore_settings_in_child(hazards)
        done = []
        for hazard in hazards:
            repair = REPAIRS.get(hazard.pool)
            if repair is None:
                continue
            try:
                repair()
                done.append(hazard.pool)
            except Exception as exc:
                _report.internal_error(f"repairing {hazard.pool} in the child", exc)
        repaired = tuple(done)
    except Exception as exc:
        _report.internal_error("the after-fork hook in the child", exc)


def _restore_settings_in_child(hazards: list[Hazard]) -> None:
    """Child step 1: the settings this child would have had, before anything else runs.

    The order of the child's steps is stated here, not left to the order in which modules
    registered fork hooks:

    1. master mode and ``single_threaded()`` blocks put back the settings they kept cold in
       the parent (``_master``, then ``_coldstart``): workers of a preforking master run at
       full parallel speed;
    2. the repairs of the pools judged unsafe in the parent (below): where a pool ran after
       all, they override step 1, so a defeated master's children still cannot hang;
    3. lazy models and the pytest plugin: their ``os.register_at_fork`` hooks were
       registered after this one (they import tokguard first), so they run after it and
       may already use torch.
    """
    coldstart = sys.modules.get("tokguard._coldstart")
    if coldstart is None:
        return  # no block was ever opened and no master mode began: nothing was kept cold
    unsafe = frozenset(h.pool for h in hazards)
    master = sys.modules.get("tokguard._master")
    for step in (getattr(master, "after_fork_in_child", None), coldstart.after_fork_in_child):
        if step is None:
            continue
        try:
            step(unsafe)
        except Exception as exc:
            _report.internal_error(f"{step.__module__}.{step.__name__}", exc)


# --- child repairs, one per pool ----------------------------------------------------------

TORCH_THREADS_MESSAGE = (
    "torch.set_num_threads({n}) in a forked child whose parent had already run torch's "
    "OpenMP pool: the next parallel op would hang forever. A forked child "
    "can only run torch single-threaded. To get parallel workers, keep the parent's pool "
    "cold (tokguard.single_threaded() around the warm-up) or start workers with spawn."
)


def _repair_rayon() -> None:
    _env.force_serial()
    _instrument.rayon_poisoned = True
    # The pool is the parent's; this process has none, and its tokenizers are serial now.
    _probes.rayon_first_use = None
    _probes.rayon_maybe_started = False


def _repair_tokio() -> None:
    _instrument.tokio_poisoned = True
    _probes.tokio_first_use = None


def _repair_torch() -> None:
    torch = sys.modules["torch"]
    torch.set_num_threads(1)
    original = getattr(torch.set_num_threads, "__tokguard_original__", torch.set_num_threads)

    def set_num_threads(n: int) -> None:
        if n > 1:
            raise _report.UnsafeForkError(TORCH_THREADS_MESSAGE.format(n=n))
        original(n)

    set_num_threads.__doc__ = original.__doc__
    set_num_threads.__tokguard_original__ = original  # type: ignore[attr-defined]
    torch.set_num_threads = set_num_threads  # type: ignore[attr-defined]


def _repair_openmp() -> None:
    global _openmp_limits
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    # Kept alive on purpose: the limit holds for the child's whole life.
    _openmp_limits = threadpool_limits(limits=1, user_api="openmp")


_openmp_limits: object = None

REPAIRS: dict[str, Callable[[], None]] = {
    "tokenizers-rayon": _repair_rayon,
    "tokenizers-tokio": _repair_tokio,
    "torch-openmp": _repair_torch,
    "openmp": _repair_openmp,
}


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
