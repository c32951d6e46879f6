"""The native pools tokguard knows, one module each, and the one registry of them.

A pool is everything tokguard knows about one library's threads: which imports let it
watch the library (``triggers``), the first use it records, how it tells that the pool runs
now (``detect``), what a forked child needs (``repair_child``), and the words the reports and
docs use. Generic code (the fork hooks, ``hazards()``, ``check``, ``doctor``, the pytest
plugin) only loops over ``ALL``; adding a pool is one module and one line in ``REGISTRY``
at the bottom of this file (docs/how-it-works.md, "Architecture", has polars as the worked example).

Like threadpoolctl's controllers, a pool's module imports nothing heavy, and the library it
watches is never imported by tokguard. A pool's module is itself imported only once that
library is (``REGISTRY`` says which): ``ALL`` holds the pools that can be running in this
process, so a process that never imports torch pays nothing for torch's pools.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    from .. import _threads
    from .._report import Hazard

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
    """What a child that uses the pool does after an unsafe fork, one of
    ``tokguard._report.CONSEQUENCES``: ``hang`` (at 0 % CPU), ``spin`` (hangs at 100 % CPU),
    ``crash`` (dies on a signal) or ``fail`` (gets an error). ``hazard()`` can say otherwise
    for one fork, where the runtime's behaviour depends on its settings."""
    fixes: tuple[str, ...] = ()
    """Ways to fix it for good that are this pool's own, shown before the general ones."""
    found_by_threads = False
    """True where ``detect`` finds the pool only by its threads: a fork whose caller is the
    process's only thread does not ask it (nothing of it can be running)."""
    kept_cold: str | None = None
    """What ``single_threaded()`` and master mode do for it, in words (the ``cool`` and
    ``put_back`` below do it); None: nothing, and those methods are not called."""
    description = ""
    """One paragraph for docs and ``doctor``: what the pool is and how it is found."""
    covered_by: tuple[tuple[str, str, str], ...] = ()
    """Forking libraries that make this pool safe in their own children: (module name prefix
    on the fork's stack, the library in words, how). Such forks are not reported for it."""

    def __init__(self) -> None:
        self.first_use: str | None = None
        """``file:line in function`` of the user's code that first used the pool."""

    def instrument(self, module: "ModuleType", late: bool) -> None:
        """Wrap what records the first use; ``late``: imported before tokguard was."""

    def detect(self, census: "_threads.Census | None") -> "Hazard | None":
        """The hazard if the pool runs now (``census``: None where /proc says nothing)."""
        return None

    def repair_child(self) -> None:
        """Make the pool safe in a forked child (only called where ``repair`` is set)."""

    def doctor_lines(self) -> list[str]:
        """What ``tokguard doctor`` says about the pool's library as installed and set up (a
        version, an environment variable) under "Runtimes", without importing it; often nothing."""
        return []

    # Keeping the pool cold: ``single_threaded()`` and master mode (``_coldstart``) save every
    # pool's setting, hold the pool at one thread, and put the setting back when the
    # last block ends (in a master's workers: right after the fork). A pool that has no
    # setting to hold keeps these defaults, and ``kept_cold`` None.

    def cold_save(self) -> object:
        """The pool's setting now, as ``put_back`` takes it (None: nothing to hold)."""
        return None

    def cool(self) -> None:
        """Hold the pool at one thread (or serial) from now on."""

    def is_cold(self) -> bool:
        """Whether the pool is held at one thread now (a nested block cools it again if not)."""
        return True

    def put_back(self, saved: object, repaired: bool = False) -> None:
        """Give back ``saved``, unless the setting changed since ``cool`` (the user's newer
        choice is kept) or ``repaired`` (a child repaired for this pool at its fork)."""

    def hazard(
        self, evidence: str, first_use: str | None = None, consequence: str | None = None
    ) -> "Hazard":
        from .._report import Hazard

        return Hazard(
            self.id, self.title, evidence, first_use, self.repair, consequence or self.consequence
        )

    def __repr__(self) -> str:
        return f"<tokguard pool {self.id!r}>"


