"""What tokguard says about an unsafe fork: the report, its text, and who hears it.

Every unsafe fork reaches the subscribers (metrics and tests want every one); the warning
and the log record come once per fork site and set of pools, because a preforking server
forks the same way for its whole life and a log full of one message hides the others.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    from ._threads import Census


class UnsafeForkWarning(RuntimeWarning):
    """A fork happened while a native pool was running; the child was repaired."""


class UnsafeForkError(RuntimeError):
    """An unsafe fork was refused (``raise`` mode), or a child used a pool it cannot use."""

    def __init__(self, message: str, report: ForkReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class Hazard:
    """A native pool that is running now, so a forked child would hang or fail using it."""

    __slots__ = ("consequence", "evidence", "first_use", "pool", "repair", "title")

    def __init__(
        self,
        pool: str,
        title: str,
        evidence: str,
        first_use: str | None,
        repair: str | None,
        consequence: str = "hang",
    ) -> None:
        self.pool = pool
        """Stable id of the pool (``tokguard.pools.ALL`` lists them, docs/how-it-works.md too)."""
        self.title = title
        """The pool in words."""
        self.evidence = evidence
        """Why tokguard believes the pool is running."""
        self.first_use = first_use
        """``file:line in function`` of the user's code that first used it, if known."""
        self.repair = repair
        """What the child repair does, or None where no repair exists."""
        self.consequence = consequence
        """What a child using the pool does: one of ``CONSEQUENCES`` (``hang`` at 0 % CPU,
        ``spin``: hangs at 100 % CPU, ``crash``: dies on a signal, ``fail``: gets an error)."""

    def __repr__(self) -> str:
        return (
            f"Hazard(pool={self.pool!r}, evidence={self.evidence!r}, first_use={self.first_use!r})"
        )

    def as_dict(self) -> dict[str, Any]:
        """The hazard as a JSON-ready dict (``Hazard.from_dict`` reads it back)."""
        return {name: getattr(self, name) for name in HAZARD_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hazard:
        """``as_dict``'s inverse; a missing field gets its empty value (a partial verdict)."""
        return cls(
            data.get("pool", ""),
            data.get("title", ""),
            data.get("evidence", ""),
            data.get("first_use"),
            data.get("repair"),
            data.get("consequence", "hang"),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hazard) and self.pool == other.pool

    def __hash__(self) -> int:
        return hash(self.pool)


HAZARD_FIELDS = ("pool", "title", "evidence", "first_use", "repair", "consequence")
NO_REPAIR = "none possible: the child must not use it"

CONSEQUENCES = {
    "hang": "hang at 0 % CPU",
    "spin": "hang spinning at 100 % CPU",
    "crash": "crash",
    "fail": "fail with an error",
}
"""What a child that uses a pool does after an unsafe fork (``Hazard.consequence``), in words:
the words follow what the runtime does, so a worker stuck at 100 % CPU is not sent looking
for one at 0 %."""


def consequence(hazards: Iterable[Hazard]) -> str:
    """What a child forked now does when it uses these pools, for a message's first lines."""
    kinds = {h.consequence for h in hazards}
    # Each kind once, in the table's order; an unknown kind (a pool of the user's) in its words.
    words = [text for kind, text in CONSEQUENCES.items() if kind in kinds]
    words.extend(sorted(kind for kind in kinds if kind not in CONSEQUENCES))
    return ", or ".join(words) or CONSEQUENCES["hang"]


def render_hazards(
    hazards: Iterable[Hazard],
    repair: str | None = "child repair",
    extra: Callable[[Hazard], Iterable[str]] | None = None,
) -> list[str]:
    """The lines that list hazards, the same in warnings, ``check``, ``doctor``, pytest's summary.

    ``repair``: the label of each hazard's repair line (None: no such line, as when the fork
    was refused and no child exists); ``extra``: more lines for a hazard (where it started).
    """
    lines = []
    for h in hazards:
        lines.append(f"  - {h.title}: {h.evidence}")
        if extra is not None:
            lines.extend(f"    {line}" for line in extra(h))
        if h.first_use:
            lines.append(f"    {first_use_line(h.first_use)}")
        if repair is not None:
            lines.append(f"    {repair}: {h.repair or NO_REPAIR}")
    return lines


KEEP_COLD = (
    "keep the pools cold until after the fork: warm up under "
    "`with tokguard.single_threaded():`, or torch.set_num_threads(1) before the first op"
)
LOAD_AFTER_FORK = "load the model in each worker after the fork: @tokguard.lazy_model"
SPAWN = "start workers with spawn or forkserver: multiprocessing.get_context('spawn')"
SPAWN_NOT_FORKSERVER = (
    "start workers with spawn: multiprocessing.get_context('spawn'). The forkserver forks "
    "them from its own process, and the pool ran there, while it imported its preload "
    "modules (set_forkserver_preload(), and __main__ on Python 3.13.8+ and 3.14.1+): keep "
    "those modules free of model warm-ups"
)


def fixes_for(hazards: Iterable[Hazard], forkserver: bool = False) -> list[str]:
    """Ways to fix these hazards for good, only those that apply: each pool's own first.

    ``forkserver``: the fork is the multiprocessing forkserver's, so "use forkserver" is no
    advice. Keeping pools cold is offered only where a pool has a setting to hold.
    """
    from . import pools

    found = list(hazards)
    lines: list[str] = []
    cold = not found
    # lazy_model is the general way to do the work in the workers; a pool whose own fixes
    # say how (gRPC's post_fork, polars' queries) has no model to load lazily.
    models = not found
    for hazard in found:
        try:
            pool = pools.get(hazard.pool)
        except ValueError:  # a verdict from another process naming a pool this one lacks
            models = True
            continue
        cold = cold or pool.kept_cold is not None
        models = models or not pool.fixes
        lines.extend(fix for fix in pool.fixes if fix not in lines)
    if cold:
        lines.append(KEEP_COLD)
    if models:
        lines.append(LOAD_AFTER_FORK)
    lines.append(SPAWN_NOT_FORKSERVER if forkserver else SPAWN)
    return lines


class ForkReport:
    """The facts of one unsafe fork, as handed to subscribers and put in messages."""

    __slots__ = ("census", "fixes", "fork_site", "hazards", "mode", "notes", "pid", "refused")

    def __init__(
        self,
        hazards: list[Hazard],
        fork_site: str | None,
        mode: str,
        refused: bool,
        census: Census | None,
        notes: list[str] | None = None,
        fixes: list[str] | None = None,
    ) -> None:
        self.hazards = hazards
        self.fork_site = fork_site
        """``file:line in function`` of the user's code that led to the fork."""
        self.mode = mode
        self.refused = refused
        """True where the fork was refused (no child exists)."""
        self.census = census
        self.pid = os.getpid()
        """The parent's pid."""
        self.notes = notes or []
        """Extra lines from other parts of tokguard (lazy models loaded, say)."""
        self.fixes = fixes if fixes is not None else fixes_for(hazards)
        """Ways to fix it for good that apply to this fork, the pools' own first."""

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(h.pool for h in self.hazards)

    @property
    def message(self) -> str:
        site = self.fork_site or "an unknown place"
        verb = "refused a fork" if self.refused else "saw an unsafe fork"
        lines = [
            f"tokguard {verb} at {site} (pid {self.pid}).",
            f"A child forked now would {consequence(self.hazards)}, because these native "
            "pools run in the parent:",
        ]
        lines.extend(render_hazards(self.hazards, None if self.refused else "child repair"))
        if self.census is not None:
            lines.append(
                f"  Threads in the parent: {self.census.os_threads} "
                f"({self.census.python_threads} known to Python)."
            )
        lines.extend(f"  {note}" for note in self.notes)
        lines.append("  Fix it for good, any one of:")
        lines.extend(f"  - {fix}" for fix in self.fixes)
        if self.refused:
            lines.append(
                "  Mode 'raise': no child was created. TOKGUARD_MODE=warn lets such forks go on, repaired."
            )
        elif any(h.repair for h in self.hazards):
            lines.append(
                "  Mode 'warn': the fork went on with the repair above. TOKGUARD_MODE=raise refuses such forks."
            )
        else:
            lines.append(
                "  Mode 'warn': the fork went on, and no repair exists: the child must not use "
                "these pools. TOKGUARD_MODE=raise refuses such forks."
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.message

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict, for log pipelines (``json.dumps(report.as_dict())``)."""
        census = self.census
        return {
            "pid": self.pid,
            "fork_site": self.fork_site,
            "mode": self.mode,
            "refused": self.refused,
            "consequence": consequence(self.hazards),
            "hazards": [h.as_dict() for h in self.hazards],
            "os_threads": census.os_threads if census is not None else None,
            "python_threads": census.python_threads if census is not None else None,
            "notes": list(self.notes),
            "fixes": list(self.fixes),
            "message": self.message,
        }

    def __repr__(self) -> str:
        return (
            f"ForkReport(pools={self.pools}, fork_site={self.fork_site!r}, refused={self.refused})"
        )


_subscribers: list[Callable[[ForkReport], object]] = []
_warned: set[tuple[str | None, tuple[str, ...]]] = set()
_internal_errors: set[str] = set()
unsafe_forks = 0
"""Unsafe forks seen by this process (reset by ``tokguard.reset()``)."""


def subscribe(callback: Callable[[ForkReport], object]) -> Callable[[], None]:
    """Call ``callback(report)`` on every unsafe fork; returns a function that unsubscribes.

    Callbacks run in the forking thread, before the fork (so they see the parent's state),
    and must be quick. An exception in one is reported and does not stop the fork.
    """
    if not callable(callback):
        raise TypeError(f"tokguard.subscribe(callback): expected a callable, got {callback!r}")
    _subscribers.append(callback)

    def unsubscribe() -> None:
        if callback in _subscribers:
            _subscribers.remove(callback)

    return unsubscribe


def publish(report: ForkReport) -> None:
    """Hand the report to subscribers, then warn and log once per site and pool set.

    Raises only what a warnings filter turns into an error (``-W error``): the os.fork
    wrapper calls this before the fork, so such an error refuses the fork cleanly.
    """
    global unsafe_forks
    unsafe_forks += 1
    for callback in list(_subscribers):
        try:
            callback(report)
        except Exception as exc:
            internal_error(f"subscriber {callback!r}", exc)
    key = (report.fork_site, report.pools)
    if report.refused or key in _warned:
        return
    _warned.add(key)
    log(report.message)
    filename, lineno = _split_site(report.fork_site)
    # Imported here, not at ``import tokguard``: the interpreter does not load warnings at
    # start (~0.25 ms), and only an unsafe fork needs it.
    import warnings

    # warn_explicit attributes the warning to the user's fork site, so per-module filters
    # and pytest's warning capture see it where the user can act on it.
    # (Passing module=None explicitly would make CPython skip the filters: leave it out.)
    warnings.warn_explicit(UnsafeForkWarning(report.message), UnsafeForkWarning, filename, lineno)


def first_use_line(first_use: str) -> str:
    """ "first used at file:line", or "first use not recorded (why)"."""
    where = "first use" if first_use.startswith("not recorded") else "first used at"
    return f"{where} {first_use}"


def mark_warned(report: ForkReport) -> None:
    """Count this report's site and pools as warned about (the pytest plugin says it itself)."""
    _warned.add((report.fork_site, report.pools))


def _split_site(site: str | None) -> tuple[str, int]:
    if site:
        # rsplit: a directory name may hold " in ", a function name cannot.
        location = site.rsplit(" in ", 1)[0]
        filename, _, line = location.rpartition(":")
        if filename and line.isdigit():
            return filename, int(line)
    return "<fork>", 0


def log(message: str, level: str = "warning") -> None:
    """Tell the ``tokguard`` logger, where the application has set up logging."""
    # Never imported here: this runs inside a before-fork hook, and logging registers fork
    # hooks of its own when imported, whose after-fork half would then release a lock it
    # never took. An application that never imported logging has no handler to reach anyway.
    logging = sys.modules.get("logging")
    if logging is None:
        return
    logger = logging.getLogger("tokguard")
    if not logger.handlers:
        # A library's logger stays quiet unless the application configures logging; the
        # warning already reaches stderr, and logging's last-resort handler would repeat it.
        logger.addHandler(logging.NullHandler())
    getattr(logger, level)(message)


def internal_error(where: str, exc: BaseException) -> None:
    """A bug or surprise inside tokguard: say so once on stderr and carry on."""
    if where in _internal_errors:
        return
    _internal_errors.add(where)
    try:
        sys.stderr.write(f"tokguard: internal error in {where}, ignored: {exc!r}\n")
    except Exception:
        pass


def forget_warnings() -> None:
    """Let every site warn again (``tokguard.reset()``)."""
    global unsafe_forks
    _warned.clear()
    _internal_errors.clear()
    unsafe_forks = 0
