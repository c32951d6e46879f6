"""``@lazy_model``: one model per process, built once, safe across threads, forks and event loops.

The usual singletons each break somewhere: a module global loads before the fork (the hang
of hang-table rows 4, 7, 8), an ``if model is None`` global races (N first requests, N copies),
``functools.lru_cache`` does not promise one call. This one builds on first use in the
current process, exactly once under concurrency, and again in a forked child unless asked to
share the parent's instance.

Why the decorated object is a plain function and not a wrapt proxy: the hot path must stay
close to ``functools.cache``. Measured on CPython 3.11 (benchmarks/bench_lazy.py), a call
through a ``wrapt.ObjectProxy`` subclass costs about 4 times a ``functools.cache`` hit, through
a ``wrapt.FunctionWrapper`` about 15 times; a closure that reads one cell, about 1.4 times. The function keeps
the factory's name, docstring and signature (``__wrapped__``), which is what FastAPI's
``Depends`` and ``inspect.signature`` read.

Why per-process identity is a fork generation and not ``os.getpid()`` on each call: getpid
is a system call (240 to 340 ns here, five times a ``functools.cache`` hit). The generation is bumped
by a fork hook (stage "lazy" of tokguard's hooks), which every Python-level fork runs (``os.fork``,
multiprocessing, gunicorn, celery, pytest-forked); the slower paths (build, ``loaded``,
``preload``, ``reset``, ``aget``) also compare the pid, so a fork made by C code that skipped
the hooks is caught there.
"""

from __future__ import annotations

import _thread
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar, overload

from . import _fork

_P = ParamSpec("_P")
_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

__all__ = ["LazyModel", "lazy_model"]


class LazyModel(Protocol[_P, _T_co]):
    """What ``@lazy_model`` returns: call it for the instance; the rest controls the build."""

    share_after_fork: bool
    """True: a forked child keeps the parent's instance (copy-on-write) instead of building."""

    @property
    def __wrapped__(self) -> Callable[_P, _T_co]: ...

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _T_co:
        """The instance for these arguments, built on first use in this process."""
        ...

    def preload(self, *args: _P.args, **kwargs: _P.kwargs) -> _T_co:
        """Build now if needed, under ``tokguard.single_threaded()``, and return the instance."""
        ...

    def loaded(self, *args: _P.args, **kwargs: _P.kwargs) -> bool:
        """Whether this process holds an instance for these arguments (no build)."""
        ...

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """Drop the instance for these arguments, or every instance when called without any."""
        ...

    def aget(self, *args: _P.args, **kwargs: _P.kwargs) -> Coroutine[Any, Any, _T_co]:
        """Await the instance; a build runs in a worker thread, once for all awaiters."""
        ...


# --- per-process state ----------------------------------------------------------------------

_generation = 0
"""Forks between this process and the one that imported this module; read on every call."""
_pid = os.getpid()
_registry_lock = _thread.allocate_lock()
_models: weakref.WeakSet[_Model] = weakref.WeakSet()

_COLD: tuple[int, Any] = (-1, None)
_KWD = object()  # separates positional from keyword arguments in a key; also "missing"
_BUILDING, _READY, _FAILED = "building", "ready", "failed"


def _after_fork_in_child() -> None:
    """A new process: every instance built so far belongs to the parent; fresh locks."""
    global _generation, _pid, _registry_lock
    _registry_lock = _thread.allocate_lock()  # the parent may have held it in another thread
    _pid = os.getpid()
    _generation += 1


def _check_pid() -> None:
    if os.getpid() != _pid:  # a fork that ran no Python fork hooks
        _after_fork_in_child()


# --- the model ------------------------------------------------------------------------------