ALL: list[Pool] = []
"""Every pool, in the order reports list them."""
asked_when_alone: tuple[Pool, ...] = ()
"""The pools of ``ALL`` that a fork whose caller is the only thread still asks (their
evidence is not threads); where there are none, such a fork needs no judgement at all, and
where they find nothing (``nothing_when_alone``), none beyond asking them."""
_by_id: dict[str, Pool] = {}
_installed = False


_order: dict[str, int] = {}  # pool id -> place in reports (the registry's order first)
_present_at_install: frozenset[str] = frozenset()  # triggers imported before tokguard


def register(pool: Pool, triggers: tuple[str, ...] | None = None) -> Pool:
    """Add a pool (instrumented at once where tokguard is installed); ``triggers``: the
    modules whose import lets it watch its library, where the class does not name them."""
    global asked_when_alone
    if not pool.id or pool.id in _by_id:
        raise ValueError(
            f"tokguard.pools.register({pool!r}): the id must be new and not empty; "
            f"taken: {', '.join(_by_id)}"
        )
    if triggers is not None:
        pool.triggers = triggers
    _by_id[pool.id] = pool
    _order.setdefault(pool.id, len(REGISTRY) + len(_order))
    ALL.append(pool)
    ALL.sort(key=lambda p: _order[p.id])
    asked_when_alone = tuple(p for p in ALL if not p.found_by_threads)
    if _installed:
        _instrument_pool(pool)
    return pool


def known() -> list[Pool]:
    """Every pool tokguard knows, including those whose library this process never imported."""
    for name, triggers in REGISTRY:
        _load(name, triggers)
    return list(ALL)


def get(pool_id: str) -> Pool:
    """The pool with this id; a ValueError naming the known ids otherwise."""
    pool = _by_id.get(pool_id)
    if pool is None:
        ids = ", ".join(p.id for p in known())
        pool = _by_id.get(pool_id)
        if pool is None:
            raise ValueError(f"unknown pool {pool_id!r}; known pools are {ids}")
    return pool


def first_uses() -> dict[str, str | None]:
    """Each pool's recorded first use, by pool id (the pytest plugin diffs these)."""
    return {pool.id: pool.first_use for pool in ALL}


def _instrument_pool(pool: Pool) -> None:
    from .. import _instrument

    for name in pool.triggers:
        if name == THREADED[0]:
            continue
        late = name in _present_at_install

        def hook(module: "ModuleType", pool: Pool = pool, late: bool = late) -> None:
            pool.instrument(module, late)

        _instrument.when_imported(name, hook)


def _load(name: str, triggers: tuple[str, ...]) -> None:
    """Import a registered pool's module and register its pool (once)."""
    module = sys.modules.get(f"{__name__}.{name}")
    if module is None:
        __import__(f"{__name__}.{name}")
        module = sys.modules[f"{__name__}.{name}"]
    pool: Pool = module.POOL
    if pool.id not in _by_id:
        _order[pool.id] = next(i for i, (n, _) in enumerate(REGISTRY) if n == name)
        register(pool, triggers)


def install() -> None:
    """Load and instrument each pool now, or when the library it watches gets imported."""
    global _installed, _present_at_install
    if _installed:
        return
    _installed = True
    _present_at_install = frozenset(t for _, ts in REGISTRY for t in ts if t in sys.modules)
    for pool in list(ALL):  # registered before install (a library's own pool)
        _instrument_pool(pool)
    from .. import _instrument

    for name, triggers in REGISTRY:
        if triggers == THREADED:
            continue  # loaded by the first census that finds another thread (assess)
        if not triggers or any(t in sys.modules for t in triggers):
            _load(name, triggers)
            continue
        for trigger in triggers:
            # Loaded with its library; the load instruments it (when_imported runs at once).
            _instrument.when_imported(trigger, _loader(name, triggers))


def _loader(name: str, triggers: tuple[str, ...]) -> "Callable[[ModuleType], None]":
    def load(module: "ModuleType") -> None:
        _load(name, triggers)

    return load


_threads_module: "ModuleType | None" = None
_threaded_pending = True  # pools registered with THREADED not loaded yet


