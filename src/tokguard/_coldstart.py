"""``single_threaded()``: warm up a model without starting a pool the children would inherit.

A preloading server (gunicorn ``--preload``, celery prefork) wants the model in the master,
so the workers share its memory copy-on-write. Warming it up there normally starts torch's
OpenMP pool (and, with parallelism on, tokenizers' rayon pool); every forked worker must then
run single-threaded or hang (hang-table rows 4, 5, 7). Run the same warm-up with torch at one
thread and tokenizers serial, put both settings back, and no pool ever started: each worker
starts its own, at full parallel speed, on the shared model (hang-table row 10).

The settings are process-wide, so concurrent and nested blocks share one saved state: the
first block to enter saves it, the last one to leave restores it. torch keeps a thread
count per OS thread: the block limits the thread that opens it first (and torch's default
for threads that have not run torch yet), so warm up in the thread that opens the block.

Master mode (``_master``) is one more holder of the same state: a block that never ends in
the master itself and ends in each forked child, before any user code runs there.
"""

from __future__ import annotations

import _thread
import sys

from . import _fork, _instrument, pools

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType, TracebackType
    from typing import TypeVar

    _F = TypeVar("_F", bound=Callable[..., object])

__all__ = ["single_threaded"]

# Reentrant: entering a block may run a post-import hook that takes it again.
_lock = _thread.RLock()
_holders: dict[int, int] = {}
"""Thread ident (or ``MASTER``) -> how many blocks that holder has open."""
MASTER = -1
"""The holder key of master mode; thread idents are never negative."""
_saved: dict[str, object] = {}
"""Pool id -> its setting before the first block (``Pool.cold_save``), put back by the last."""
_waiting: set[str] = set()
"""Modules whose import will hold the pools that had nothing to hold yet (torch not imported)."""
_undo: dict[int, list[dict[str, object]]] = {}
"""Holder -> for each of its blocks opened while the state was held already: what it cooled."""


def active() -> bool:
    """Whether a ``single_threaded()`` block is open in this process."""
    return bool(_holders)


def restored_settings() -> dict[str, object]:
    """Pool id -> the setting the open blocks will put back (``Pool.cold_save``'s value).

    The guard judges a fork made inside a block on these, not on the block's own
    temporary values: the child leaves the block too, and would then use a pool that died
    at the fork.
    """
    return dict(_saved)


def _hold(pool: pools.Pool) -> None:
    """First block: save the pool's setting and hold it at one thread, or, where its library
    is not imported yet, do that once it is (the warm-up inside the block may import it)."""
    if pool.kept_cold is None:
        return
    saved = pool.cold_save()
    if saved is None:
        for name in pool.triggers:
            if name not in _waiting and name not in sys.modules:
                _waiting.add(name)
                _instrument.when_imported(name, _library_imported)
        return
    _saved[pool.id] = saved
    pool.cool()


def _library_imported(module: ModuleType) -> None:
    """A pool's library was imported inside an open block: its warm-up must stay cold too."""
    with _lock:
        _waiting.discard(module.__name__)
        if _holders:
            for pool in pools.known():
                if pool.id not in _saved:
                    _hold(pool)


def _enter(ident: int | None = None) -> None:
    if ident is None:
        ident = _thread.get_ident()
    with _lock:
        first = not _holders
        _holders[ident] = _holders.get(ident, 0) + 1
        if not first:
            _undo.setdefault(ident, []).append(_cool_again())
            return
        _saved.clear()
        try:
            # Every pool, loaded or not: tokenizers' setting is an environment variable,
            # held before tokenizers is even imported.
            for pool in pools.known():
                _hold(pool)
        except BaseException:
            _holders.pop(ident, None)
            _restore()
            raise


def _exit(ident: int | None = None) -> None:
    if ident is None:
        ident = _thread.get_ident()
    with _lock:
        count = _holders.get(ident, 0)
        if count <= 1:
            _holders.pop(ident, None)
        else:
            _holders[ident] = count - 1
        if not _holders:
            _undo.clear()
            _restore()
        elif _undo.get(ident):
            for pool_id, saved in _undo[ident].pop().items():
                # The values this block found come back, unless changed inside it.
                pools.get(pool_id).put_back(saved)


def _cool_again() -> dict[str, object]:
    """A block opened while others hold the state: cold again what was raised meanwhile.

    In a master (``_master`` holds the state for good) the app may raise torch's threads or
    switch parallelism back on before it opens ``single_threaded()`` for its warm-up; that
    warm-up must still run cold. Returns, by pool id, what to put back when this block ends.
    """
    undo = {}
    for pool in pools.known():
        if pool.id in _saved and not pool.is_cold():
            undo[pool.id] = pool.cold_save()
            pool.cool()
    return undo


def _restore(unsafe: frozenset[str] = frozenset()) -> None:
    """Put back the saved settings; called with ``_lock`` held (or in a fork child).

    A setting changed inside the block is the user's newer choice and is kept (each pool's
    ``put_back`` checks); so is the guard's repair in a child forked while the parent's
    pools ran (``unsafe``: the pools the child is about to be repaired for).
    """
    unsafe = unsafe.union(_fork.repaired)
    saved = dict(_saved)
    _saved.clear()
    for pool_id, setting in saved.items():
        pools.get(pool_id).put_back(setting, repaired=pool_id in unsafe)


class _SingleThreaded:
    """Context manager and decorator returned by ``single_threaded()``."""

    __slots__ = ()

    def __enter__(self) -> None:
        _enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _exit()

    def __call__(self, func: _F) -> _F:
        import functools

        @functools.wraps(func)
        def wrapper(*args: object, **kwargs: object) -> object:
            with self:
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def __repr__(self) -> str:
        return "tokguard.single_threaded()"


def single_threaded() -> _SingleThreaded:
    """Run a warm-up with torch at one thread and ``TOKENIZERS_PARALLELISM=false``.

    Use it around model loading and warm-up in a process that forks afterwards (a gunicorn
    master with ``--preload``, a celery parent): no native pool starts, so the forked workers
    keep the parent's thread settings and run in parallel while sharing the model's memory.
    On exit the previous torch thread count and the previous value of the variable are put
    back exactly, including "unset", in ``os.environ`` and in the C environment.

    Usable as ``with tokguard.single_threaded():`` or as a decorator
    ``@tokguard.single_threaded()``. Blocks nest and may be open in several threads at once:
    the settings are restored when the last one closes.
    """
    return _SingleThreaded()


def after_fork_in_child() -> None:
    """Child side of a fork: stage "single_threaded", before the repairs of unsafe pools.

    Only the forking thread survives: blocks other threads had open are closed here, and so
    is master mode (the child is a worker). The settings come back unless this thread still
    has a block open: it leaves that block itself, and restores then.
    """
    global _lock
    _lock = _thread.RLock()
    ident = _thread.get_ident()
    mine = _holders.get(ident, 0)
    had_blocks = bool(_holders)
    undo = _undo.get(ident, [])
    _holders.clear()
    _undo.clear()
    if mine:
        _holders[ident] = mine
        if undo:
            _undo[ident] = undo
    elif had_blocks:
        _restore(_fork.unsafe_at_fork)


_fork.at_fork("single_threaded", after_in_child=after_fork_in_child)