class _Slot:
    """One instance, or one build in progress, for one argument tuple."""

    __slots__ = ("builder", "done", "error", "gen", "state", "value")

    def __init__(self, gen: int, builder: int) -> None:
        self.gen = gen
        self.builder = builder
        self.state = _BUILDING
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _Model:
    """Everything but the hot path, which lives in the closure ``_decorate`` returns."""

    def __init__(
        self,
        factory: Callable[..., Any],
        share: bool,
        publish: Callable[[tuple[int, Any]], None],
        publish_fast: Callable[[tuple[int, Any]], None],
    ) -> None:
        self.factory = factory
        self.share = share
        self.publish = publish
        self.publish_fast = publish_fast
        module = getattr(factory, "__module__", None)
        qualname = getattr(factory, "__qualname__", None) or repr(factory)
        self.name = f"{module}.{qualname}" if module else qualname
        self.slots: dict[Any, _Slot] = {}
        self.fast: dict[Any, Any] = {}
        self.fast_gen = -1
        self._lock = _thread.allocate_lock()
        self._lock_gen = _generation
        self._signature: Any = None
        self.inflight: dict[Any, Any] = {}
        self.inflight_gen = -1

    def lock(self) -> Any:
        """This process's lock: one inherited from a fork may be held by a dead thread."""
        if self._lock_gen != _generation:
            with _registry_lock:
                if self._lock_gen != _generation:
                    self._lock = _thread.allocate_lock()
                    self._lock_gen = _generation
        return self._lock

    # keys

    def signature(self) -> Any:
        if self._signature is None:
            import inspect

            try:
                self._signature = inspect.signature(self.factory)
            except (TypeError, ValueError):
                self._signature = False
        return self._signature

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One key per distinct call after binding: f(1), f(x=1) and f() with x=1 agree."""
        import inspect

        named: list[tuple[str, Any]]
        signature = self.signature()
        bound = None
        if signature:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                pass  # the factory itself will say what is wrong with the call
        if bound is not None:
            bound.apply_defaults()
            named = []
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    named.append((name, tuple(sorted(value.items()))))
                else:
                    named.append((name, value))
        else:
            named = [(f"positional argument {i + 1}", v) for i, v in enumerate(args)]
            named += list(kwargs.items())
        key = tuple(named)
        try:
            hash(key)
        except TypeError:
            self.unhashable(named)
        return key

    def unhashable(self, named: list[tuple[str, Any]]) -> None:
        for name, value in named:
            try:
                hash(value)
            except TypeError:
                shown = repr(value)
                if len(shown) > 60:
                    shown = shown[:57] + "..."
                raise TypeError(
                    f"{self.name}(): argument {name!r} is unhashable ({type(value).__name__}: "
                    f"{shown}). lazy_model keeps one instance per distinct argument tuple, so "
                    "every argument must be hashable: pass a tuple instead of a list, a "
                    "frozenset instead of a set, a name or path instead of a dict."
                ) from None
        raise TypeError(f"{self.name}(): the arguments are unhashable")  # pragma: no cover

    # the slow path

    def remember(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> None:
        """Publish a ready instance to the hot path; called with the lock held."""
        if not args and not kwargs:
            self.publish((_generation, value))
            return
        raw = (*args, _KWD, *kwargs.items()) if kwargs else args
        if self.fast_gen != _generation:
            self.fast = {}
            self.fast_gen = _generation
            self.publish_fast((_generation, self.fast))
        self.fast[raw] = value

    def lookup(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Hot path for calls with arguments; returns ``_KWD`` on a miss."""
        if self.fast_gen == _generation:
            raw = (*args, _KWD, *kwargs.items()) if kwargs else args
            try:
                return self.fast.get(raw, _KWD)
            except TypeError:
                return _KWD  # unhashable: key() says which argument
        return _KWD

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any], cold: bool = False) -> Any:
        _check_pid()
        key = self.key(args, kwargs)
        me = _thread.get_ident()
        while True:
            with self.lock():
                gen = _generation
                slot = self.slots.get(key)
                if slot is not None and slot.gen != gen:
                    if slot.state == _READY and self.share:
                        slot.gen = gen  # the parent's instance, shared copy-on-write
                    else:
                        # Built for the parent, or a build whose thread did not survive the fork.
                        del self.slots[key]
                        slot = None
                if slot is None:
                    slot = self.slots[key] = _Slot(gen, me)
                    mine = True
                elif slot.state == _READY:
                    self.remember(args, kwargs, slot.value)
                    return slot.value
                elif slot.builder == me:
                    raise RuntimeError(
                        f"{self.name}: the factory asked for its own instance while building it "
                        "(directly or through another lazy model); it would wait for itself forever"
                    )
                else:
                    mine = False
            if mine:
                return self.build(slot, key, args, kwargs, cold)
            slot.done.wait()
            if slot.state == _READY:
                return slot.value
            if slot.error is not None:
                raise slot.error

    def build(
        self, slot: _Slot, key: Any, args: tuple[Any, ...], kwargs: dict[str, Any], cold: bool
    ) -> Any:
        try:
            if cold or self.share:
                from ._coldstart import single_threaded

                with single_threaded():
                    value = self.factory(*args, **kwargs)
            else:
                value = self.factory(*args, **kwargs)
        except BaseException as exc:
            with self.lock():
                slot.state = _FAILED
                slot.error = exc
                if self.slots.get(key) is slot:
                    del self.slots[key]  # nothing cached: the next call tries again
            slot.done.set()
            raise
        with self.lock():
            slot.value = value
            slot.state = _READY
            if self.slots.get(key) is slot and slot.gen == _generation:
                self.remember(args, kwargs, value)
        slot.done.set()
        return value

    def loaded(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        _check_pid()
        slot = self.slots.get(self.key(args, kwargs))
        return slot is not None and slot.state == _READY and (slot.gen == _generation or self.share)

    def instances(self) -> int:
        """Instances this process holds (for reports; takes no lock, it runs in a fork hook)."""
        return sum(
            1
            for slot in list(self.slots.values())
            if slot.state == _READY and (slot.gen == _generation or self.share)
        )

    def reset(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        _check_pid()
        key = self.key(args, kwargs) if args or kwargs else None
        with self.lock():
            if key is None:
                self.slots = {}
            else:
                self.slots.pop(key, None)
            # Aliases of the dropped key may sit in the hot caches: drop them all; the next
            # call with any other key refills its entry through the slow path.
            self.fast = {}
            self.fast_gen = -1
            self.publish_fast(_COLD)
            self.publish(_COLD)

    async def aget(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import asyncio

        _check_pid()
        value = self.lookup(args, kwargs) if args or kwargs else _KWD
        if value is not _KWD:
            return value
        key = self.key(args, kwargs)
        loop = asyncio.get_running_loop()
        if self.inflight_gen != _generation:
            self.inflight = {}
            self.inflight_gen = _generation
        task = self.inflight.get((loop, key))
        if task is None:
            # to_thread (3.9+) copies contextvars into the worker thread; one task per loop
            # and key, so a thousand awaiters hold one executor thread, not a thousand.
            task = loop.create_task(asyncio.to_thread(self.get, args, kwargs))
            self.inflight[(loop, key)] = task
            task.add_done_callback(lambda done: self._forget(loop, key, done))
        # shield: one awaiter cancelled (a client went away) must not cancel the others' build.
        return await asyncio.shield(task)

    def _forget(self, loop: Any, key: Any, task: Any) -> None:
        if self.inflight.get((loop, key)) is task:
            del self.inflight[(loop, key)]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" log when every awaiter left


# --- the decorator --------------------------------------------------------------------------


def _decorate(factory: Callable[_P, _T], share: bool) -> LazyModel[_P, _T]:
    import functools
    import inspect

    if not callable(factory):
        raise TypeError(
            f"lazy_model() expects a factory function, got {factory!r} ({type(factory).__name__})"
        )
    if inspect.iscoroutinefunction(factory) or inspect.isasyncgenfunction(factory):
        name = getattr(factory, "__qualname__", factory)
        raise TypeError(
            f"lazy_model() cannot wrap the async function {name}: write the factory as a plain "
            "function; `await model.aget()` builds it in a worker thread without blocking the "
            "event loop."
        )

    hot: tuple[int, Any] = _COLD  # (generation, instance) of the call without arguments
    fast: tuple[int, Any] = _COLD  # (generation, {call arguments: instance})

    def publish(value: tuple[int, Any]) -> None:
        nonlocal hot
        hot = value

    def publish_fast(value: tuple[int, Any]) -> None:
        nonlocal fast
        fast = value

    model = _Model(factory, share, publish, publish_fast)

    def lazy(*args: Any, **kwargs: Any) -> Any:
        # The hot path: one tuple read and one integer compare, no lock (see the module doc).
        if not args and not kwargs:
            h = hot
            if h[0] == _generation:
                return h[1]
            return model.get(args, kwargs)
        f = fast
        if f[0] == _generation:
            try:
                return f[1][(*args, _KWD, *kwargs.items()) if kwargs else args]
            except (KeyError, TypeError):  # a miss, or unhashable: model.get() says which
                pass
        return model.get(args, kwargs)

    def lazy_no_arguments() -> Any:
        # For a factory without parameters: packing *args and **kwargs would cost as much
        # again as the rest of the call.
        h = hot
        if h[0] == _generation:
            return h[1]
        return model.get((), {})

    def preload(*args: Any, **kwargs: Any) -> Any:
        return model.get(args, kwargs, cold=True)

    def loaded(*args: Any, **kwargs: Any) -> bool:
        return model.loaded(args, kwargs)

    def reset(*args: Any, **kwargs: Any) -> None:
        model.reset(args, kwargs)

    async def aget(*args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:
            h = hot
            if h[0] == _generation:
                return h[1]
        return await model.aget(args, kwargs)

    signature = model.signature()
    accessor: Callable[..., Any] = lazy
    if signature and not signature.parameters:
        accessor = lazy_no_arguments
    # A class as factory: its __dict__ holds its methods, which must not land on the accessor.
    updated = () if isinstance(factory, type) else functools.WRAPPER_UPDATES
    functools.update_wrapper(accessor, factory, updated=updated)
    for helper in (preload, loaded, reset, aget):
        helper.__qualname__ = f"{accessor.__qualname__}.{helper.__name__}"
        helper.__module__ = accessor.__module__
    accessor.__dict__.update(
        preload=preload,
        loaded=loaded,
        reset=reset,
        aget=aget,
        share_after_fork=share,
        __tokguard_lazy__=model,
    )
    with _registry_lock:
        _models.add(model)
    return accessor  # type: ignore[return-value]


@overload
def lazy_model(factory: Callable[_P, _T], /) -> LazyModel[_P, _T]: ...


@overload
def lazy_model(
    *, share_after_fork: bool = False
) -> Callable[[Callable[_P, _T]], LazyModel[_P, _T]]: ...


def lazy_model(
    factory: Callable[_P, _T] | None = None, /, *, share_after_fork: bool = False
) -> LazyModel[_P, _T] | Callable[[Callable[_P, _T]], LazyModel[_P, _T]]:
    """Turn a factory into a per-process, build-once accessor for the model it returns.

    ``@lazy_model`` or ``@lazy_model(share_after_fork=True)``. Calling the result returns
    the instance for those arguments, built on first use in the current process; concurrent
    first calls build it once. A forked child builds its own on first use, unless
    ``share_after_fork=True``: then the child keeps the parent's instance (one copy in memory
    for all workers), and every build runs under ``tokguard.single_threaded()`` so that
    sharing it does not leave the children single-threaded.

    ``.preload(...)`` builds now (in a server's startup hook), under
    ``tokguard.single_threaded()``; ``.loaded(...)``, ``.reset(...)`` and
    ``await .aget(...)`` (build in a worker thread) complete the set.
    """
    if not isinstance(share_after_fork, bool):
        raise TypeError(
            f"lazy_model(share_after_fork=...) expects True or False, got {share_after_fork!r}"
        )
    if factory is None:

        def decorator(func: Callable[_P, _T]) -> LazyModel[_P, _T]:
            return _decorate(func, share_after_fork)

        return decorator
    return _decorate(factory, share_after_fork)


# --- reports --------------------------------------------------------------------------------


def _notes() -> list[str]:
    """Lines for a fork report: the lazy models this process holds, and what the child gets."""
    lines = []
    for model in sorted(_models, key=lambda m: m.name):
        count = model.instances()
        if not count:
            continue
        what = "an instance" if count == 1 else f"{count} instances"
        if model.share:
            lines.append(
                f"Lazy model {model.name}: {what} loaded here, shared with the child "
                "(share_after_fork=True); it runs there under the repair above."
            )
        else:
            lines.append(
                f"Lazy model {model.name}: {what} loaded here; the child builds its own on "
                "first use (the parent's copy only takes memory there)."
            )
    return lines


_notes.__tokguard_lazy_notes__ = True  # type: ignore[attr-defined]
if not any(getattr(p, "__tokguard_lazy_notes__", False) for p in _fork.note_providers):
    _fork.note_providers.append(_notes)
_fork.at_fork("lazy", after_in_child=_after_fork_in_child)