def _load_threaded() -> None:
    global _threaded_pending
    _threaded_pending = False
    for name, triggers in REGISTRY:
        if triggers == THREADED:
            _load(name, triggers)


def assess() -> "tuple[list[Hazard], _threads.Census | None]":
    """The hazards present now and the thread census they were judged on.

    Never raises: a pool whose ``detect`` fails is reported once (on stderr, through the
    report module's internal-error path) and counts as "nothing found".
    """
    global _threads_module
    if _threads_module is None:
        # Imported at the first fork, not at ``import tokguard`` (about 0.1 ms); kept, as an
        # import statement at every fork would touch the import system's objects each time.
        from .. import _threads

        _threads_module = _threads
    census = None
    try:
        # Cheap where nothing runs but the caller: one stat of /proc/PID/task.
        census = _threads_module.census()
    except Exception as exc:
        from .._report import internal_error

        internal_error("thread census", exc)
    found = []
    alone = census is _threads_module.ALONE
    if not alone and _threaded_pending:
        _load_threaded()
    for pool in ALL:
        if alone and pool.found_by_threads:
            continue  # the common fork: each pool asked writes memory the fork then copies
        try:
            hazard = pool.detect(census)
        except Exception as exc:
            from .._report import internal_error

            internal_error(f"probe {pool.id}", exc)  # once per pool
            continue
        if hazard is not None:
            found.append(hazard)
    return found, census


def nothing_when_alone() -> bool:
    """Whether every pool that a lone-thread fork asks finds nothing: the fork wrapper's quick
    path, where the caller is the only thread (torch imported but idle, say). A pool that
    fails counts as finding something, so that the full judgement reports its error."""
    alone = _threads_module.ALONE if _threads_module is not None else None
    if alone is None:
        return False  # no judged fork yet
    try:
        return all(pool.detect(alone) is None for pool in asked_when_alone)
    except Exception:
        return False


def hazards() -> "list[Hazard]":
    """What would make a fork unsafe if this process forked now; no fork needed."""
    return assess()[0]


_COLDSTART = f"{__name__.rpartition('.')[0]}._coldstart"  # looked up at every judged fork


def block_restores(pool: Pool) -> tuple[bool, object]:
    """(inside a single_threaded() block?, the setting of ``pool`` the block will put back).

    A fork inside a block is judged on that, not on the block's temporary one: the child
    leaves the block too, and would then use a pool that died at the fork.
    """
    coldstart = sys.modules.get(_COLDSTART)
    if coldstart is None or not coldstart.active():
        return False, None
    return True, coldstart.restored_settings().get(pool.id)


def wraps(method: "Callable[..., Any]") -> "Callable[[Callable[..., Any]], Callable[..., Any]]":
    # Imported on first use, not at ``import tokguard``: the interpreter does not load
    # functools at start, and the libraries being instrumented have loaded it by then.
    import functools

    return functools.wraps(method)


def torch_dir() -> str | None:
    """torch's package directory (with a trailing separator), where torch is imported."""
    torch = sys.modules.get("torch")
    path = getattr(torch, "__file__", None)
    return os.path.dirname(path) + os.sep if path else None


THREADED = ("<another thread>",)
"""Triggers of a pool that any extension may start and that only its threads reveal: its
module is loaded by the first fork (or ``hazards()``) that finds a thread besides the
caller's, not at ``import tokguard`` (about 0.1 ms a module) nor at every fork before that."""

# The registry: the only list of pools, in the order reports list them, each with the
# modules whose import lets tokguard watch it and loads its module (none: loaded at once,
# as any library may bring GNU OpenMP; THREADED: once a second thread is seen). Each
# module costs about 0.1 ms of `import tokguard`.
REGISTRY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tokenizers_rayon", ("tokenizers",)),
    ("tokenizers_tokio", ("tokenizers",)),
    ("torch_openmp", ("torch",)),
    ("openmp", ()),
    ("torch_cuda", ("torch",)),
    ("polars", ("polars",)),
    ("onnxruntime", ("onnxruntime",)),
    ("numba", ("numba",)),
    ("grpc_core", ("grpc",)),
    ("hf_xet_tokio", ("hf_xet",)),
    ("tokio", THREADED),
)
