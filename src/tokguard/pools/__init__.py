"""The native pools tokguard knows, one module each, and the one registry of them.

A pool is everything tokguard knows about one library's threads: which imports let it
watch the library (``triggers``), the first use it records, how it tells that the pool runs
now (``detect``), what a forked child needs (``repair_child``), and the words the reports and
docs use. Generic code (the fork hooks, ``hazards()``, ``check``, ``doctor``, the pytest
plugin) only loops over ``ALL``; adding a pool is one module and one line at the bottom of
this file (docs/how-it-works.md, "Architecture", has polars as the worked example).

Like threadpoolctl's controllers, a pool's module imports nothing heavy: every pool module
is loaded at ``import tokguard``, and the library it watches is never imported by tokguard.
"""

from __future__ import annotations

import sys

from .. import _threads
from .._report import Hazard

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

UNRECORDED = "not recorded"
"""A first use seen by the instrumentation, where no frame of the user's code was found."""


class Pool:
    """One native pool; subclasses fill in the class attributes and override what applies."""

    id = ""
    """Stable id, as in ``Hazard.pool``, reports and JSON."""
    title = ""
    """The pool in words."""
    triggers: tuple[str, ...] = ()
    """Modules whose import (or presence at ``import tokguard``) calls ``instrument``."""
    repair: str | None = None
    """What ``repair_child`` does, in words; None where no repair exists."""
    consequence = "hang"
    """What a child that uses the pool does after an unsafe fork: ``hang`` or ``fail``."""
    kept_cold: str | None = None
    """What ``single_threaded()`` and master mode do for it, in words; None: nothing."""
    description = ""
    """One paragraph for docs and ``doctor``: what the pool is and how it is found."""

    def __init__(self) -> None:
        self.first_use: str | None = None
        """``file:line in function`` of the user's code that first used the pool."""

    def instrument(self, module: ModuleType, late: bool) -> None:
        """Wrap what records the first use; ``late``: imported before tokguard was."""

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        """The hazard if the pool runs now (``census``: None where /proc says nothing)."""
        return None

    def repair_child(self) -> None:
        """Make the pool safe in a forked child (only called where ``repair`` is set)."""

    def hazard(self, evidence: str, first_use: str | None = None) -> Hazard:
        return Hazard(self.id, self.title, evidence, first_use, self.repair, self.consequence)

    def __repr__(self) -> str:
        return f"<tokguard pool {self.id!r}>"


ALL: list[Pool] = []
"""Every pool, in the order reports list them."""
_by_id: dict[str, Pool] = {}
_installed = False


def register(pool: Pool) -> Pool:
    """Add a pool to the registry (and instrument it at once where tokguard is installed)."""
    if not pool.id or pool.id in _by_id:
        raise ValueError(
            f"tokguard.pools.register({pool!r}): the id must be new and not empty; "
            f"taken: {', '.join(_by_id)}"
        )
    ALL.append(pool)
    _by_id[pool.id] = pool
    if _installed:
        _instrument_pool(pool)
    return pool


def get(pool_id: str) -> Pool:
    """The pool with this id; a ValueError naming the known ids otherwise."""
    pool = _by_id.get(pool_id)
    if pool is None:
        raise ValueError(f"unknown pool {pool_id!r}; known pools are {', '.join(_by_id)}")
    return pool


def first_uses() -> tuple[str | None, ...]:
    """Each pool's recorded first use, in the order of ``ALL`` (the pytest plugin diffs these)."""
    return tuple([pool.first_use for pool in ALL])


def _instrument_pool(pool: Pool) -> None:
    from .. import _instrument

    for name in pool.triggers:
        late = name in sys.modules

        def hook(module: ModuleType, pool: Pool = pool, late: bool = late) -> None:
            pool.instrument(module, late)

        _instrument.when_imported(name, hook)


def install() -> None:
    """Instrument every pool now or when its library gets imported (import time)."""
    global _installed
    if _installed:
        return
    _installed = True
    for pool in ALL:
        _instrument_pool(pool)


def assess() -> tuple[list[Hazard], _threads.Census | None]:
    """The hazards present now and the thread census they were judged on.

    Never raises: a pool whose ``detect`` fails is reported once (on stderr, through the
    report module's internal-error path) and counts as "nothing found".
    """
    from .._report import internal_error

    census = None
    try:
        # Cheap where there is nothing to classify: one listing of /proc/self/task.
        census = _threads.census()
    except Exception as exc:
        internal_error("thread census", exc)
    found = []
    for pool in ALL:
        try:
            hazard = pool.detect(census)
        except Exception as exc:
            internal_error(f"probe {pool.id}", exc)  # once per pool
            continue
        if hazard is not None:
            found.append(hazard)
    return found, census


def hazards() -> list[Hazard]:
    """What would make a fork unsafe if this process forked now; no fork needed."""
    return assess()[0]


def block_restores() -> tuple[bool, str | None, int]:
    """(inside a single_threaded() block?, C value and torch threads it will restore).

    A fork inside a block is judged on these, not on the block's temporary values: the child
    leaves the block too, and would then use a pool that died at the fork.
    """
    coldstart = sys.modules.get("tokguard._coldstart")
    if coldstart is None or not coldstart.active():
        return False, None, 0
    value, threads = coldstart.restored_settings()
    return True, value, threads


def wraps(method: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    # Imported on first use, not at ``import tokguard``: the interpreter does not load
    # functools at start, and the libraries being instrumented have loaded it by then.
    import functools

    return functools.wraps(method)


# The registry: the only list of pools. Order is the order of reports.
from . import openmp, polars, tokenizers_rayon, tokenizers_tokio, torch_cuda, torch_openmp  # noqa: E402

for _module in (tokenizers_rayon, tokenizers_tokio, torch_openmp, openmp, torch_cuda, polars):
    register(_module.POOL)
