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
import os
import sys

from . import _env, _fork, _instrument
from .pools import tokenizers_rayon, torch_openmp

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType, TracebackType
    from typing import TypeVar

    _F = TypeVar("_F", bound=Callable[..., object])

__all__ = ["single_threaded"]

_ABSENT = "\0absent"  # os.environ values are str: this one cannot come from a real variable

# Reentrant: entering a block may run a post-import hook of torch that takes it again.
_lock = _thread.RLock()
_holders: dict[int, int] = {}
"""Thread ident (or ``MASTER``) -> how many blocks that holder has open."""
MASTER = -1
"""The holder key of master mode; thread idents are never negative."""
_saved_env: str = _ABSENT
"""TOKENIZERS_PARALLELISM in os.environ before the first block (``_ABSENT``: not there)."""
_saved_c_env: str | None = None
"""The same variable in the C environment (None: unset), which tokenizers reads."""
_saved_torch_threads = 0
"""torch.get_num_threads() before the first block; 0 while torch is not (yet) touched."""
_torch_hook_pending = False
_undo: dict[int, list[tuple[str | None, int]]] = {}
"""Holder -> for each of its blocks opened while the state was held already: what it cooled."""


def active() -> bool:
    """Whether a ``single_threaded()`` block is open in this process."""
    return bool(_holders)


def restored_settings() -> tuple[str | None, int]:
    """(C value of the variable, torch threads) the open blocks will put back.

    The guard judges a fork made inside a block on these, not on the block's own
    temporary values: the child leaves the block too, and would then use a pool that died
    at the fork.
    """
    return _saved_c_env, _saved_torch_threads


def _torch_imported(torch: ModuleType) -> None:
    """torch was imported inside an open block: its warm-up must not start the pool either."""
    global _torch_hook_pending
    with _lock:
        _torch_hook_pending = False
        if _holders and not _saved_torch_threads:
            _limit_torch(torch)


def _limit_torch(torch: ModuleType) -> None:
    global _saved_torch_threads
    _saved_torch_threads = int(torch.get_num_threads())
    if _saved_torch_threads > 1:
        torch.set_num_threads(1)


def _enter(ident: int | None = None) -> None:
    global _saved_env, _saved_c_env, _saved_torch_threads, _torch_hook_pending
    if ident is None:
        ident = _thread.get_ident()
    with _lock:
        first = not _holders
        _holders[ident] = _holders.get(ident, 0) + 1
        if not first:
            _undo.setdefault(ident, []).append(_cool_again())
            return
        _saved_env = os.environ.get(_env.PARALLELISM_VAR, _ABSENT)
        _saved_c_env = _env.c_getenv(_env.PARALLELISM_VAR)
        _saved_torch_threads = 0
        try:
            _env.force_serial()
            torch = sys.modules.get("torch")
            if torch is not None and hasattr(torch, "get_num_threads"):
                _limit_torch(torch)
            elif not _torch_hook_pending:
                _torch_hook_pending = True
                _instrument.when_imported("torch", _torch_imported)
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
            _warm_again(*_undo[ident].pop())


def _cool_again() -> tuple[str | None, int]:
    """A block opened while others hold the state: cold again what was raised meanwhile.

    In a master (``_master`` holds the state for good) the app may raise torch's threads or
    switch parallelism back on before it opens ``single_threaded()`` for its warm-up; that
    warm-up must still run cold. Returns what to put back when this block ends: the C value
    of the variable (None: nothing to undo) and torch's thread count (0: nothing).
    """
    value = _env.c_getenv(_env.PARALLELISM_VAR) if _env.c_parallel() else None
    if value is not None:
        _env.force_serial()
    torch = sys.modules.get("torch")
    threads = int(torch.get_num_threads()) if torch is not None else 0
    if threads > 1:
        torch.set_num_threads(1)  # type: ignore[union-attr]
    return value, threads if threads > 1 else 0


def _warm_again(value: str | None, threads: int) -> None:
    """End of such a block: the values it found come back, unless changed inside it."""
    if value is not None and _env.c_getenv(_env.PARALLELISM_VAR) == "false":
        os.environ[_env.PARALLELISM_VAR] = value
        os.putenv(_env.PARALLELISM_VAR, value)
    torch = sys.modules.get("torch")
    if threads and torch is not None and torch.get_num_threads() == 1:
        torch.set_num_threads(threads)


def _restore(unsafe: frozenset[str] = frozenset()) -> None:
    """Put back the saved settings; called with ``_lock`` held (or in a fork child).

    A setting changed inside the block is the user's newer choice and is kept; so is the
    guard's repair in a child forked while the parent's pools ran (``unsafe``: the pools
    the child is about to be repaired for).
    """
    global _saved_torch_threads
    unsafe = unsafe.union(_fork.repaired)
    keep_env = _env.c_getenv(_env.PARALLELISM_VAR) != "false" or tokenizers_rayon.POOL.id in unsafe
    if not keep_env:
        if _saved_env == _ABSENT:
            os.environ.pop(_env.PARALLELISM_VAR, None)
        else:
            os.environ[_env.PARALLELISM_VAR] = _saved_env
        # os.environ's view may differ from the C one (os.putenv, C code): restore that exactly.
        if _saved_c_env is None:
            os.unsetenv(_env.PARALLELISM_VAR)
        else:
            os.putenv(_env.PARALLELISM_VAR, _saved_c_env)
    threads, _saved_torch_threads = _saved_torch_threads, 0
    torch = sys.modules.get("torch")
    if threads > 1 and torch is not None and torch.get_num_threads() == 1:
        if torch_openmp.POOL.id in unsafe:
            # This child was forked with the parent's pool running: it must stay at one
            # thread (hang-table row 5), and the guard's repair refuses anything more.
            return
        torch.set_num_threads(threads)


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
